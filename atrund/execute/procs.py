"""What the runner can see of a worker's processes from outside, through /proc.

A reused worker must start every request as a fresh one would: with at least a whole CPU budget
left, and with nothing of the last request still running. RLIMIT_CPU counts a process's whole
life and no one can raise a worker's hard limit (that takes CAP_SYS_RESOURCE, which a runner in
a container often lacks), so a worker that may be reused starts with twice the budget, and the
pool reads here what it has spent and retires it before less than one budget is left. The
runner reads /proc as root; the bundle, another uid, cannot hide from it.
"""

from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree(root: int) -> list[int]:
    """``root`` and every process below it (children of any of its threads), parents first."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            continue  # gone since it was listed
    return out


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)


def cpu_spent(pids: list[int]) -> float:
    """The most CPU time any one of these processes has used: what RLIMIT_CPU, which counts per
    process, has left of its budget."""
    spent = 0.0
    for pid in pids:
        try:
            spent = max(spent, cpu_seconds(pid))
        except (OSError, IndexError, ValueError):
            continue  # gone since it was listed
    return spent


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes together."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total
