"""What bundles print, kept for the people who may read it: ``atrund logs`` and ``atrund tail``.

Every run that printed something, or did not succeed, leaves an entry (atrund.state.LogEntry):
its id, the bundle, who asked, the status, the error and the output (the last
``executor.output_bytes`` of what the bundle wrote on stdout and stderr, with secret values
already redacted by the pipeline). The id is the invocation's AT URI (a schedule tick's or a
trigger firing's key), or for a gateway or XRPC request a request id that its answer carries
(``Atrun-Request-Id``, and ``requestId`` in a failure's body): an anonymous caller learns only
that id, never the output or the bundle's own error text.

Who may read an entry: the bundle's author, and the invoker (the invocation record's author, or
the XRPC caller), each proven by service auth (dev.atrun.getLogs, atrund.gateway).

Entries are held in memory and written in one transaction a second: a gateway answers thousands
of requests a second, and output is not part of the runner's exactly-once promise, so a crash
loses at most the last second's entries. A read writes what is held first, so the entry of a run
that just ended is there. Entries older than ``[logs] retention_hours`` go, and past
``max_entries`` the oldest go first: the disk a flood of output can take is bounded by
``max_entries`` × ``output_bytes``.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from atrund.atproto.uri import authority, new_tid
from atrund.config import LogsSection
from atrund.errors import StoreError
from atrund.state import LogEntry, Store

log = structlog.get_logger("atrund.logbook")

FLUSH_SECONDS = 1.0
SWEEP_SECONDS = 60.0
MAX_HELD = 2_000  # entries waiting for the store; past it (a store failing for long) the oldest are dropped
MAX_LIMIT = 100


class NotYours(Exception):
    """The entries asked for exist, but the caller is neither the bundle's author nor the invoker."""


class LogBook:
    def __init__(self, state: Store, cfg: LogsSection) -> None:
        self.state = state
        self.cfg = cfg
        self._held: list[LogEntry] = []
        self.dropped = 0  # entries lost because the store failed for long (said in the warning below)
        self._swept = 0.0

    def note(self, id: str | None, bundle: str, invoker: str | None, kind: str, status: str,
             error: str | None = None, output: str | None = None) -> str | None:
        """Keep a run's entry, if there is anything to see, under ``id`` (None: a new request id,
        for a run no record names). The id kept, or None when nothing was."""
        if output is None and status == "success":
            return None
        if len(self._held) >= MAX_HELD:
            del self._held[0]
            self.dropped += 1
        id = id or new_tid()
        self._held.append(LogEntry(id, bundle, invoker, kind, time.time(), status, error, output))
        return id

    def flush(self) -> None:
        """Write what is held, in one transaction; on a store failure it stays held for the next try."""
        if self._held:
            held, self._held = self._held, []
            try:
                self.state.keep_logs(held)
            except StoreError:
                self._held = held + self._held
                del self._held[:-MAX_HELD]
                raise
        if time.monotonic() - self._swept >= SWEEP_SECONDS:
            self._swept = time.monotonic()
            gone = self.state.forget_logs(time.time() - self.cfg.retention_hours * 3600, self.cfg.max_entries)
            if gone:
                log.debug("old log entries deleted", count=gone)

    async def run(self) -> None:
        """Flush every FLUSH_SECONDS, for as long as the runner runs (under the supervisor)."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except StoreError as e:
                log.warning("could not keep log entries; trying again", error=str(e), held=len(self._held),
                            dropped=self.dropped)

    def read(self, caller: str, *, id: str | None = None, bundle: str | None = None, after: int | None = None,
             limit: int = 50) -> list[LogEntry]:
        """One run's entries (``id``) or one bundle's (``bundle``, its author only), oldest first:
        after the cursor ``after``, or the newest ``limit``. Raises NotYours for entries the
        caller may not read."""
        try:
            self.flush()
        except StoreError:
            pass  # what is stored can still be read
        limit = max(1, min(limit, MAX_LIMIT))
        if bundle is not None:
            if authority(bundle) != caller:
                raise NotYours(f"only the author of {bundle} may read its logs")
            return self.state.logs(bundle=bundle, after=after, limit=limit)
        entries = self.state.logs(id=id, after=after, limit=limit)
        mine = [e for e in entries if caller in (authority(e.bundle), e.invoker)]
        if entries and not mine:
            raise NotYours(f"the logs of {id} are for the bundle's author and the invoker only")
        return mine
