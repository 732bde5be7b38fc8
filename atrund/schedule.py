"""Who runs next: fairness and per-author limits.

Each author has a FIFO queue (their invocations run in the order they arrived). Authors are
served round-robin, so one author flooding a thousand invocations delays another author's
single one by at most a few executions. Work that is not an invocation record (a gateway or XRPC
request) takes one of the same ``concurrency`` slots through ``slot()``, so the executor never
runs more than ``concurrency`` bundles at once, whatever asked for them. Limits, all per author: how many run at once, a token
bucket for how many start per minute, and how many may wait. An invocation over the rate waits;
past the backlog it gets a ``rejected`` result saying why. Nothing is dropped silently.

An optional ``check`` runs on each invocation before it may take a slot (the daemon asks the
author's PDS whether a stale invocation is still posted). It runs on the first CHECK_AHEAD of
each author's queue at once, so a backlog drains at the speed of runs, not of one PDS round trip
per invocation; with its own bounded concurrency, outside the execution slots: a PDS that hangs
delays only its own authors' checks, never the slots everyone else's work needs. One the check
refuses is dropped (the check has recorded why); one it accepts waits for a slot like any other,
and is checked again if it then waited longer than RECHECK_AFTER.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("atrund.schedule")


CHECK_CONCURRENCY = 8
CHECK_AHEAD = 8  # invocations of one author checked ahead of their turn
RECHECK_AFTER = 2.0  # seconds a passed check holds for; the daemon's "stale" is the same


@dataclass
class _Author:
    queue: collections.deque[str] = field(default_factory=collections.deque)
    running: int = 0
    tokens: float = 0.0
    refilled: float = 0.0
    passed: dict[str, float] = field(default_factory=dict)  # queued invocations that passed the check, and when
    checking: set[str] = field(default_factory=set)


class Scheduler:
    def __init__(
        self,
        run: Callable[[str], Awaitable[None]],
        reject: Callable[[str, str], None],
        concurrency: int,
        per_author_concurrency: int = 1,
        per_minute: float = 60.0,
        burst: int = 10,
        backlog: int = 1000,
        check: Callable[[str], Awaitable[bool]] | None = None,
        check_concurrency: int = CHECK_CONCURRENCY,
    ) -> None:
        self._run, self._reject, self._check = run, reject, check
        self._checks = asyncio.Semaphore(check_concurrency)
        self.concurrency = concurrency
        self.per_author_concurrency = per_author_concurrency
        self.rate = per_minute / 60.0
        self.burst = burst
        self.backlog = backlog
        self.authors: dict[str, _Author] = {}
        self.ring: collections.deque[str] = collections.deque()  # authors with something queued
        self.running = 0
        self.tasks: set[asyncio.Task] = set()
        self.checks: set[asyncio.Task] = set()
        self.stopped = False
        self._wake = asyncio.Event()
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()

    def submit(self, author: str, uri: str) -> None:
        a = self.authors.get(author)
        if a is None:
            a = self.authors[author] = _Author(tokens=float(self.burst), refilled=time.monotonic())
        if len(a.queue) >= self.backlog:
            self._reject(uri, f"rate limited: {author} already has {len(a.queue)} invocations waiting on this runner "
                              f"(limit {self.backlog}); post it again later")
            return
        a.queue.append(uri)
        if author not in self.ring:
            self.ring.append(author)
        self._wake.set()

    def queued(self) -> int:
        return sum(len(a.queue) for a in self.authors.values())

    def slot_waiters(self) -> int:
        return sum(1 for f in self._slot_waiters if not f.done())

    @contextlib.asynccontextmanager
    async def slot(self):
        """Hold one execution slot for the block; wait while all are busy.

        A waiting caller gets the next freed slot before queued invocations do: an HTTP caller
        is holding a connection open, an invocation's author is not waiting on a line. The
        gateway's per-bundle rate limit is what keeps that from starving invocations.
        """
        if self.running < self.concurrency and not self._slot_waiters:
            self.running += 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # handed a slot just as the caller gave up
                    self._release()
                else:
                    self._slot_waiters.remove(fut)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self.running -= 1
        self._hand_off()
        self._wake.set()

    def _hand_off(self) -> None:
        while self._slot_waiters and self.running < self.concurrency:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)

    def _refill(self, a: _Author, now: float) -> None:
        a.tokens = min(float(self.burst), a.tokens + (now - a.refilled) * self.rate)
        a.refilled = now

    def _next(self) -> tuple[str | None, float | None]:
        """The next author allowed to start one, or how long until a token frees one up."""
        now = time.monotonic()
        wait: float | None = None
        for _ in range(len(self.ring)):
            author = self.ring[0]
            self.ring.rotate(-1)
            a = self.authors[author]
            if a.running >= self.per_author_concurrency:
                continue
            if not self._head_ready(author, a, now):
                continue
            self._refill(a, now)
            if a.tokens >= 1.0:
                return author, None
            need = (1.0 - a.tokens) / self.rate if self.rate > 0 else 60.0
            wait = need if wait is None else min(wait, need)
        return None, wait

    async def run(self) -> None:
        while not self.stopped:
            started = False
            while self.running < self.concurrency and self.ring:
                author, wait = self._next()
                if author is None:
                    break
                self._start(author)
                started = True
            if started:
                continue
            self._wake.clear()
            _, wait = self._next() if self.ring and self.running < self.concurrency else (None, None)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    def _head_ready(self, author: str, a: _Author, now: float) -> bool:
        """Whether the head of the queue passed its check recently enough; starts the checks of
        the first CHECK_AHEAD that need one (the head's again if its pass is too old)."""
        if self._check is None:
            return True
        head = a.queue[0]
        if now - a.passed.get(head, -RECHECK_AFTER) > RECHECK_AFTER:
            a.passed.pop(head, None)
        for uri in itertools.islice(a.queue, CHECK_AHEAD):
            if uri not in a.passed and uri not in a.checking:
                self._check_one(author, a, uri)
        return head in a.passed

    def _check_one(self, author: str, a: _Author, uri: str) -> None:
        a.checking.add(uri)

        async def check() -> None:
            ok = True
            try:
                async with self._checks:
                    ok = await self._check(uri)
            except Exception:  # noqa: BLE001 - a failed check must not lose the invocation: run it
                log.exception("invocation check failed; running it", uri=uri)
            finally:
                a.checking.discard(uri)
            if ok:
                a.passed[uri] = time.monotonic()
            else:
                with contextlib.suppress(ValueError):
                    a.queue.remove(uri)
                if not a.queue and author in self.ring:
                    self.ring.remove(author)
            self._wake.set()

        task = asyncio.create_task(check())
        self.checks.add(task)
        task.add_done_callback(self.checks.discard)

    def _start(self, author: str) -> None:
        a = self.authors[author]
        uri = a.queue.popleft()
        a.passed.pop(uri, None)
        if not a.queue:
            self.ring.remove(author)
        a.tokens -= 1.0
        a.running += 1
        self.running += 1
        task = asyncio.create_task(self._run(uri))
        self.tasks.add(task)

        def done(t: asyncio.Task, a: _Author = a, author: str = author) -> None:
            self.tasks.discard(t)
            a.running -= 1
            self.running -= 1
            self._hand_off()
            if a.queue and author not in self.ring:
                self.ring.append(author)
            self._wake.set()

        task.add_done_callback(done)

    async def stop(self, grace: float | None = None) -> int:
        """Start nothing more (what waits stays pending for the next start); let running ones
        finish, for at most ``grace`` seconds (None: however long they take), then cancel the
        rest. Returns how many were cancelled."""
        self.stopped = True
        self._wake.set()
        for task in self.checks:
            task.cancel()
        late: set[asyncio.Task] = set()
        if self.tasks and grace is not None:
            _, late = await asyncio.wait(set(self.tasks), timeout=grace)
            for task in late:
                task.cancel()
        await asyncio.gather(*self.tasks, *self.checks, return_exceptions=True)
        return len(late)
