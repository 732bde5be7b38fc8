"""The runner's work directory, and which runner process owns what the backends leave on the host.

Workers leave things behind when a runner crashes: worker directories and mounts (process),
containers (container), VM directories and their monitors (microvm). Each carries the owner
string of the runner process that made it (``OWNER``); at start-up a backend removes what
belongs to runners that are gone (``alive`` is false) and leaves a live runner's alone, so two
runners can share a host and an engine.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from atrund.execute.base import ExecutorError

DEFAULT_WORK_DIR = "/run/atrund-work"  # root-only parent; never the world-writable /tmp


def owner_of(pid: int) -> str | None:
    """``pid:start-time`` of a live process (the start time guards against a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid}:{f.read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


OWNER = owner_of(os.getpid())


def alive(owner: str) -> bool:
    """Whether the runner process an owner string names still runs (on this host)."""
    pid, _, _ = owner.partition(":")
    return pid.isdigit() and owner_of(int(pid)) == owner


def owned_dir(path: Path, uid: int, who: str) -> Path:
    """``path`` created if need be, and checked: a directory owned by ``uid`` that no one else
    may write to (the runner works in it as root or as itself: another user must not control it)."""
    try:
        path.mkdir(mode=0o711, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:  # a file in the way, a read-only or full disk: say which, not a traceback
        raise ExecutorError(f"cannot use {path} as the work directory (executor.work_dir): {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        raise ExecutorError(f"{path} must be a directory owned by {who} and not writable by others")
    return path


def work_root(work_dir: Path | None) -> Path:
    """The configured work directory, else the default."""
    return Path(work_dir or DEFAULT_WORK_DIR)
