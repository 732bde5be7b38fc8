"""Replicas on one Postgres: throughput of 1, 2 and 3 replicas, and claim latency against SQLite.

    .venv/bin/python bench/scale.py                    # 240 invocations of a 50 ms sleep, 12 authors
    .venv/bin/python bench/scale.py -n 120 --replicas 1 2

Method
------
1. Start a LocalStack and a throwaway Postgres (atrund.dev.postgres); create the runner account
   and A authors, each publishing a bundle that sleeps ``--sleep`` seconds (I/O-bound: it holds a
   slot, not a CPU).
2. For each fleet size R (and once for one SQLite runner): a runner account and a database of
   its own; start R `atrund
   serve` replicas (poll ingest, ``[executor] concurrency`` 4 each, the per-author rate lifted,
   per-author concurrency 1: an author's invocations run in order), wait until they have
   registered, then post N invocations (N/A per author, applyWrites) and time until every one has
   its result record on the PDS.
3. Print the throughput per fleet size and its ratio to one replica, and claim latency (stored
   -> started, from the invocations table) p50 and p95, Postgres against SQLite.

Work is assigned to replicas by author, so with A authors over R replicas the shares are as
even as the hash makes them; 2 cores run every replica, the PDS, the PLC and Postgres here, so
the ratios say what this machine can show, not what separate hosts would.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psycopg
from latency import RunnerProcess  # the same subprocess handling as the latency bench

from atrund import client
from atrund.atproto.session import Session
from atrund.dev.postgres import LocalPostgres
from atrund.dev.stack import LocalStack
from atrund.records import INVOCATION, RESULT


def config(directory: Path, stack: LocalStack, runner, authors: list, opts, url: str | None) -> Path:
    directory.mkdir(parents=True)
    (directory / "app-password").write_text(runner.app_password)
    allow = ", ".join(f'"{a.did}"' for a in authors)
    path = directory / "config.toml"
    path.write_text(
        f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.handle}"\npassword_file = "app-password"\n\n'
        f'[identity]\nplc_url = "{stack.plc_url}"\n\n[access]\nmode = "allowlist"\nallowlist = [{allow}]\n\n'
        '[ingest]\npoll_interval = 0.2\n\n'
        f"[limits]\nper_author_per_minute = 1000000\nper_author_burst = 100000\nper_author_backlog = {opts.n}\n\n"
        f'[executor]\nconcurrency = {opts.concurrency}\nwarm = 2\nisolation = "{opts.isolation}"\n\n'
        '[gateway]\nlisten = "127.0.0.1:0"\n\n'
        '[state]\ndir = "state"\n' + (f'url = "{url}"\n' if url else ""))
    return path


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values[0] if values else float("nan"))


async def run_fleet(label: str, size: int, stack, pg: LocalPostgres | None, authors, sessions, bundles, opts,
                    tmp: Path) -> dict:
    # a runner account of its own: the invocations posted for the fleets before are not its
    runner = stack.create_account(f"runner{label}")
    url = pg.create(f"scale_{label}") if pg is not None else None
    procs = [RunnerProcess(config(tmp / label / f"r{n}", stack, runner, authors, opts, url), tmp / label / f"r{n}.log")
             for n in range(size)]
    for p in procs:
        p.start()

    def read(sql: str):
        if url is not None:
            with psycopg.connect(url, autocommit=True) as db:
                return db.execute(sql).fetchall()
        with sqlite3.connect(f"file:{tmp / label / 'r0' / 'state' / 'atrund.sqlite3'}?mode=ro", uri=True) as db:
            return db.execute(sql).fetchall()

    try:
        if url is not None:
            while True:  # every replica registered (it logged in and migrated)
                try:
                    if read("SELECT count(*) FROM replicas")[0][0] >= size:
                        break
                except psycopg.Error:
                    pass
                await asyncio.sleep(0.2)
        else:
            await asyncio.sleep(3)  # the SQLite runner's start: login, runner record
        per = opts.n // len(authors)
        t0 = time.monotonic()
        for session, bundle in zip(sessions, bundles, strict=True):
            await session.client.com.atproto.repo.apply_writes({"repo": session.did, "writes": [
                {"$type": "com.atproto.repo.applyWrites#create", "collection": INVOCATION,
                 "value": {"$type": INVOCATION, **client.invocation_record(runner.did, bundle, "main", {"i": i})}}
                for i in range(per)]})
        total = per * len(authors)
        while (written := await results_of(stack, runner)) < total:  # on the PDS, as any reader sees them
            if time.monotonic() - t0 > opts.timeout:
                raise SystemExit(f"{label}: {written} of {total} results after {opts.timeout} s\n{procs[0].log_tail()}")
            await asyncio.sleep(0.2)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            p.stop()
    # read after the stop: a serving SQLite runner keeps its database to itself (locking_mode=EXCLUSIVE)
    waits = [started - seen for seen, started in read("SELECT seen_at, started_at FROM invocations WHERE started_at IS NOT NULL")]
    return {"label": label, "replicas": size, "invocations": total, "seconds": took, "per_second": total / took,
            "claim_p50_ms": _percentile(waits, 50) * 1000, "claim_p95_ms": _percentile(waits, 95) * 1000}


async def results_of(stack: LocalStack, runner) -> int:
    """How many result records the runner's repo holds."""
    count, cursor = 0, None
    async with aiohttp.ClientSession() as http:
        while True:
            params = {"repo": runner.did, "collection": RESULT, "limit": "100", **({"cursor": cursor} if cursor else {})}
            async with http.get(f"{stack.pds_url}/xrpc/com.atproto.repo.listRecords", params=params) as answer:
                page = await answer.json()
            count += len(page.get("records", []))
            cursor = page.get("cursor")
            if not cursor or not page.get("records"):
                return count


