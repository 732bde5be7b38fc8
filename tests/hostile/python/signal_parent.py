"""Kill or signal the parent, and everything else it can reach (kill(-1)). Contained when the
runner, and a process of the host's, survive; under the process backend the bundle's world
is its own PID namespace and uid."""
import os
import signal


def main(args):
    tried = {}
    for target in (os.getppid(), args.get("sentinel", 0), -1):
        if not target:
            continue
        try:
            os.kill(target, signal.SIGKILL)
            tried[str(target)] = "sent"
        except OSError as e:
            tried[str(target)] = type(e).__name__
    return tried
