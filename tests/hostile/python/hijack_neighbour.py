"""Hijack a neighbour: find other waiting at-run-exec workers in /proc and open their stdin
for writing, to answer someone else's invocation. Evidence: how many stdins it could open."""
import os


def main(args):
    opened = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"at-run-exec" not in f.read():
                        continue
                with open(f"/proc/{pid}/fd/0", "w"):
                    opened += 1
            except OSError:
                pass
    return {"opened": opened}
