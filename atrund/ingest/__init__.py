"""Ingest: how invocation records reach the runner (polling, or a firehose).

Every source hands its records to one ``Intake``, so what counts as "ours" and "allowed", and
how accepted invocations are stored (with the source's cursor) and queued, is decided in one
place whatever the source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from atrund.access import AccessPolicy
from atrund.atproto.uri import authority
from atrund.errors import AtrundError
from atrund.ingest.inactive import InactiveAccounts
from atrund.quarantine import Quarantine
from atrund.state import Store

log = structlog.get_logger("atrund.ingest")

Row = tuple[str, str, str, Any, str]  # uri, author, cid, value, verdict


def classify(author: str, value: Any, runner_did: str, policy: AccessPolicy) -> str | None:
    """``pending`` (run it), ``denied`` (the author may not use this runner) or None (not ours).

    An invocation is ours when its ``runner`` field is our DID; a record without a readable
    runner field cannot be addressed to us, so it is ignored rather than answered.
    """
    if not isinstance(value, dict) or value.get("runner") != runner_did:
        return None
    return "pending" if policy.allows(author) else "denied"


class Intake:
    def __init__(self, state: Store, runner_did: str, policy: AccessPolicy, on_new: Callable[[str], None],
                 quarantine: Quarantine | None = None, on_reused: Callable[[str, str, str, Any], None] | None = None) -> None:
        self.state = state
        self.on_reused = on_reused
        self.quarantine = quarantine
        self.runner_did = runner_did
        self.policy = policy
        self.on_new = on_new
        self.denied = 0
        self.accepted = 0  # new invocations stored to run (/metrics)
        # Authors whose accounts the network reports inactive (taken down, suspended,
        # deactivated): their invocations are not taken, by the stream or the poll rescan.
        self.inactive = InactiveAccounts(state)

    def verdict(self, uri: str, value: Any) -> str | None:
        """classify(), and None for an author reported inactive. ``uri`` is a record's AT URI
        (ValueError if it is not)."""
        author = authority(uri)
        if author in self.inactive:
            return None
        return classify(author, value, self.runner_did, self.policy)

    def accept(self, source: str, cursor: str | None, rows: list[Row], withdrawn: list[str] = ()) -> int:
        """Store ``rows``, withdraw the pending invocations whose records were deleted, and move
        ``source``'s cursor (None: leave it), atomically; queue the new pending ones, count and log
        the new denied ones. Returns how many were queued."""
        verdicts = {row[0]: row[4] for row in rows}
        found = 0
        reused: list[tuple[str, str, str, Any]] = []
        new = self.state.accept_page(source, cursor, rows, withdrawn, reused if self.on_reused else None)
        for uri in new:
            if verdicts[uri] == "denied":
                self.denied += 1
                log.warning("invocation denied by access policy", uri=uri, mode=self.policy.mode)
            else:
                found += 1
                self.accepted += 1
                self.on_new(uri)
        for uri, author, cid, value in reused:  # after the new ones: a failure here must not keep them off the queue
            try:
                self.on_reused(uri, author, cid, value)
            except Exception as e:  # noqa: BLE001 - the still-posted check refuses the old version later anyway
                log.warning("could not refuse a reused record key now; it is refused when it comes up", uri=uri, error=str(e))
        return found

    def hold(self, kind: str, key: str, item: Any, reason: str) -> None:
        """Quarantine one item a source could not process (atrund.quarantine); the source moves on."""
        log.error("ingest: item quarantined", kind=kind, key=key, reason=reason)
        if self.quarantine is not None:
            try:
                self.quarantine.add(kind, key, item, reason)
            except AtrundError as e:  # the quarantine file fails: the item is in the log line above, and skipped
                log.error("cannot quarantine an item; skipped", kind=kind, key=key, error=str(e))

    def retake(self, item: dict[str, Any]) -> int:
        """Take a quarantined listed record again (``atrund quarantine retry``), as a poll would."""
        uri, cid, value = item.get("uri"), item.get("cid"), item.get("value")
        try:
            author = authority(uri)
        except ValueError:
            author = None
        verdict = self.verdict(uri, value) if author else None
        if verdict is None or not isinstance(cid, str):
            log.info("quarantined record retried: not an invocation for this runner; nothing to do", uri=uri)
            return 0
        return self.accept(f"retry:{author}", None, [(uri, author, cid, value, verdict)])

