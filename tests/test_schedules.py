"""dev.atrun.schedule against the real local PDS: ticks on time, at most once across restarts,
edits, deletes, blocked authors, operator limits; and the timetable across daylight-saving changes."""

import asyncio
import math
import time
from datetime import datetime, timezone

import pytest
from conftest import no_result, wait_result

from atrund import client
from atrund.access import PolicyFile
from atrund.atproto.uri import TID_ALPHABET
from atrund.errors import InvalidSchedule
from atrund.records import SCHEDULE, Result, result_rkey, tick_key, utc_second
from atrund.timetable import Timetable

TICKED = '''
def main(args):
    return {"scheduledAt": args["schedule"]["scheduledAt"], "hello": args.get("name")}
'''
FAST = {"min_interval_seconds": 1, "jitter_seconds": 0}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def schedule(author, bundle, runner, **fields) -> str:
    uri, _ = await client.create_schedule(author.session, author.repos, bundle["uri"], runner.did, "main", cid=bundle["cid"],
                                          **fields)
    return uri


def _tid_value(tid: str) -> int:
    return sum(TID_ALPHABET.index(c) << (5 * i) for i, c in enumerate(reversed(tid)))


def _tid(value: int) -> str:
    return "".join(TID_ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(13)))


async def taken(runner, uri: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while uri not in runner.app.ticks.standings.items:
        assert time.monotonic() < deadline, f"{uri} was not taken by the runner"
        await asyncio.sleep(0.1)


async def test_an_interval_schedule_runs_on_time_at_the_computed_key(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]}, schedules=FAST)
    bundle = await author.publish(TICKED)
    start = math.ceil(time.time()) + 3
    uri = await schedule(author, bundle, runner, interval_seconds=60, start_at=iso(start), args={"name": "ada"})
    key = tick_key(uri, start)
    assert key == f"{uri}#{utc_second(start)}"  # what any client computes (docs/protocol.md)
    value = await wait_result(reader, runner.did, key, timeout=20)
    result = Result.model_validate(value)
    assert result.status == "success" and result.invocation is None
    assert result.schedule.uri == uri and result.scheduled_at == utc_second(start)
    assert result.value() == {"scheduledAt": utc_second(start), "hello": "ada"}
    assert utc(result.created_at) - start < 5  # on time (the drift bench measures it closely)
    assert runner.app.ticks.next_run(uri) == start + 60
    listed = await client.results_of(reader, uri)  # the runner read from the schedule
    assert [(r["uri"], r["scheduledAt"]) for r in listed] == [(f"at://{runner.did}/dev.atrun.result/{result_rkey(key)}", utc_second(start))]


async def test_a_cron_schedule_in_a_time_zone_across_the_spring_dst_change(author, make_runner, reader):
    """Injected clock (and only here): the runner's schedule clock is set to 2027-03-28 00:59:58 UTC,
    two seconds before Berlin's clocks jump from 02:00 to 03:00, and runs on from there at the
    real pace; nothing else of the runner is touched. 02:30 does not exist that night, so the
    tick runs at 03:00 CEST (01:00 UTC), as Debian's cron does; the next is 02:30 CEST the day after."""
    runner = await make_runner(access={"allowlist": [author.account.did]}, schedules=FAST)
    base, t0 = utc("2027-03-28T00:59:58Z"), time.time()
    runner.app.ticks.clock = lambda: base + (time.time() - t0)
    bundle = await author.publish(TICKED)
    uri = await schedule(author, bundle, runner, cron="30 2 * * *", timezone="Europe/Berlin")
    value = await wait_result(reader, runner.did, tick_key(uri, utc("2027-03-28T01:00:00Z")), timeout=20)
    assert Result.model_validate(value).scheduled_at == "2027-03-28T01:00:00Z"
    assert runner.app.ticks.next_run(uri) == utc("2027-03-29T00:30:00Z")


