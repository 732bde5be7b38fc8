"""Hijack a neighbour: find other waiting at-run-exec workers in /proc and open their stdin
for writing, to answer someone else's invocation. Evidence: how many stdins it could open.
The worker's own ancestors do not count (in a container, its init names at-run-exec too)."""
import os


def _ancestors():
    found, pid = set(), os.getpid()
    while pid > 0:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return found


def main(args):
    opened = 0
    mine = _ancestors()
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) not in mine:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"at-run-exec" not in f.read():
                        continue
                with open(f"/proc/{pid}/fd/0", "w"):
                    opened += 1
            except OSError:
                pass
    return {"opened": opened}
