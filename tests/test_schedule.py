"""The scheduler, with real asyncio and real time: fairness across authors, order within one,
rate and concurrency limits, backlog rejections, and stopping."""

import asyncio
import time

from atrund.schedule import Scheduler


def make(**limits):
    started: list[tuple[str, float]] = []
    rejected: list[tuple[str, str]] = []

    async def run(uri: str) -> None:
        started.append((uri, time.monotonic()))
        await asyncio.sleep(0.05)

    s = Scheduler(run, lambda uri, why: rejected.append((uri, why)), **limits)
    return s, started, rejected


async def settle(s: Scheduler, started: list, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(started) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_a_flood_does_not_starve_another_author():
    s, started, _ = make(concurrency=2, per_author_concurrency=1, per_minute=6000, burst=100)
    for i in range(20):
        s.submit("did:a", f"a{i}")
    s.submit("did:b", "b0")
    task = asyncio.create_task(s.run())
    await settle(s, started, 21)
    task.cancel()
    order = [uri for uri, _ in started]
    assert order.index("b0") <= 2, order  # within a few executions, not after twenty
    assert [u for u in order if u.startswith("a")] == [f"a{i}" for i in range(20)]  # one author: in order


async def test_rate_limit_spaces_starts():
    s, started, _ = make(concurrency=4, per_author_concurrency=4, per_minute=60, burst=1)
    for i in range(3):
        s.submit("did:a", f"a{i}")
    task = asyncio.create_task(s.run())
    await settle(s, started, 3)
    task.cancel()
    times = [t for _, t in started]
    assert len(times) == 3 and times[1] - times[0] >= 0.9 and times[2] - times[1] >= 0.9


async def test_backlog_past_the_limit_is_rejected_with_a_reason():
    s, started, rejected = make(concurrency=1, backlog=3)
    for i in range(5):
        s.submit("did:a", f"a{i}")
    assert [u for u, _ in rejected] == ["a3", "a4"]
    assert "rate limited: did:a already has 3 invocations waiting" in rejected[0][1]
    s.submit("did:b", "b0")  # the limit is per author
    assert len(rejected) == 2


async def test_stop_starts_nothing_more():
    s, started, _ = make(concurrency=1)
    for i in range(5):
        s.submit("did:a", f"a{i}")
    task = asyncio.create_task(s.run())
    await settle(s, started, 1)
    await s.stop()
    await asyncio.sleep(0.2)
    task.cancel()
    assert len(started) <= 2 and s.queued() >= 3


async def test_checks_run_ahead_of_the_queue_and_a_refused_one_is_dropped_in_place():
    """A backlog drains at the speed of runs, not one check round trip per invocation: the
    invocations next in line are checked at once (up to CHECK_AHEAD), one author's order holds,
    and one the check refuses (deleted while it waited) never runs."""
    from atrund.schedule import CHECK_AHEAD

    in_flight, most = 0, 0

    async def check(uri: str) -> bool:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return uri != "a3"

    started: list[str] = []

    async def run(uri: str) -> None:
        started.append(uri)

    s = Scheduler(run, lambda uri, why: None, concurrency=4, per_author_concurrency=1, per_minute=60000, burst=1000,
                  check=check)
    for i in range(20):
        s.submit("did:a", f"a{i}")
    task = asyncio.create_task(s.run())
    deadline = time.monotonic() + 10
    while len(started) < 19 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()
    assert started == [f"a{i}" for i in range(20) if i != 3]
    assert most == CHECK_AHEAD  # checked ahead, within the bound, not one at a time
