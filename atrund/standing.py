"""Standing records: the schedules and triggers, in authors' repos, addressed to this runner.

Unlike an invocation, which asks for one run, these ask for runs over time, so the runner keeps
the current version of each (atrund.state ``standing``) and follows the author's edits: at each
ingest round it lists the author's collection, and a new record, a new CID (an edit) or a record
gone (a delete) takes effect there. ``Standing`` is that bookkeeping, shared by schedules
(atrund.ticks) and triggers (atrund.triggers), which say what a valid record is and what to do
when one appears, changes or goes.

Each author's standing records are capped (``max_per_author``): the oldest record keys are kept,
the newer ones refused, and listing stops one past the cap, so 10,000 schedules cost the runner
a bounded number of listRecords pages, not 100. A refused record is logged once per version and
counted (``refused``: /metrics and ``atrund status``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from atrund.atproto.repos import Repos
from atrund.atproto.uri import AtUri
from atrund.errors import AtrundError
from atrund.state import Standing, Store

log = structlog.get_logger("atrund.standing")

PAGE = 100
CONCURRENCY = 8  # authors listed at once


class Standings:
    """The standing records of one kind (``schedule`` or ``trigger``) this runner keeps."""

    def __init__(self, kind: str, collection: str, state: Store, repos: Repos, runner_did: str, max_per_author: int,
                 check: Callable[[Any], str | None]) -> None:
        self.kind, self.collection = kind, collection
        self.state, self.repos, self.runner_did = state, repos, runner_did
        self.max_per_author = max_per_author
        self.check = check  # why a record is refused (None: it is taken)
        self.items: dict[str, Standing] = {item.uri: item for item in state.standing(kind)}
        self.refused: dict[str, tuple[str, str]] = {}  # uri -> (cid, why), logged once per version
        self.list_failures = 0
        self._slots = asyncio.Semaphore(CONCURRENCY)

    def authors(self) -> set[str]:
        return {item.author for item in self.items.values()}

    def of(self, author: str) -> list[Standing]:
        return [item for item in self.items.values() if item.author == author]

    async def sync(self, authors: list[str], allows: Callable[[str], bool]) -> tuple[list[Standing], list[Standing]]:
        """One ingest round: stop the records of authors no longer served (``allows``), then list
        the served ones among ``authors``; returns (new or changed, gone)."""
        changed: list[Standing] = []
        gone: list[Standing] = []
        for author in {a for a in self.authors() if not allows(a)}:
            gone += self.forget_author(author)
        for c, g in await asyncio.gather(*(self._sync_one(a) for a in authors if allows(a))):
            changed += c
            gone += g
        return changed, gone

    async def _sync_one(self, author: str) -> tuple[list[Standing], list[Standing]]:
        try:
            async with self._slots:
                listed = await self._list(author)
        except AtrundError as e:  # the author's PDS is down: keep what we have; the next round tries again
            self.list_failures += 1
            log.warning(f"cannot list {self.kind}s; keeping the ones known", author=author, error=str(e))
            return [], []
        return self.update(author, listed)

    def update(self, author: str, listed: list[tuple[str, str, Any]]) -> tuple[list[Standing], list[Standing]]:
        """Take ``author``'s current (uri, cid, value) records addressed to us, oldest key first."""
        changed: list[Standing] = []
        seen = set()
        kept = 0
        for uri, cid, value in listed:
            seen.add(uri)
            known = self.items.get(uri)
            if known is not None and known.cid == cid:
                kept += 1
                continue
            why = self.check(value)
            if why is None and kept >= self.max_per_author:
                why = (f"{author} has more than {self.max_per_author} {self.kind}s on this runner "
                       f"(its limit); the newest are not run")
            if why is not None:
                self._refuse(uri, cid, why)
                if known is not None:  # a valid version became an invalid one: it stops
                    self.drop(known)
                continue
            kept += 1
            self.refused.pop(uri, None)
            item = Standing(uri, author, cid, value, None)
            self.items[uri] = item
            changed.append(item)
        gone = [item for item in self.of(author) if item.uri not in seen]
        for item in gone:
            self.drop(item)
            log.info(f"{self.kind} deleted by its author; stopped", uri=item.uri)
        return changed, gone

    def forget_author(self, author: str) -> list[Standing]:
        """An author no longer served: stop all their records."""
        gone = self.of(author)
        for item in gone:
            self.drop(item)
        return gone

    def drop(self, item: Standing) -> None:
        self.items.pop(item.uri, None)
        withdrawn = self.state.drop_standing(item.uri)
        if withdrawn:
            log.info(f"{self.kind} gone: its runs that had not started are withdrawn", uri=item.uri, withdrawn=withdrawn)

    def _refuse(self, uri: str, cid: str, why: str) -> None:
        if self.refused.get(uri, (None,))[0] != cid:
            log.warning(f"{self.kind} refused", uri=uri, cid=cid, reason=why)
        self.refused[uri] = (cid, why)

    async def _list(self, author: str) -> list[tuple[str, str, Any]]:
        """The author's records of our collection addressed to this runner, oldest key first, and
        at most one past the cap (whatever follows is refused without being listed)."""
        out: list[tuple[str, str, Any]] = []
        cursor = None
        while len(out) <= self.max_per_author:
            records, _ = await self.repos.list_records(author, self.collection, cursor=cursor, limit=PAGE)
            last = cursor
            for rec in records:
                uri, cid, value = (rec.get("uri"), rec.get("cid"), rec.get("value")) if isinstance(rec, dict) else (None,) * 3
                try:
                    at = AtUri.parse(uri)
                except ValueError:
                    continue
                if at.did != author or at.collection != self.collection or not isinstance(cid, str):
                    continue  # a PDS listing another repo's records must not speak for that repo
                last = max(last or at.rkey, at.rkey)
                if isinstance(value, dict) and value.get("runner") == self.runner_did:
                    out.append((uri, cid, value))
            if len(records) < PAGE or last == cursor:
                break
            cursor = last
        return out

    def figures(self) -> dict[str, int]:
        return {"active": len(self.items), "refused": len(self.refused), "list_failures": self.list_failures}


class Follow:
    """The ingest rounds of standing records: every ``interval`` seconds (poll mode: the poll
    interval; firehose mode: the rescan interval), and at once (within a tenth of a second) when
    the firehose sees one of an author's schedule or trigger records change (``touched``). The authors listed: those ingest polls, those the firehose
    saw touch a standing record, and those whose records are kept already (so a delete is seen
    in open mode too, where nobody is polled)."""

    def __init__(self, syncs: list[tuple[Callable[[list[str]], Awaitable[None]], Callable[[], set[str]]]],
                 authors: Callable[[], list[str]], interval: float) -> None:
        self.syncs, self.authors, self.interval = syncs, authors, interval
        self._touched: set[str] = set()
        self._wake = asyncio.Event()

    def touched(self, did: str) -> None:
        self._touched.add(did)
        self._wake.set()

    async def run(self) -> None:
        while True:
            authors = set(self.authors()) | self._touched
            for _, known in self.syncs:
                authors |= known()
            self._touched = set()
            self._wake.clear()
            for sync, _ in self.syncs:
                await sync(sorted(authors))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
                await asyncio.sleep(0.1)  # let a burst of changes gather
            except asyncio.TimeoutError:
                pass