async def main(opts) -> int:
    with tempfile.TemporaryDirectory(prefix="atrund-scale-") as tmp_name:
        tmp = Path(tmp_name)
        with LocalStack(data_dir=tmp / "stack") as stack, LocalPostgres() as pg:
            authors = [stack.create_account(f"author{n}") for n in range(opts.authors)]
            sessions = [await Session.login(stack.pds_url, a.handle, a.app_password) for a in authors]
            source = f"import time\ndef main(args):\n    time.sleep({opts.sleep})\n    return args\n"
            bundles = [(await client.publish(s, None, source.encode(), "python", name="sleep.py")).ref for s in sessions]
            rows = []
            if opts.sqlite:
                rows.append(await run_fleet("sqlite", 1, stack, None, authors, sessions, bundles, opts, tmp))
            for size in opts.replicas:
                rows.append(await run_fleet(f"pg{size}", size, stack, pg, authors, sessions, bundles, opts, tmp))
            for s in sessions:
                await s.close()
    base = next((r["per_second"] for r in rows if r["label"] == "pg1"), None)
    print(f"{opts.n} invocations of a {opts.sleep * 1000:.0f} ms sleep from {opts.authors} authors, "
          f"concurrency {opts.concurrency} per replica, isolation {opts.isolation}")
    print(f"{'state':8} {'replicas':>8} {'seconds':>8} {'inv/s':>7} {'ratio':>6} {'claim p50':>10} {'claim p95':>10}")
    for r in rows:
        ratio = f"{r['per_second'] / base:.2f}" if base and r["label"] != "sqlite" else "-"
        print(f"{'sqlite' if r['label'] == 'sqlite' else 'postgres':8} {r['replicas']:>8} {r['seconds']:>8.1f} "
              f"{r['per_second']:>7.1f} {ratio:>6} {r['claim_p50_ms']:>8.0f}ms {r['claim_p95_ms']:>8.0f}ms")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", type=int, default=240, help="invocations per fleet size")
    p.add_argument("--authors", type=int, default=12)
    p.add_argument("--sleep", type=float, default=0.05, help="seconds each run sleeps")
    p.add_argument("--concurrency", type=int, default=4, help="[executor] concurrency of each replica")
    p.add_argument("--isolation", default="none", help="none: the bench measures the fleet, not the sandbox")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--no-sqlite", dest="sqlite", action="store_false", help="skip the one SQLite runner")
    p.add_argument("--timeout", type=float, default=300)
    sys.exit(asyncio.run(main(p.parse_args())))
