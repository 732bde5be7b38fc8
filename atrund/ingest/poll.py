"""Polling ingest: list each watched author's new dev.atrun.invocation records.

The per-author cursor is the last record key seen (listRecords in ascending key order), and it
moves in the same SQLite transaction that stores the page's invocations, so a crash between
the two can neither skip nor repeat one.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from atrund.errors import AtrundError
from atrund.ingest import Intake
from atrund.records import INVOCATION
from atrund.repos import Repos

log = structlog.get_logger("atrund.ingest")

PAGE = 100  # listRecords' maximum page
MAX_PAGES = 20  # per author per round
RECONCILE_PAGES = 1000  # a full rescan of one author's invocations (100,000 records)


def _fields(rec: object) -> tuple[str | None, str | None, object]:
    if not isinstance(rec, dict):
        return None, None, None
    uri, cid = rec.get("uri"), rec.get("cid")
    return (uri if isinstance(uri, str) else None), (cid if isinstance(cid, str) else None), rec.get("value")


def _own_rkey(uri: str | None, author: str) -> str | None:
    """The record key if ``uri`` is an invocation in ``author``'s repo, else None."""
    prefix = f"at://{author}/{INVOCATION}/"
    if uri is None or not uri.startswith(prefix):
        return None
    rkey = uri[len(prefix):]
    return rkey if rkey and "/" not in rkey else None


class Poller:
    def __init__(self, repos: Repos, intake: Intake, authors: list[str], interval: float,
                 reconcile_interval: float = 300.0) -> None:
        self.repos = repos
        self.intake = intake
        self.authors = authors
        self.interval = interval
        self.reconcile_interval = reconcile_interval

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
            rows, last_rkey = [], cursor
            for rec in records:
                uri, cid, value = _fields(rec)
                rkey = _own_rkey(uri, author)
                if rkey is None or cid is None:
                    # A PDS listing another repo's records (or garbage) must not be able to
                    # put words in someone else's mouth: only this author's invocations count.
                    log.warning("ignoring a listed record that is not this author's invocation", author=author, uri=uri)
                    continue
                last_rkey = max(last_rkey or rkey, rkey)
                verdict = self.intake.verdict(uri, value)
                if verdict is not None:
                    rows.append((uri, author, cid, value, verdict))
            if last_rkey == cursor:
                return found  # nothing new (also guards against a PDS that ignores the cursor)
            scan_cursor = last_rkey
            found += self.intake.accept(source, None if reconcile else last_rkey, rows)
            if len(records) < PAGE:
                return found
        return found  # more next round: one author cannot hold the poller for ever

    async def poll_once(self, reconcile: bool = False) -> int:
        authors = list(self.authors)  # the daemon may replace the list while this round runs
        results = await asyncio.gather(*(self.poll_author(a, reconcile) for a in authors), return_exceptions=True)
        found = 0
        for author, res in zip(authors, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, AtrundError):
                    log.error("poll failed unexpectedly", author=author, error=f"{type(res).__name__}: {res}")
                else:
                    log.warning("poll failed", author=author, error=str(res))
            else:
                found += res
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
