"""Authors whose accounts the network reports inactive (taken down, suspended, deactivated).

A firehose ``#account`` frame with ``active: false`` adds the DID here, one with ``active: true``
removes it; while it is here, neither the stream nor the poll rescan takes the author's
invocations. The set is kept in the state store, so a restart still knows who was reported
(the stream does not say it again), and in memory for the lookups.

Bounded: a relay reports accounts of the whole network, so at most ``LIMIT`` DIDs are kept, and
past that the one reported longest ago is forgotten first (it is served again if it posts, which
is what a runner that never saw the report would do too).
"""

from __future__ import annotations

import structlog

from atrund.atproto.lru import LRU
from atrund.state import Store, StoreError

log = structlog.get_logger("atrund.ingest")

LIMIT = 100_000  # DIDs; about 10 MB in memory and in the state file


class InactiveAccounts:
    """A set of DIDs (``in``, ``add``, ``discard``, ``len``) kept in the state store, at most ``limit``."""

    def __init__(self, state: Store, limit: int = LIMIT) -> None:
        self.state = state
        self.limit = limit
        self.evicted = 0  # forgotten to stay under the limit (logged when it happens)
        # Ordered by report, oldest first: an LRU that lookups (``in``) never refresh.
        self._dids: LRU[str, None] = LRU(limit)
        forgotten = [gone for did in state.inactive_accounts() if (gone := self._dids.put(did, None)) is not None]
        if forgotten:  # a smaller limit than the store was filled with
            self.evicted += len(forgotten)
            self._store(lambda: self.state.forget_inactive(forgotten), forgotten[0])

    def __contains__(self, did: object) -> bool:
        return did in self._dids

    def __len__(self) -> int:
        return len(self._dids)

    def add(self, did: str) -> None:
        """``did`` is reported inactive (again: it becomes the newest report)."""
        gone = self._dids.put(did, None)
        evict = [gone] if gone is not None else []
        if evict:
            self.evicted += len(evict)
            log.warning("inactive accounts at their limit: forgetting the oldest reports", limit=self.limit, forgotten=evict)
        self._store(lambda: self.state.set_inactive(did, evict), did)

    def discard(self, did: str) -> None:
        """``did`` is reported active again."""
        if did in self._dids:
            self._dids.pop(did)
            self._store(lambda: self.state.forget_inactive([did]), did)

    def _store(self, write, did: str) -> None:
        # The set in memory is what counts while this process runs; a store that fails now only
        # means a restart may not know this report (logged, so an operator can tell).
        try:
            write()
        except StoreError as e:
            log.error("cannot store an account's inactive status; it holds until a restart", did=did, error=str(e))
