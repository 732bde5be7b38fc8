"""Polling ingest: list each watched author's new dev.atrun.invocation records.

The per-author cursor is the last record key seen (listRecords in ascending key order), and it
moves in the same SQLite transaction that stores the page's invocations, so a crash between
the two can neither skip nor repeat one.

A listing is not a proof: a PDS can list anything. Every listed invocation for this runner
that the store does not hold yet (or holds pending, so at a CID that may change) is fetched
again with com.atproto.sync.getRecord and proven against the author's signed commit, as a
firehose frame is (atrund.atproto.repos.get_proven_record); the proven record and CID are what
is stored, never the listed ones. A record the signed repo does not hold, or an answer that
does not prove itself, is refused, logged and counted (``unproven``), and the poll moves on.
Records stored before are recognised without a request, so a reconciliation costs no proofs;
the proofs of one page are fetched side by side (``PROOFS`` at a time).

Authors are polled side by side with bounded concurrency, and each one's failure is its own: an
author whose PDS is down, or whose repo holds something the poller cannot take, is logged,
counted (``failures``) and reported on /healthz by name, and the others are polled as usual. A
listed record that breaks processing is quarantined (atrund.quarantine) and passed, so it cannot
hold up the author's later invocations.
"""

from __future__ import annotations

import asyncio
import collections
import time

import structlog

from atrund.atproto.repos import Repos
from atrund.atproto.uri import AtUri
from atrund.errors import AtrundError, NotFound, ProofError
from atrund.health import Health
from atrund.ingest import Intake, Row
from atrund.records import INVOCATION

log = structlog.get_logger("atrund.ingest")

PAGE = 100  # listRecords' maximum page
MAX_PAGES = 20  # per author per round
RECONCILE_PAGES = 1000  # a full rescan of one author's invocations (100,000 records)
CONCURRENCY = 16  # authors polled at once (one listRecords each in flight); the others wait for a slot
PROOFS = 16  # sync.getRecord proofs in flight at once, over all authors


def _fields(rec: object) -> tuple[str | None, str | None, object]:
    if not isinstance(rec, dict):
        return None, None, None
    uri, cid = rec.get("uri"), rec.get("cid")
    # AT URIs and CIDs are ASCII: anything else (a lone surrogate a PDS sent as JSON) could not
    # even be stored, and would fail this author's polls at the same page for good.
    return ((uri if isinstance(uri, str) and uri.isascii() else None), (cid if isinstance(cid, str) and cid.isascii() else None),
            rec.get("value"))


def _own_rkey(uri: str | None, author: str) -> str | None:
    """The record key if ``uri`` is an invocation in ``author``'s repo, else None."""
    try:
        parsed = AtUri.parse(uri)
    except ValueError:
        return None
    return parsed.rkey if parsed.did == author and parsed.collection == INVOCATION else None


