"""Polling ingest: list each watched author's new dev.atrun.invocation records.

The per-author cursor is the last record key seen (listRecords in ascending key order), and it
moves in the same SQLite transaction that stores the page's invocations, so a crash between
the two can neither skip nor repeat one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from atrund.access import AccessPolicy
from atrund.errors import AtrundError
from atrund.ingest import classify
from atrund.records import INVOCATION
from atrund.repos import Repos
from atrund.state import State

log = structlog.get_logger("atrund.ingest")


class Poller:
    def __init__(
        self,
        repos: Repos,
        state: State,
        runner_did: str,
        policy: AccessPolicy,
        authors: list[str],
        interval: float,
        on_new: Callable[[str], None],
    ) -> None:
        self.repos = repos
        self.state = state
        self.runner_did = runner_did
        self.policy = policy
        self.authors = authors
        self.interval = interval
        self.on_new = on_new
        self.denied = 0

    async def poll_author(self, author: str) -> int:
        source = f"poll:{author}"
        found = 0
        while True:
            cursor = self.state.cursor(source)
            records, _ = await self.repos.list_records(author, INVOCATION, cursor=cursor)
            if not records:
                return found
            rows = []
            for rec in records:
                verdict = classify(rec["uri"], rec.get("value"), self.runner_did, self.policy)
                if verdict is not None:
                    rows.append((rec["uri"], author, rec["cid"], rec["value"], verdict))
            last_rkey = records[-1]["uri"].rsplit("/", 1)[-1]
            for uri in self.state.accept_page(source, last_rkey, rows):
                verdict = next(r[4] for r in rows if r[0] == uri)
                if verdict == "denied":
                    self.denied += 1
                    log.warning("invocation denied by access policy", uri=uri, author=author, mode=self.policy.mode)
                else:
                    found += 1
                    self.on_new(uri)

    async def poll_once(self) -> int:
        results = await asyncio.gather(*(self.poll_author(a) for a in self.authors), return_exceptions=True)
        found = 0
        for author, res in zip(self.authors, results, strict=True):
            if isinstance(res, AtrundError):
                log.warning("poll failed", author=author, error=str(res))
            elif isinstance(res, BaseException):
                raise res
            else:
                found += res
        return found

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)
