"""Schedules: dev.atrun.schedule records turned into runs at their times.

    schedule records ─ sync (each ingest round) ─▶ Standings ─▶ timetable (atrund.timetable)
                                                                    │ due (+ jitter)
    tick loop ─ access check ─ state.add_ticks (pending runs + next ticks, one transaction) ─▶ submit

A tick is a row of the same ``invocations`` table an invocation record makes, keyed by
records.tick_key(schedule URI, scheduled time), and ``submit`` queues it on atrund.runs: so it
takes the same path (the fairness and per-author limits of atrund.schedule, the claim that runs
it at most once, an ``interrupted`` result if the runner stops while it runs, its result at
result_rkey(tick key)). ``add_ticks`` inserts a tick only if it is new, in the same
transaction that moves the schedule to its next tick (the ticks due together share it): across restarts (and a crash between any
two steps) a tick is stored once, so it runs at most once.

Missed ticks: at start-up, a schedule whose next tick passed while the runner was down follows
its ``catchUp``: ``latest`` (default) runs the most recent missed tick once, ``none`` skips to
the next tick after now. A runner that falls behind while serving (a slow loop) runs the latest
due tick too: never a burst of old ones.

Operator limits ([schedules]): a timetable that may tick more often than
``min_interval_seconds`` is refused, as are an author's schedules past ``max_per_author``;
each schedule starts a fixed ``hash(URI) mod (jitter_seconds + 1)`` seconds after its scheduled
time, so a thousand ``0 * * * *`` schedules spread over the window instead of starting in one
second (the scheduled time, and so the result key, is not moved). Access is checked at every
tick: a blocked author's schedules stop ticking (their ticks are skipped, not queued), and the
tick is checked again when it starts, as every queued invocation is.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from atrund.access import AccessPolicy
from atrund.atproto.repos import Repos
from atrund.config import SchedulesSection
from atrund.errors import InvalidSchedule
from atrund.records import SCHEDULE, tick_key, utc_second
from atrund.standing import Standings
from atrund.state import Standing, Store
from atrund.timetable import Timetable

log = structlog.get_logger("atrund.ticks")

MAX_SLEEP = 5.0  # seconds: the tick loop looks again at least this often (a clock that jumped)


class Ticks:
    def __init__(self, state: Store, repos: Repos, policy: AccessPolicy, runner_did: str, submit: Callable[[str], None],
                 settings: SchedulesSection, clock: Callable[[], float] = time.time) -> None:
        self.state, self.policy, self.runner_did, self.submit = state, policy, runner_did, submit
        self.settings = settings
        self.clock = clock  # injected only by tests that walk across a daylight-saving change
        self.standings = Standings("schedule", SCHEDULE, state, repos, runner_did, settings.max_per_author, self._problem)
        self.timetables: dict[str, Timetable] = {}
        self.ticks = 0  # ticks queued
        self.skipped = 0  # ticks not run: missed while down (catchUp none, or older than latest), or author blocked
        self._wake = asyncio.Event()

    # -- what the schedules are -----------------------------------------------------------

    def _problem(self, value: Any) -> str | None:
        try:
            table = Timetable.of(value)
        except InvalidSchedule as e:
            return str(e)
        gap = table.shortest_gap(self.clock())
        if gap < self.settings.min_interval_seconds:
            return (f"ticks {gap:.0f} s apart; this runner's minimum is {self.settings.min_interval_seconds} s "
                    f"([schedules] min_interval_seconds)")
        return None

    def recover(self) -> None:
        """At start-up: read the stored schedules and apply each one's catchUp to the ticks missed
        while the runner was down."""
        now = self.clock()
        for item in list(self.standings.items.values()):
            try:
                table = self.timetables[item.uri] = Timetable.of(item.value)
            except InvalidSchedule:  # stored by an older version that took it: stop it
                self.standings.drop(item)
                continue
            if item.next_at is not None and item.next_at <= now:
                if table.catch_up == "none":
                    self._move(item, table.next_after(now))
                    self.skipped += 1
                    log.info("ticks missed while the runner was down are skipped (catchUp none)", uri=item.uri)
                else:
                    latest = table.latest_until(now)
                    if latest is not None and latest > item.next_at:
                        self._move(item, latest)
                        self.skipped += 1

    async def sync(self, authors: list[str]) -> None:
        """One ingest round: take new, edited and deleted schedules of ``authors`` (and stop the
        schedules of authors no longer served)."""
        changed, gone = await self.standings.sync(authors, self.policy.allows)
        now = self.clock()
        for item in changed:
            table = self.timetables[item.uri] = Timetable.of(item.value)
            self._move(item, table.next_after(now))  # an edit takes effect from the next tick on
            log.info("schedule taken", uri=item.uri, cid=item.cid, next=_when(self.standings.items[item.uri].next_at))
        for item in gone:
            self.timetables.pop(item.uri, None)
        if changed or gone:
            self._wake.set()

    def _move(self, item: Standing, next_at: float | None) -> None:
        moved = Standing(item.uri, item.author, item.cid, item.value, next_at)
        self.state.keep_standing("schedule", moved)
        self.standings.items[item.uri] = moved

    def jitter(self, uri: str) -> int:
        """This schedule's fixed start offset within the jitter window (seconds)."""
        window = self.settings.jitter_seconds
        return 0 if window == 0 else int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big") % (window + 1)

    # -- the tick loop --------------------------------------------------------------------

    def due(self, now: float) -> float | None:
        """Queue every tick due at ``now`` (stored in one transaction); returns the seconds until
        the next one is due."""
        wait = None
        ticks = []
        for item in list(self.standings.items.values()):
            if item.next_at is None:
                continue
            start = item.next_at + self.jitter(item.uri)
            if start <= now:
                tick = self._tick(item, now)
                if tick is not None:
                    ticks.append(tick)
                item = self.standings.items[item.uri]
                if item.next_at is None:
                    continue
                start = item.next_at + self.jitter(item.uri)
            wait = start - now if wait is None else min(wait, start - now)
        if ticks:
            for key in self.state.add_ticks(ticks):
                self.ticks += 1
                self.submit(key)
        return None if wait is None else max(0.0, wait)

    def _tick(self, item: Standing, now: float) -> tuple[Standing, str, dict[str, Any], float | None] | None:
        """The tick of ``item`` due at ``now`` (to store), or None if it is skipped; moves the
        schedule on to its next tick in memory (in the store with the tick)."""
        table = self.timetables.get(item.uri) or Timetable.of(item.value)
        scheduled = item.next_at
        latest = table.latest_until(now - self.jitter(item.uri))
        if latest is not None and latest > scheduled:  # fell behind: the latest due tick only
            self.skipped += 1
            scheduled = latest
        next_at = table.next_after(scheduled)
        if not self.policy.allows(item.author):  # checked at every tick: a blocked author's schedules stop
            self.skipped += 1
            self._move(item, next_at)
            log.info("schedule tick skipped: its author is not served", uri=item.uri, scheduled=utc_second(scheduled))
            return None
        self.standings.items[item.uri] = Standing(item.uri, item.author, item.cid, item.value, next_at)
        return item, tick_key(item.uri, scheduled), self._run_value(item, table, scheduled), next_at

    def _run_value(self, item: Standing, table: Timetable, scheduled: float) -> dict[str, Any]:
        """What the tick runs: the schedule's call as an invocation (atrund.pipeline checks it as
        one), with the tick in args, and where its result goes (``origin``: atrund.runs)."""
        rec = table.record
        when = utc_second(scheduled)
        ref = {"uri": item.uri, "cid": item.cid}
        return {"runner": rec.runner, "bundle": rec.bundle.to_record(), "endpoint": rec.endpoint, "createdAt": when,
                "args": {**(rec.args or {}), "schedule": {**ref, "scheduledAt": when}},
                "origin": {"schedule": ref, "scheduledAt": when}}

    async def run(self) -> None:
        while True:
            wait = self.due(self.clock())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(wait if wait is not None else MAX_SLEEP, MAX_SLEEP))
            except asyncio.TimeoutError:
                pass

    def figures(self) -> dict[str, Any]:
        return {**self.standings.figures(), "ticks": self.ticks, "skipped": self.skipped}

    def next_run(self, uri: str) -> float | None:
        item = self.standings.items.get(uri)
        return None if item is None or item.next_at is None else item.next_at + self.jitter(uri)


def _when(t: float | None) -> str | None:
    return None if t is None else utc_second(t)
