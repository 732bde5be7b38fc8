"""Who may have code run here: the operator's access policy.

Explicit blocks always win; then allowlist mode serves only listed DIDs, blocklist mode
everyone not blocked, open mode everyone. A denied author gets no result record (the runner
must not become an amplifier), only a log line and a count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class AccessPolicy:
    mode: str
    allowlist: frozenset[str]
    blocklist: frozenset[str]

    @classmethod
    def from_config(cls, section) -> "AccessPolicy":
        return cls(section.mode, frozenset(section.allowlist), frozenset(section.blocklist))

    def allows(self, did: str) -> bool:
        if did in self.blocklist:
            return False
        if self.mode == "allowlist":
            return did in self.allowlist
        return True


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

    @classmethod
    def from_config(cls, section) -> "PermissionPolicy":
        return cls(tuple(section.net), tuple(section.read), tuple(section.write), tuple(section.env))

    def refused(self, asked) -> list[str]:
        """Every requested item this runner does not grant, described; empty if all granted."""
        if asked is None:
            return []
        out = [f"net {h}" for h in asked.net or [] if not _host_allowed(h, list(self.net))]
        out += [f"read {p}" for p in asked.read or [] if not _path_allowed(p, list(self.read))]
        out += [f"write {p}" for p in asked.write or [] if not _path_allowed(p, list(self.write))]
        out += [f"env {n}" for n in asked.env or [] if not ("*" in self.env or n in self.env)]
        return out