def test_the_timetable_across_the_autumn_dst_change():
    """No clock: pure arithmetic. An hourly cron runs at both 02:00s of the repeated hour (two
    instants), a daily 02:30 runs once; a cron in UTC ignores the change."""
    base = {"runner": "did:plc:r", "endpoint": "main", "createdAt": "2026-01-01T00:00:00Z",
            "bundle": {"uri": "at://did:plc:a/dev.atrun.bundle/b", "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}
    hourly = Timetable.of({**base, "cron": "0 * * * *", "timezone": "Europe/Berlin"})
    t, ticks = utc("2026-10-24T23:30:00Z"), []
    for _ in range(4):
        t = hourly.next_after(t)
        ticks.append(utc_second(t))
    assert ticks == ["2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z", "2026-10-25T02:00:00Z", "2026-10-25T03:00:00Z"]
    daily = Timetable.of({**base, "cron": "30 2 * * *", "timezone": "Europe/Berlin"})
    first = daily.next_after(utc("2026-10-24T12:00:00Z"))
    assert utc_second(first) == "2026-10-25T00:30:00Z"  # 02:30 CEST, the first of the two
    assert utc_second(daily.next_after(first)) == "2026-10-26T01:30:00Z"  # 02:30 CET
    assert daily.latest_until(utc("2026-10-25T01:45:00Z")) == first  # the repeated 02:30 CET is not a second tick
    with pytest.raises(InvalidSchedule, match="time zone"):
        Timetable.of({**base, "cron": "0 * * * *", "timezone": "Mars/Olympus"})
    with pytest.raises(InvalidSchedule, match="exactly one"):
        Timetable.of({**base, "cron": "0 * * * *", "intervalSeconds": 60})


async def test_a_restart_across_ticks_runs_the_latest_once_or_none(author, make_runner, reader, new_account):
    account = new_account("runner")
    runner = await make_runner(account, access={"allowlist": [author.account.did]}, schedules=FAST)
    bundle = await author.publish(TICKED)
    t0 = math.ceil(time.time()) + 6
    latest = await schedule(author, bundle, runner, interval_seconds=4, start_at=iso(t0))
    skipped = await schedule(author, bundle, runner, interval_seconds=4, start_at=iso(t0), catch_up="none")
    await taken(runner, latest)
    await taken(runner, skipped)
    await runner.stop()
    await asyncio.sleep(t0 + 9.5 - time.time())  # down across t0, t0+4, t0+8
    again = await make_runner(account, access={"allowlist": [author.account.did]}, schedules=FAST)
    await wait_result(reader, runner.did, tick_key(latest, t0 + 8), timeout=20)  # the latest missed tick, once
    for t in (t0, t0 + 4):
        assert await no_result(reader, runner.did, tick_key(latest, t), settle=0)
    await wait_result(reader, runner.did, tick_key(skipped, t0 + 12), timeout=20)  # none: on with the next tick
    for t in (t0, t0 + 4, t0 + 8):
        assert await no_result(reader, runner.did, tick_key(skipped, t), settle=0)
    ran = [inv.uri for inv in again.app.state.with_state("done") if inv.uri.startswith(latest)]
    assert ran.count(tick_key(latest, t0 + 8)) == 1


async def test_an_edit_changes_the_next_run_and_a_delete_stops_it(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]}, schedules=FAST)
    bundle = await author.publish(TICKED)
    far = math.ceil(time.time()) + 3600
    uri = await schedule(author, bundle, runner, interval_seconds=3600, start_at=iso(far))
    await taken(runner, uri)
    assert runner.app.ticks.next_run(uri) == far
    soon = math.ceil(time.time()) + 3
    rkey = uri.rsplit("/", 1)[1]
    record = client.schedule_record(runner.did, bundle, "main", interval_seconds=2, start_at=iso(soon))
    await author.session.put_record(SCHEDULE, rkey, record)
    await wait_result(reader, runner.did, tick_key(uri, soon), timeout=20)
    await client.delete(author.session, uri, SCHEDULE)
    deadline = time.monotonic() + 10
    while uri in runner.app.ticks.standings.items:
        assert time.monotonic() < deadline, "the delete was not taken"
        await asyncio.sleep(0.1)
    after = time.time()
    await asyncio.sleep(4)
    later = [inv.uri for inv in runner.app.state.with_state("done") + runner.app.state.with_state("pending")
             if inv.uri.startswith(uri + "#") and utc(inv.uri.rsplit("#", 1)[1]) > after + 1]
    assert later == []


async def test_a_blocked_author_stops(author, make_runner, reader):
    runner = await make_runner(access={"mode": "open"}, ingest={"authors": [author.account.did]}, schedules=FAST)
    bundle = await author.publish(TICKED)
    start = math.ceil(time.time()) + 2
    uri = await schedule(author, bundle, runner, interval_seconds=2, start_at=iso(start))
    await wait_result(reader, runner.did, tick_key(uri, start), timeout=20)
    PolicyFile(runner.cfg.access_file).deny(author.account.did)  # as `atrund access deny` does: read within a second
    await asyncio.sleep(1.5)
    blocked = time.time()
    await asyncio.sleep(5)
    ran = [inv.uri for inv in runner.app.state.with_state("done") if inv.uri.startswith(uri + "#")
           and utc(inv.uri.rsplit("#", 1)[1]) > blocked + 0.5]
    assert ran == [] and uri not in runner.app.ticks.standings.items  # stopped (and taken again if served again)


async def test_hostile_schedules_are_refused_or_capped(author, make_runner, reader):
    """A schedule every second is refused by the minimum interval (default 60 s); thousands of
    schedules from one author are capped at [schedules] max_per_author, and listing them stops
    one past the cap; a cron that ticks every minute passes a 60 s minimum."""
    runner = await make_runner(access={"allowlist": [author.account.did]}, schedules={"max_per_author": 5})
    bundle = await author.publish(TICKED)
    every_second = await schedule(author, bundle, runner, interval_seconds=1)
    every_minute = await schedule(author, bundle, runner, cron="* * * * *")
    record = client.schedule_record(runner.did, bundle, "main", interval_seconds=3600)
    many = 10_000
    # Keys after every_minute's: the PDS made that one, and its TIDs run ahead of the clock by
    # how many it has made within one millisecond since it started (CI's PDS, late in the suite:
    # seconds), so fresh TIDs of ours could sort before it, and the cap would keep those instead.
    after = _tid_value(every_minute.rsplit("/", 1)[1])
    keys = iter(_tid(after + n) for n in range(1, many + 1))
    for _ in range(0, many, 200):
        await author.session.apply_creates(SCHEDULE, [(next(keys), record) for _ in range(200)])
    # Usually taken before the last batch is written (the firehose wakes the round); the wait is
    # for a loaded machine, and says what the runner holds if it runs out (CI failed here once).
    deadline = time.monotonic() + 120
    while every_minute not in (standings := runner.app.ticks.standings).items or not standings.refused:
        assert time.monotonic() < deadline, (f"after 120 s: {len(standings.items)} schedules taken, {len(standings.refused)} "
                                             f"refused, {standings.list_failures} listings failed; health {runner.app.status.health()}")
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)
    standings = runner.app.ticks.standings
    assert "minimum is 60 s" in standings.refused[every_second][1]
    assert len(standings.items) == 5
    assert len(standings.refused) <= 1 + 100 + 1  # listing stopped one page past the cap
    assert any("more than 5 schedules" in why for _, why in standings.refused.values())