class Poller:
    def __init__(self, repos: Repos, intake: Intake, authors: list[str], interval: float,
                 reconcile_interval: float = 300.0, health: Health | None = None) -> None:
        self.repos = repos
        self.intake = intake
        self.authors = authors
        self.interval = interval
        self.reconcile_interval = reconcile_interval
        self.health = health or Health()
        self.failures: collections.Counter[str] = collections.Counter()  # failed polls per author (/metrics)
        self.unproven = 0  # listed invocations refused or replaced by the signed version (/metrics)
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._proofs = asyncio.Semaphore(PROOFS)

    async def poll_author(self, author: str, reconcile: bool = False) -> int:
        """Take every new invocation from one author's repo; returns how many are to run.

        ``reconcile`` lists the collection from its start instead of from the cursor (and
        leaves the cursor where it is): it catches records that appeared behind the cursor,
        which a PDS committing concurrent writes out of key order, or an author choosing an
        old record key, can cause. Whatever was seen before is recognised and skipped.
        """
        source = f"poll:{author}"
        found = 0
        scan_cursor: str | None = None
        for _ in range(RECONCILE_PAGES if reconcile else MAX_PAGES):
            cursor = scan_cursor if reconcile else self.intake.state.cursor(source)
            records, _ = await self.repos.list_records(author, INVOCATION, cursor=cursor, limit=PAGE)
            candidates, last_rkey = [], cursor
            for rec in records:
                uri, cid, value = _fields(rec)
                rkey = _own_rkey(uri, author)
                if rkey is None or cid is None:
                    # A PDS listing another repo's records (or garbage) must not be able to
                    # put words in someone else's mouth: only this author's invocations count.
                    log.warning("ignoring a listed record that is not this author's invocation", author=author, uri=uri)
                    continue
                last_rkey = max(last_rkey or rkey, rkey)
                verdict = self._verdict(uri, cid, value)
                if verdict is not None:
                    candidates.append((uri, rkey, cid, value, verdict))
            if last_rkey == cursor:
                return found  # nothing new (also guards against a PDS that ignores the cursor)
            rows = await self._proven_rows(author, candidates)
            scan_cursor = last_rkey
            found += self.intake.accept(source, None if reconcile else last_rkey, rows)
            if len(records) < PAGE:
                return found
        return found  # more next round: one author cannot hold the poller for ever

    def _verdict(self, uri: str, cid: str, value: object) -> str | None:
        """The intake's verdict on a listed record; one that breaks it is quarantined (None), so it
        cannot stop the author's polls for good."""
        try:
            return self.intake.verdict(uri, value)
        except Exception as e:  # noqa: BLE001 - whatever the record holds
            self.intake.hold("record", uri, {"uri": uri, "cid": cid, "value": value}, f"{type(e).__name__}: {e}")
            return None

    async def _proven_rows(self, author: str, candidates: list[tuple[str, str, str, object, str]]) -> list[Row]:
        """The listed ``(uri, rkey, cid, value, verdict)`` as rows to store, each one the store has
        not seen proven first (PROOFS at a time, over all authors), in the listing's order. Whatever
        fails but a proof itself (the PDS, the DID document, the store) fails this author's poll:
        the cursor stays, and the next round retries."""
        async def row(uri: str, rkey: str, cid: str, value: object, verdict: str) -> Row | None:
            if not self._unseen(uri, cid):
                return uri, author, cid, value, verdict
            async with self._proofs:
                proven = await self._prove(author, uri, rkey, cid, value)
            if proven is None:
                return None
            cid, value = proven
            verdict = self._verdict(uri, cid, value)
            return None if verdict is None else (uri, author, cid, value, verdict)

        done = await asyncio.gather(*(row(*c) for c in candidates), return_exceptions=True)
        if failed := next((r for r in done if isinstance(r, BaseException)), None):
            raise failed
        return [r for r in done if r is not None]

    def _unseen(self, uri: str, cid: str) -> bool:
        """Whether a listed invocation needs a proof: not stored yet, stored pending at another
        CID (a changed record key), or withdrawn. A finished or denied invocation, or a pending
        one at the CID listed, is recognised without a request: reconciliations prove nothing new."""
        known = self.intake.state.status_of(uri)
        if known is None or known[0] == "withdrawn":
            return True
        if known[0] != "pending":
            return False
        stored = self.intake.state.pending(uri)
        return stored is None or stored.cid != cid

    async def _prove(self, author: str, uri: str, rkey: str, cid: str, value: object) -> tuple[str, dict] | None:
        """``(cid, record)`` as the author's signed repo holds the listed invocation; None (logged,
        counted) when it holds none there or the PDS's answer does not prove itself."""
        try:
            proven_cid, proven = await self.repos.get_proven_record(author, INVOCATION, rkey)
        except (ProofError, NotFound) as e:
            self.unproven += 1
            log.warning("listed invocation refused: the author's signed repo does not prove it", author=author, uri=uri,
                        error=str(e))
            return None
        if (proven_cid, proven) != (cid, value):
            # A PDS that doctors its listing (or a record changed since it was listed): what runs
            # is what the author signed.
            self.unproven += 1
            log.warning("listed invocation differs from the author's signed repo; the signed version is taken",
                        author=author, uri=uri, listed_cid=cid, proven_cid=proven_cid)
        return proven_cid, proven

    async def poll_once(self, reconcile: bool = False) -> int:
        authors = list(self.authors)  # the daemon may replace the list while this round runs
        found = sum(await asyncio.gather(*(self._poll_one(a, reconcile) for a in authors)))
        self.health.clear_prefix("poll:", keep={f"poll:{a}" for a in authors})  # authors no longer polled
        return found

    async def _poll_one(self, author: str, reconcile: bool) -> int:
        """One author's poll, its failure its own: logged, counted, on /healthz until it works again."""
        try:
            async with self._slots:
                found = await self.poll_author(author, reconcile)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever happened, the other authors are polled
            self.failures[author] += 1
            if isinstance(e, AtrundError):
                detail = str(e)
                log.warning("poll failed", author=author, error=detail)
            else:
                detail = f"{type(e).__name__}: {e}"
                log.exception("poll failed unexpectedly", author=author)
            self.health.problem(f"poll:{author}", f"polls of {author} fail: {detail[:300]}")
            return 0
        self.health.clear(f"poll:{author}")
        return found

    async def run(self) -> None:
        last_reconcile = time.monotonic()
        while True:
            reconcile = time.monotonic() - last_reconcile >= self.reconcile_interval
            found = await self.poll_once(reconcile)
            if reconcile:
                last_reconcile = time.monotonic()
                if found:
                    log.warning("reconciliation found invocations the cursor had passed", found=found)
            await asyncio.sleep(self.interval)
