"""Scheduling drift with many schedules, and trigger latency, on the real local PDS.

    .venv/bin/python bench/schedules.py                         # 1000 schedules (100 authors x 10), 50 likes
    .venv/bin/python bench/schedules.py --jitter 30              # the same ticks spread over a 30 s window
    .venv/bin/python bench/schedules.py --schedules 200 --authors 20 --likes 20

Method
------
1. Start a LocalStack (reference PDS + PLC), a runner account and ``--authors`` author accounts,
   and a runner (atrund.app.App, in this process) in firehose mode serving them, with the
   defaults of [executor] and [limits] (so fairness and per-author rate limits are as shipped)
   and ``[schedules] jitter_seconds = --jitter``.
2. Each author publishes one bundle (a Python endpoint that returns at once) and writes its
   share of ``--schedules`` dev.atrun.schedule records (applyWrites, 200 a commit), every one
   ``intervalSeconds = 3600`` from the same ``startAt``: all first ticks fall in the same
   second, the worst case for a runner (``0 * * * *`` everywhere).
3. After the tick, read the runner's state: for each tick, its scheduled time (from its key),
   when it was queued (stored) and when it started (claimed: ``started_at``, just before the
   bundle starts). Drift = start - scheduled. Printed as p50 / p99 / max, with the queueing
   part, and the jitter each schedule was given (drift minus jitter is what the runner adds).
4. Trigger latency: an author with no schedules sets a trigger on likes of their posts (subject
   self); another account likes the post ``--likes`` times, one like every 1.1 s (under the
   author's default rate of 60 starts a minute: faster, firings wait for the author's tokens, by
   design). Latency = start of the firing (``started_at``) - the moment createRecord of the like
   returned (the record exists). p50 / p99 / max.

All times are this machine's wall clock; one process runs the runner, the PDS and the writers.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import websockets

from atrund import client, config
from atrund.app import App
from atrund.atproto.uri import new_tid
from atrund.dev.stack import LocalStack
from atrund.records import SCHEDULE, firing_key, now_iso, tick_key

BUNDLE = "def tick(args):\n    return {}\n\ndef liked(args):\n    return {'by': args['event']['author']}\n"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def runner_config(stack: LocalStack, runner, authors: list, state: Path, opts) -> config.Config:
    (state / "pw").write_text(runner.app_password)
    return config.parse({
        "runner": {"pds": stack.pds_url, "identifier": runner.handle, "password_file": str(state / "pw")},
        "identity": stack.identity,
        "access": {"allowlist": [a.did for a in authors]},
        "ingest": {"mode": "firehose", "poll_interval": 2.0},
        "schedules": {"jitter_seconds": opts.jitter, "max_per_author": max(50, opts.schedules // opts.authors + 1)},
        "gateway": {"enabled": False},
        "state": {"dir": str(state / "state")},
    })


async def until(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def main(opts) -> int:
    with tempfile.TemporaryDirectory(prefix="atrund-bench-") as tmp, LocalStack(Path(tmp) / "stack") as stack:
        runner = stack.create_account("runner")
        authors = [stack.create_account(f"author{i}") for i in range(opts.authors)]
        fan, owner_account = stack.create_account("fan"), stack.create_account("likedauthor")
        app = App(runner_config(stack, runner, [*authors, owner_account], Path(tmp), opts))
        await app.start()
        stop = asyncio.Event()
        serving = asyncio.create_task(app.run(stop))
        try:
            async with client.reader(stack.plc_url) as repos:
                sessions = [await client.login(repos, a.handle, a.app_password, stack.pds_url) for a in authors]
                bundles = [(await client.publish(s, repos, BUNDLE.encode(), "python")).ref for s in sessions]
                per = opts.schedules // opts.authors
                start = math.ceil(time.time()) + opts.lead
                t0 = time.monotonic()
                for s, b in zip(sessions, bundles, strict=True):
                    record = client.schedule_record(runner.did, b, "tick", interval_seconds=3600, start_at=iso(start))
                    for i in range(0, per, 200):
                        await s.apply_creates(SCHEDULE, [(new_tid(), record) for _ in range(min(200, per - i))])
                total = per * opts.authors
                print(f"wrote {total} schedules from {opts.authors} authors in {time.monotonic() - t0:.1f} s; "
                      f"all tick at {iso(start)}", file=sys.stderr)
                await until(lambda: len(app.ticks.standings.items) >= total, "the schedules taken", max(10.0, start - time.time()))
                if time.time() > start:
                    raise SystemExit(f"the schedules were taken after their tick; raise --lead (now {opts.lead} s)")
                await until(lambda: app.state.counts().get("done", 0) >= total, "every tick run", 600)
                rows = app.state.db.execute("SELECT uri, seen_at, started_at FROM invocations WHERE uri LIKE '%dev.atrun.schedule%'"
                                            ).fetchall()
                drift = [started - start for _, _, started in rows]
                queued = [seen - start for _, seen, _ in rows]
                added = [started - start - app.ticks.jitter(uri.split("#")[0]) for uri, _, started in rows]
                assert all(uri == tick_key(uri.split("#")[0], start) for uri, _, _ in rows)

                # Trigger latency: likes of one author's post, one at a time.
                owner = await client.login(repos, owner_account.handle, owner_account.app_password, stack.pds_url)
                liker = await client.login(repos, fan.handle, fan.app_password, stack.pds_url)
                sessions.append(owner)
                liked_bundle = (await client.publish(owner, repos, BUNDLE.encode(), "python")).ref
                trig, _ = await client.create_trigger(owner, repos, liked_bundle["uri"], runner.did, "liked", ["app.bsky.feed.like"],
                                                      cid=liked_bundle["cid"], subject="self", results="none")
                await until(lambda: trig in app.triggers.live, "the trigger taken", 30)
                post_uri, post_cid = await owner.create_record("app.bsky.feed.post", {"text": "like me", "createdAt": now_iso()})
                latency, stored, emitted = [], [], []
                arrivals: dict[bytes, float] = {}  # like rkey -> when its frame came off the PDS's own firehose

                async def watch_pds() -> None:
                    url = stack.pds_url.replace("http", "ws", 1) + "/xrpc/com.atproto.sync.subscribeRepos"
                    async with websockets.connect(url, max_size=None) as ws:
                        async for frame in ws:
                            for key in [k for k in list(pending) if k in frame]:
                                arrivals[key] = time.time()
                                pending.discard(key)

                pending: set[bytes] = set()
                watcher = asyncio.create_task(watch_pds())
                await asyncio.sleep(0.5)
                for _ in range(opts.likes):
                    rkey = new_tid()
                    pending.add(rkey.encode())
                    like_uri, like_cid = await liker.put_record(
                        "app.bsky.feed.like", rkey, {"subject": {"uri": post_uri, "cid": post_cid}, "createdAt": now_iso()})
                    created = time.time()
                    key = firing_key(trig, like_uri, like_cid)
                    await until(lambda key=key: (app.state.status_of(key) or ("",))[0] in ("running", "done"), "the firing", 30)
                    seen, started = app.state.db.execute("SELECT seen_at, started_at FROM invocations WHERE uri = ?",
                                                         (key,)).fetchone()
                    latency.append(started - created)
                    stored.append(seen - created)
                    if rkey.encode() in arrivals:
                        emitted.append(arrivals[rkey.encode()] - created)
                    await asyncio.sleep(1.1)
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
                for s in [*sessions, liker]:
                    await s.close()
        finally:
            stop.set()
            await serving
            await app.close()
    ms = lambda xs, p: f"{pct(xs, p) * 1000:,.0f} ms"  # noqa: E731
    print()
    print(f"atrund schedules bench: {len(drift)} ticks due in the same second ({opts.authors} authors x {per}), "
          f"jitter window {opts.jitter} s, executor concurrency {app.cfg.executor.concurrency}, per-author "
          f"{app.cfg.limits.per_author_per_minute:g}/min burst {app.cfg.limits.per_author_burst}")
    print(f"  drift, scheduled -> started:   p50 {ms(drift, 50)}  p99 {ms(drift, 99)}  max {ms(drift, 100)}")
    print(f"  of which scheduled -> queued:  p50 {ms(queued, 50)}  p99 {ms(queued, 99)}  max {ms(queued, 100)}")
    if opts.jitter:
        print(f"  drift less each schedule's jitter: p50 {ms(added, 50)}  p99 {ms(added, 99)}  max {ms(added, 100)}")
    print(f"  mean start rate {len(drift) / max(1e-9, max(drift) - min(drift)):,.0f} ticks/s")
    print(f"atrund trigger latency: {len(latency)} likes, like created -> bundle started: p50 {ms(latency, 50)}  "
          f"p99 {ms(latency, 99)}  max {ms(latency, 100)}  (mean {statistics.mean(latency) * 1000:,.0f} ms)")
    print(f"  of which like created -> firing stored (firehose, proof): p50 {ms(stored, 50)}  p99 {ms(stored, 99)}")
    if emitted:
        print(f"  of which like created -> frame on the PDS's own firehose (the PDS, not atrund): p50 {ms(emitted, 50)}  "
              f"p99 {ms(emitted, 99)}  ({len(emitted)} seen)")
        runner_part = [a - b for a, b in zip(latency, emitted, strict=False)]
        print(f"  so frame on the PDS firehose -> bundle started (atrund): about p50 {ms(runner_part, 50)}  p99 {ms(runner_part, 99)}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/schedules.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--schedules", type=int, default=1000, help="schedules, all ticking in the same second")
    p.add_argument("--authors", type=int, default=100, help="authors they are spread over")
    p.add_argument("--jitter", type=int, default=0, help="[schedules] jitter_seconds")
    p.add_argument("--likes", type=int, default=50, help="likes that fire the trigger, one at a time")
    p.add_argument("--lead", type=int, default=90, help="seconds from now to the common tick (time to write and take them)")
    sys.exit(asyncio.run(main(p.parse_args())))
