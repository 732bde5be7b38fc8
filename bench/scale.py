"""Replicas on one Postgres: throughput of 1, 2 and 3 replicas, claim latency against SQLite, and
the hot-hit rate with and without hot routing.

    .venv/bin/python bench/scale.py                    # 960 invocations of 50 ms from 48 authors, I/O- then CPU-bound
    .venv/bin/python bench/scale.py -n 720 --work sleep --ingest poll --replicas 1 3
    .venv/bin/python bench/scale.py --hot-only         # only the hot-hit rate

Method
------
1. Start a LocalStack and a throwaway Postgres (atrund.dev.postgres); create the runner account
   and A authors, each publishing a bundle per ``--work``: ``sleep`` sleeps ``--sleep`` seconds
   (I/O-bound: it holds a slot, not a CPU; the issue's figure), ``cpu`` spins that long.
2. For each kind of work and each fleet size R (and once for one SQLite runner): a runner
   account and a database of its own; start R `atrund serve` replicas (``--ingest``: firehose,
   each record proven from its frame, or poll, one proof fetched per record;
   ``[executor] concurrency`` 4 each, the per-author rate lifted, per-author concurrency 1: an
   author's invocations run in order), wait until they have registered, then post N invocations
   (N/A per author, applyWrites, every author at once) and time until every one has its result record on the PDS
   (with Postgres the PDS is listed once the outbox says all are written).
3. Print the throughput per fleet size and its ratio to one replica, claim latency (stored ->
   started, from the invocations table) p50 and p95, Postgres against SQLite, and where the CPU
   went (runners, PDS + PLC, Postgres; from /proc) per invocation.

4. Hot hits (``--hot-replicas`` replicas, twice on the same workload: ``runner.hot_affinity``
   false, then true): ``--bundles`` bundles of different code, invoked in ``--waves`` waves; in
   each wave every author posts one invocation of a bundle drawn with a fixed seed (the same draw
   in both runs) and the wave ends when all have their results, so every invocation comes from
   an author with nothing open: the case hot routing decides. The figure is the pool's hot hits
   over its completed requests, summed over the replicas' /healthz.

Work is assigned to replicas by author (an author with nothing open goes to the replica with the
least open work: migration 8), so A authors over R replicas split as evenly as A/R allows; 2
cores run every replica, the PDS, the PLC and Postgres here, so the ratios say what this machine
can show, not what separate hosts would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psycopg
from latency import RunnerProcess, proc_cpu_seconds  # the same subprocess handling as the latency bench

from atrund import client
from atrund.atproto.session import Session
from atrund.dev.postgres import LocalPostgres
from atrund.dev.stack import LocalStack
from atrund.records import RESULT

# What each run does for ``--sleep`` seconds: "sleep" holds a slot and no CPU (the issue's
# I/O-bound bundle); "cpu" spins, so on this machine's 2 cores more replicas cannot add throughput.
SOURCES = {
    "sleep": "import time\ndef main(args):\n    time.sleep({seconds})\n    return args\n",
    "cpu": "import time\ndef main(args):\n    end = time.process_time() + {seconds}\n"
           "    while time.process_time() < end:\n        pass\n    return args\n",
}


def config(directory: Path, stack: LocalStack, runner, authors: list, opts, url: str | None,
           hot_affinity: bool = True) -> Path:
    directory.mkdir(parents=True)
    (directory / "app-password").write_text(runner.app_password)
    allow = ", ".join(f'"{a.did}"' for a in authors)
    path = directory / "config.toml"
    path.write_text(
        f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.handle}"\npassword_file = "app-password"\n'
        f'hot_affinity = {str(hot_affinity).lower()}\n\n'
        f'{stack.identity_toml()}\n[access]\nmode = "allowlist"\nallowlist = [{allow}]\n\n'
        f'[ingest]\nmode = "{opts.ingest}"\npoll_interval = 0.2\n\n'
        f"[limits]\nper_author_per_minute = 1000000\nper_author_burst = 100000\nper_author_backlog = {opts.n}\n\n"
        # hot_max: every author's bundle may stay hot on any replica (the default 16 would make one
        # replica serving 48 authors' bundles start a worker for nearly every run: a pool figure)
        f'[executor]\nconcurrency = {opts.concurrency}\nwarm = 2\nisolation = "{opts.isolation}"\n'
        f'hot_max = {max(16, len(authors))}\n\n'
        '[gateway]\nlisten = "127.0.0.1:0"\n\n'
        '[state]\ndir = "state"\n' + (f'url = "{url}"\n' if url else ""))
    return path


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def machine_jiffies() -> tuple[int, int]:
    """(busy, all) jiffies of every CPU so far (/proc/stat): how much of the machine was in use,
    by anything (the fleet, its workers, this bench, other work on the machine)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def postgres_cpu_seconds(pg: LocalPostgres | None) -> float:
    """CPU seconds of the Postgres server: the postmaster, its live backends, and those it reaped."""
    if pg is None or pg.dir is None:
        return 0.0
    master = int((pg.dir / "data" / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if pid == master or int(fields[1]) == master:
            total += proc_cpu_seconds(pid) if pid != master else \
                sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


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
            await _registered(url, size)
        else:
            await asyncio.sleep(3)  # the SQLite runner's start: login, runner record
        per = opts.n // len(authors)
        cpu0 = [p.cpu_seconds() for p in procs], proc_cpu_seconds(stack.pid), postgres_cpu_seconds(pg)
        machine0 = machine_jiffies()
        t0, wall0 = time.monotonic(), time.time()
        # every author at once: posted one after another, the last author's work would arrive
        # seconds after the first's, and its run of N/A one at a time would be what is timed
        await asyncio.gather(*(client.invoke_many(session, bundle, runner.did, "main", [{"i": i} for i in range(per)])
                               for session, bundle in zip(sessions, bundles, strict=True)))
        posted = time.monotonic() - t0
        total = per * len(authors)
        looks = 0
        with contextlib.ExitStack() as closing:
            # With Postgres the fleet's own count of results written is read first (one indexed
            # count, nearly free), and the PDS is listed only once it says all are: listing
            # hundreds of results every 0.2 s would cost the PDS as much as a replica's work.
            db = closing.enter_context(psycopg.connect(url, autocommit=True)) if url is not None else None
            while True:
                if db is None or db.execute("SELECT count(*) FROM outbox WHERE written_at IS NOT NULL").fetchone()[0] >= total:
                    looks += 1
                    if await results_of(stack, runner) >= total:  # on the PDS, as any reader sees them
                        break
                if time.monotonic() - t0 > opts.timeout:
                    raise SystemExit(f"{label}: not all {total} results after {opts.timeout} s\n{procs[0].log_tail()}")
                await asyncio.sleep(0.05 if db is not None else 0.2)
        took = time.monotonic() - t0
        cpu = (sum(p.cpu_seconds() for p in procs) - sum(cpu0[0]), proc_cpu_seconds(stack.pid) - cpu0[1],
               postgres_cpu_seconds(pg) - cpu0[2])
        machine = [b - a for a, b in zip(machine0, machine_jiffies(), strict=True)]
        pools = [await _pool(p) for p in procs]
        # The PDS's figure holds this bench's own listing of the results: what one look at all of
        # them costs (measured now, the runners idle), times the looks, is taken out (an upper
        # bound: earlier looks found fewer).
        mark = proc_cpu_seconds(stack.pid)
        for _ in range(3):
            await results_of(stack, runner)
        reading = (proc_cpu_seconds(stack.pid) - mark) / 3 * (looks + 1)
    finally:
        for p in procs:
            p.stop()
    # read after the stop: a serving SQLite runner keeps its database to itself (locking_mode=EXCLUSIVE)
    runs = read("SELECT author, seen_at, started_at, finished_at FROM invocations WHERE started_at IS NOT NULL")
    rows = [run[1:] for run in runs]
    waits = [started - seen for seen, started, _ in rows]
    # How the authors were shared out (per replica, most first), and the gap between one run of
    # an author ending and their next starting (per-author concurrency 1: with as many authors
    # as slots, a slot idles through it).
    shares = "/".join(str(n) for (n,) in read("SELECT count(DISTINCT author) FROM invocations GROUP BY replica "
                                              "ORDER BY 1 DESC")) if url is not None else str(len(authors))
    by_author: dict[str, list[tuple[float, float]]] = {}
    for author, _, started, finished in sorted(runs, key=lambda run: run[2]):
        by_author.setdefault(author, []).append((started, finished))
    gaps = [b[0] - a[1] for times in by_author.values() for a, b in zip(times, times[1:], strict=False)]
    # Where the time went: the last invocation stored (ingest), each run's slot time (claim ->
    # done, the sleep included) and how busy the fleet's slots were between the first start and
    # the last finish.
    held = [finished - started for _, started, finished in rows]
    span = max(f for *_, f in rows) - min(s for _, s, _ in rows)
    return {"label": label, "replicas": size, "invocations": total, "seconds": took, "per_second": total / took,
            "claim_p50_ms": _percentile(waits, 50) * 1000, "claim_p95_ms": _percentile(waits, 95) * 1000,
            "posted_s": posted, "ingested_s": max(seen for seen, *_ in rows) - wall0,
            "slot_ms": statistics.mean(held) * 1000, "gap_ms": _percentile(gaps, 50) * 1000, "shares": shares, "busy": sum(held) / (span * size * opts.concurrency),
            "runner_ms": cpu[0] * 1000 / total, "pds_ms": (cpu[1] - reading) * 1000 / total, "pg_ms": cpu[2] * 1000 / total,
            "machine_busy": machine[0] / max(1, machine[1]),
            "hot": sum(p["hotHits"] for p in pools) / max(1, sum(p["completed"] for p in pools))}


async def run_hot(label: str, affinity: bool, stack, pg: LocalPostgres, authors, sessions, bundles, opts,
                  tmp: Path) -> dict:
    """The hot-hit rate of ``opts.hot_replicas`` replicas over the waves (step 4 above)."""
    runner = stack.create_account(f"runner{label}")
    url = pg.create(f"scale_{label}")
    procs = [RunnerProcess(config(tmp / label / f"r{n}", stack, runner, authors, opts, url, affinity),
                           tmp / label / f"r{n}.log") for n in range(opts.hot_replicas)]
    for p in procs:
        p.start()
    draw = random.Random(14)  # the same bundles in the same order for both runs
    try:
        await _registered(url, len(procs))
        t0 = time.monotonic()
        for wave in range(opts.waves):
            await asyncio.gather(*(client.invoke_many(s, draw.choice(bundles), runner.did, "main", [{"i": wave}])
                                   for s in sessions))
            while (written := await results_of(stack, runner)) < (wave + 1) * len(sessions):
                if time.monotonic() - t0 > opts.timeout:
                    raise SystemExit(f"{label}: {written} results after {opts.timeout} s\n{procs[0].log_tail()}")
                await asyncio.sleep(0.2)
        pools = [await _pool(p) for p in procs]
    finally:
        for p in procs:
            p.stop()
    hits, completed = sum(p["hotHits"] for p in pools), sum(p["completed"] for p in pools)
    return {"label": label, "affinity": affinity, "hits": hits, "completed": completed, "cold": sum(p["coldStarts"] for p in pools)}


async def _registered(url: str, count: int) -> None:
    """Every replica registered (it logged in and migrated)."""
    while True:
        try:
            with psycopg.connect(url, autocommit=True) as db:
                if db.execute("SELECT count(*) FROM replicas").fetchone()[0] >= count:
                    return
        except psycopg.Error:
            pass
        await asyncio.sleep(0.2)


async def _pool(proc: RunnerProcess) -> dict:
    """The replica's pool figures, from its /healthz (its gateway's address is in its log)."""
    for line in proc.log_path.read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("event") == "gateway listening":
            async with aiohttp.ClientSession() as http, http.get(f"{entry['url']}/healthz") as answer:
                return (await answer.json())["pool"]
    raise SystemExit(f"{proc.log_path}: no gateway address\n{proc.log_tail()}")


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
            source = SOURCES["sleep"].format(seconds=opts.sleep)
            rows, hot = [], []
            for work in [] if opts.hot_only else opts.work:
                code = SOURCES[work].format(seconds=opts.sleep).encode()
                bundles = [(await client.publish(s, None, code, "python", name=f"{work}.py")).ref for s in sessions]
                if opts.sqlite:
                    rows.append({"work": work, **await run_fleet(f"{work}sqlite", 1, stack, None, authors, sessions,
                                                                 bundles, opts, tmp)})
                for size in opts.replicas:
                    rows.append({"work": work, **await run_fleet(f"{work}pg{size}", size, stack, pg, authors, sessions,
                                                                 bundles, opts, tmp)})
            if opts.waves:
                # --bundles bundles of different code (another blob each: another worker), spread over the authors
                few = sessions[:opts.hot_authors]
                many = [(await client.publish(few[n % len(few)], None, f"# bundle {n}\n{source}".encode(), "python",
                                              name=f"hot{n}.py")).ref for n in range(opts.bundles)]
                for affinity in (False, True):
                    hot.append(await run_hot(f"hot{int(affinity)}", affinity, stack, pg, authors, few, many, opts, tmp))
            for s in sessions:
                await s.close()
    for h in hot:
        print(f"hot hits, {opts.hot_replicas} replicas, {opts.bundles} bundles, {opts.hot_authors} authors x {opts.waves} waves, "
              f"hot_affinity = {str(h['affinity']).lower()}: {h['hits']} of {h['completed']} runs "
              f"({h['hits'] / max(1, h['completed']):.0%}), {h['cold']} cold starts")
    if not rows:
        return 0
    for work in opts.work:
        table([r for r in rows if r["work"] == work], work, opts)
    print("PDS*: the PDS + PLC process, less this bench's own listing of the results (an upper bound of it); "
          f"cores busy: of the machine's {os.cpu_count()}, by anything (the fleet, its workers, this bench, other work)")
    return 0


def table(rows: list[dict], work: str, opts) -> None:
    base = next((r["per_second"] for r in rows if r["label"].endswith("pg1")), None)
    what = "sleep (I/O-bound)" if work == "sleep" else "of CPU (CPU-bound)"
    print(f"{opts.n} invocations of {opts.sleep * 1000:.0f} ms {what} from {opts.authors} authors, "
          f"concurrency {opts.concurrency} per replica, isolation {opts.isolation}, {opts.ingest} ingest")
    print(f"{'state':8} {'replicas':>8} {'seconds':>8} {'inv/s':>7} {'ratio':>6} {'claim p50':>10} {'claim p95':>10}"
          f"  CPU ms per invocation: {'runners':>7} {'PDS*':>5} {'pg':>5}   all posted  all stored  slot ms  gap ms  slots busy  authors  cores busy  hot runs")
    for r in rows:
        sqlite = r["label"].endswith("sqlite")
        ratio = f"{r['per_second'] / base:.2f}" if base and not sqlite else "-"
        print(f"{'sqlite' if sqlite else 'postgres':8} {r['replicas']:>8} {r['seconds']:>8.1f} "
              f"{r['per_second']:>7.1f} {ratio:>6} {r['claim_p50_ms']:>8.0f}ms {r['claim_p95_ms']:>8.0f}ms"
              f"  {'':22} {r['runner_ms']:>7.2f} {r['pds_ms']:>5.2f} {r['pg_ms']:>5.2f}   {r['posted_s']:>8.1f}s {r['ingested_s']:>10.1f}s {r['slot_ms']:>8.0f} "
              f"{r['gap_ms']:>7.0f} {r['busy']:>10.0%}  {r['shares']:>7}  {r['machine_busy'] * os.cpu_count():>10.2f} {r['hot']:>9.0%}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", type=int, default=960, help="invocations per fleet size")
    p.add_argument("--authors", type=int, default=48,
                   help="authors (per-author concurrency is 1: with no more authors than slots, a slot idles whenever "
                        "its author's next run is not yet claimed)")
    p.add_argument("--sleep", type=float, default=0.05, help="seconds each run sleeps (or spins, for --work cpu)")
    p.add_argument("--work", nargs="+", choices=sorted(SOURCES), default=["sleep", "cpu"],
                   help="sleep: I/O-bound (the issue's figure); cpu: CPU-bound")
    p.add_argument("--concurrency", type=int, default=4, help="[executor] concurrency of each replica")
    p.add_argument("--isolation", default="none", help="none: the bench measures the fleet, not the sandbox")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--ingest", choices=["poll", "firehose"], default="firehose",
                   help="[ingest] mode: firehose proves each record from its frame; poll fetches a proof per record")
    p.add_argument("--no-sqlite", dest="sqlite", action="store_false", help="skip the one SQLite runner")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--hot-replicas", type=int, default=3, help="replicas of the hot-hit runs")
    p.add_argument("--hot-authors", type=int, default=12, help="authors of the hot-hit runs (the first of --authors)")
    p.add_argument("--bundles", type=int, default=24, help="bundles of the hot-hit runs")
    p.add_argument("--waves", type=int, default=6, help="waves of the hot-hit runs (0: none)")
    p.add_argument("--hot-only", action="store_true", help="only the hot-hit runs")
    sys.exit(asyncio.run(main(p.parse_args())))
