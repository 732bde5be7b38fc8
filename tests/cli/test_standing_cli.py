"""The author's commands for schedules and triggers, as a user runs them (real subprocesses)
against a runner serving the real local PDS: create, list, result list, delete, status."""

import asyncio
import json
import math
import time
from datetime import datetime, timezone

from conftest import _author_env, atrund, wait_result

from atrund.records import tick_key, utc_second

TICKED = "def main(args):\n    return {'at': args['schedule']['scheduledAt']}\n"


def run(*args, env) -> dict | list:
    p = atrund(*args, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


async def until(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_schedule_and_trigger_commands(stack, author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]}, ingest={"mode": "firehose", "poll_interval": 0.2},
                               schedules={"min_interval_seconds": 1, "jitter_seconds": 0})
    bundle = await author.publish(TICKED)
    env = _author_env(stack, author.account)
    start = math.ceil(time.time()) + 4
    start_iso = datetime.fromtimestamp(start, timezone.utc).isoformat()
    made = await asyncio.to_thread(run, "schedule", "create", bundle["uri"], "--runner", runner.did, "--endpoint", "main",
                                   "--every", "3600", "--start-at", start_iso, env=env)
    assert made["next"] == utc_second(start) and made["intervalSeconds"] == 3600
    uri = made["uri"]
    await wait_result(reader, runner.did, tick_key(uri, start), timeout=30)
    listed = await asyncio.to_thread(run, "result", "list", "--schedule", uri, env=env)
    assert [r["scheduledAt"] for r in listed] == [utc_second(start)] and listed[0]["value"] == {"at": utc_second(start)}
    mine = await asyncio.to_thread(run, "schedule", "list", "--author", author.account.did, env=env)
    assert [(s["uri"], s["next"]) for s in mine] == [(uri, utc_second(start + 3600))]

    made = await asyncio.to_thread(run, "trigger", "create", bundle["uri"], "--runner", runner.did, "--endpoint", "main",
                                   "--collection", "app.bsky.feed.like", "--about-me", "--results", "all", env=env)
    assert made["filter"] == {"collections": ["app.bsky.feed.like"], "actions": ["create"], "authors": None, "subject": "self"}
    trig = made["uri"]
    star = await asyncio.to_thread(atrund, "trigger", "create", bundle["uri"], "--runner", runner.did, "--endpoint", "main",
                                   "--collection", "*", env=env)
    assert star.returncode == 32 and len(star.stderr.strip().splitlines()) == 1 and "wildcards" in star.stderr
    assert [t["uri"] for t in await asyncio.to_thread(run, "trigger", "list", "--author", author.account.did, env=env)] == [trig]
    await until(lambda: trig in runner.app.triggers.live, "the trigger taken")
    status = await asyncio.to_thread(run, "status", "--url", runner.app.gateway.url, env=env)
    assert status["schedules"]["active"] == 1 and status["triggers"]["active"] == 1 and status["triggers"]["dropped"] == 0

    assert (await asyncio.to_thread(run, "schedule", "delete", uri, env=env)) == {"deleted": uri}
    assert (await asyncio.to_thread(run, "trigger", "delete", trig, env=env)) == {"deleted": trig}
    await until(lambda: uri not in runner.app.ticks.standings.items and trig not in runner.app.triggers.live, "both stopped")
    wrong = await asyncio.to_thread(atrund, "schedule", "delete", trig, env=env)
    assert wrong.returncode == 32 and "is not a dev.atrun.schedule record" in wrong.stderr
