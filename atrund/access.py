"""Who may have code run here: the operator's access policy.

Explicit blocks always win; then allowlist mode serves only listed DIDs, blocklist mode
everyone not blocked, open mode everyone. A denied author gets no result record (the runner
must not become an amplifier), only a log line and a count.
"""

from __future__ import annotations

from dataclasses import dataclass


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
