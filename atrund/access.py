"""Who may have code run here: the operator's access policy.

Explicit blocks always win; then allowlist mode serves only listed DIDs, follows and list
modes the listed DIDs plus the ``trusted`` set read from the AT graph (atrund.trust), blocklist
mode everyone not blocked, open mode everyone. A denied author gets no result record (the
runner must not become an amplifier), only a log line and a count.

The lists are the configuration's plus the operator's live edits, which ``atrund access
allow|deny`` makes while the daemon runs: in the policy file next to a SQLite state
(``PolicyFile``), or, when replicas share a Postgres ``[state] url``, in that database
(``StoredPolicy``), so that an edit made with any replica's configuration reaches them all.
Both are read the same way (``stamp`` to see a change, ``read`` for the entries): atrund.trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from atrund.errors import PolicyFileError

LISTED_MODES = ("allowlist", "follows", "list")  # modes that serve only whom they name


@dataclass(frozen=True)
class AccessPolicy:
    mode: str
    allowlist: frozenset[str]
    blocklist: frozenset[str]
    trusted: frozenset[str] = frozenset()  # follows / list members, in those modes

    @classmethod
    def from_config(cls, section) -> "AccessPolicy":
        return cls(section.mode, frozenset(section.allowlist), frozenset(section.blocklist))

    def allows(self, did: str) -> bool:
        if did in self.blocklist:
            return False
        if self.mode in LISTED_MODES:
            return did in self.allowlist or did in self.trusted
        return True

    def served(self) -> list[str]:
        """Everyone this policy names as served (empty in blocklist and open modes, which serve
        whoever is not blocked): the authors worth polling."""
        if self.mode not in LISTED_MODES:
            return []
        return sorted((self.allowlist | self.trusted) - self.blocklist)


@dataclass(frozen=True)
class PolicyEntries:
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file (inode, modification time, size); None when it is not there.
    The policy file and the configuration file are both watched by it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class PolicyFile:
    """The operator's live edits: ``{"allow": [DID...], "deny": [DID...]}``.

    Written whole to a temporary file and renamed over the old one (readers never see half a
    file), under an exclusive lock so that two edits at once cannot lose one. The daemon
    re-reads it when its identity (inode, mtime, size) changes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def stamp(self) -> tuple[int, int, int] | None:
        return file_stamp(self.path)

    def read(self) -> PolicyEntries:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return PolicyEntries()
        except OSError as e:
            raise PolicyFileError(f"{self.path}: cannot read: {e.strerror}") from e
        except ValueError as e:
            raise PolicyFileError(f"{self.path}: not JSON: {e}") from None
        if not isinstance(data, dict) or set(data) - {"allow", "deny"}:
            raise PolicyFileError(f'{self.path}: expected an object with only "allow" and "deny" lists')
        out = {}
        for key in ("allow", "deny"):
            items = data.get(key, [])
            bad = [d for d in items if not isinstance(d, str) or not d.startswith("did:")] if isinstance(items, list) else [items]
            if bad:
                raise PolicyFileError(f"{self.path}: {key}: {bad[0]!r} is not a DID")
            out[key] = frozenset(items)
        return PolicyEntries(**out)

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, entries: PolicyEntries) -> None:
        text = json.dumps({"allow": sorted(entries.allow), "deny": sorted(entries.deny)}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            parent = os.stat(self.path.parent)
            if os.geteuid() == 0 and parent.st_uid != 0:  # root's edit of a runner running as its own user: its file
                os.fchown(fd, parent.st_uid, parent.st_gid)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def allow(self, did: str) -> PolicyEntries:
        """Serve ``did`` (and lift a deny of it made here)."""
        with self._locked():
            old = self.read()
            new = PolicyEntries(old.allow | {did}, old.deny - {did})
            self._write(new)
        return new

    def deny(self, did: str) -> PolicyEntries:
        """Never serve ``did`` (and drop an allow of it made here)."""
        with self._locked():
            old = self.read()
            new = PolicyEntries(old.allow - {did}, old.deny | {did})
            self._write(new)
        return new


class PolicyRows(Protocol):
    """Where a shared store keeps the policy's entries (atrund.pgstate: PgState, PolicyAt)."""

    def policy_stamp(self) -> object: ...
    def policy_entries(self) -> tuple[list[str], list[str]]: ...
    def set_policy(self, did: str, verdict: str) -> None: ...


class StoredPolicy:
    """The operator's live edits in the database replicas share: the same entries as a
    ``PolicyFile`` (``stamp``, ``read``, ``allow``, ``deny``), one verdict per DID, so every replica
    sees an edit at its next check (atrund.trust: within a second). The store's faults are
    StoreError."""

    where = "the state database (state.url)"

    def __init__(self, rows: PolicyRows) -> None:
        self.rows = rows

    def stamp(self) -> object:
        return self.rows.policy_stamp()

    def read(self) -> PolicyEntries:
        allow, deny = self.rows.policy_entries()
        return PolicyEntries(frozenset(allow), frozenset(deny))

    def allow(self, did: str) -> PolicyEntries:
        """Serve ``did`` (and lift a deny of it)."""
        self.rows.set_policy(did, "allow")
        return self.read()

    def deny(self, did: str) -> PolicyEntries:
        """Never serve ``did`` (and drop an allow of it)."""
        self.rows.set_policy(did, "deny")
        return self.read()


def policy_at(path: Path, url: str | None) -> PolicyFile | StoredPolicy:
    """Where operators' commands find the live edits: the policy file at ``path``, or with a
    shared ``url`` that database (on a connection of the command's own)."""
    if url is None:
        return PolicyFile(path)
    from atrund.pgstate import PolicyAt  # psycopg is loaded only where it is used

    return StoredPolicy(PolicyAt(url))


def effective(section, entries: PolicyEntries, trusted: frozenset[str] = frozenset()) -> AccessPolicy:
    """The policy in force: the configuration's lists plus the policy file's, and the trusted set."""
    return AccessPolicy(section.mode, frozenset(section.allowlist) | entries.allow,
                        frozenset(section.blocklist) | entries.deny, trusted)


def _host_allowed(requested: str, patterns: list[str]) -> bool:
    host = requested.rsplit(":", 1)[0] if requested.count(":") == 1 else requested
    for p in patterns:
        if p == "*" or p == requested:
            return True
        bare = p if ":" not in p else None  # a pattern with a port matches only exactly (above)
        if bare is None:
            continue
        if bare == host or (bare.startswith("*.") and (host == bare[2:] or host.endswith(bare[1:]))):
            return True
    return False


def _path_allowed(requested: str, roots: list[str]) -> bool:
    """Within an allowed root, both as written and as the file system resolves it today: a
    symlink planted inside a granted directory must not widen the grant to where it points."""
    path = PurePosixPath(os.path.normpath(requested))
    if not path.is_absolute():
        return False
    real = PurePosixPath(os.path.realpath(requested))
    return any(r == "*" or (path.is_relative_to(os.path.normpath(r)) and real.is_relative_to(os.path.realpath(r)))
               for r in roots)


@dataclass(frozen=True)
class PermissionPolicy:
    """What this runner grants to bundles that ask (the bundle record's ``permissions``).

    A bundle gets exactly what it asks for, if every item is within what the operator allows;
    otherwise it is not run, and the result names what was refused. Nothing is granted silently.
    """

    net: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    net_private: tuple[str, ...] = ()  # private ranges a net grant may reach through the egress proxy

    @classmethod
    def from_config(cls, section) -> "PermissionPolicy":
        return cls(tuple(section.net), tuple(section.read), tuple(section.write), tuple(section.env),
                   tuple(section.net_private))

    def refused(self, asked) -> list[str]:
        """Every requested item this runner does not grant, described; empty if all granted."""
        if asked is None:
            return []
        out = [f"net {h}" for h in asked.net or [] if not _host_allowed(h, list(self.net))]
        out += [f"read {p}" for p in asked.read or [] if not _path_allowed(p, list(self.read))]
        out += [f"write {p}" for p in asked.write or [] if not _path_allowed(p, list(self.write))]
        out += [f"env {n}" for n in asked.env or [] if not ("*" in self.env or n in self.env)]
        return out
