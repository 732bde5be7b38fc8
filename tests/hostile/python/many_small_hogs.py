"""Many processes, each under its own memory limit, together far over it: ten children take
100 MiB each. Per-process rlimits cannot see the sum; the worker's memory cgroup does, and the
kernel's OOM killer stops the tree inside it."""
import os
import time


def main(args):
    children = []
    for _ in range(args.get("children", 10)):
        pid = os.fork()
        if pid == 0:
            hog = bytearray(100 * 1024 * 1024)
            for i in range(0, len(hog), 4096):
                hog[i] = 1  # touch every page: resident, not just reserved
            time.sleep(3)
            os._exit(0)
        children.append(pid)
    survivors = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        survivors += os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return {"survivors": survivors}
