"""A big backlog through firehose ingest: the runner's memory while it drains, and fairness.

    .venv/bin/python bench/backlog.py                  # 10,000 queued invocations from one author
    .venv/bin/python bench/backlog.py -n 2000 --isolation none

Method
------
1. Start a LocalStack and create three accounts: the runner, a *flooder* and a *bystander*;
   publish a one-function Python bundle (``echo``).
2. While no runner is running, the flooder posts N invocations (applyWrites, 200 creates a
   commit), so they all wait in the PDS's firehose.
3. Start ``atrund serve`` as a subprocess with ``[ingest] mode = "firehose"`` and the per-author
   rate limit lifted (the flooder may use every slot it is allowed: ``per_author_concurrency``,
   default 1, of ``[executor] concurrency`` 4), and sample its resident memory (VmRSS, and the
   kernel's high-water mark VmHWM) every 0.1 s. Its sandboxed workers are separate processes
   and are not counted: this is the daemon's own memory.
4. As soon as the runner has stored 1,000 of the flooder's invocations, the bystander posts one.
   Its wait is measured in the runner's state database: stored -> started, and how many of the
   flooder's invocations started in that interval.
5. Wait until every invocation has its result written; print the peak memory, the memory at
   start, the drain rate, and the bystander's wait.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from latency import RunnerProcess, proc_cpu_seconds  # the same subprocess handling as the latency bench

from atrund import client
from atrund.atproto.session import Session
from atrund.dev.stack import LocalStack
from atrund.records import INVOCATION

BUNDLE_SOURCE = "def echo(args):\n    return args\n"


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def metrics(port: int) -> dict[str, float]:
    """The runner's unlabelled /metrics figures; {} until it answers."""
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            out[name] = float(value)
    return out


def query(db: Path, sql: str, *args):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def main(opts) -> int:
    with tempfile.TemporaryDirectory(prefix="atrund-backlog-") as tmp_name:
        tmp = Path(tmp_name)
        with LocalStack(data_dir=tmp / "stack") as stack:  # noqa: SIM117 (the stack lives in tmp)
            runner = stack.create_account("runner")
            port = free_port()
            flooder, bystander = stack.create_account("flooder"), stack.create_account("bystander")
            (tmp / "app-password").write_text(runner.app_password)
            executor = f'warm = 2\nconcurrency = {opts.concurrency}\n' + (f'isolation = "{opts.isolation}"\n' if opts.isolation else "")
            (tmp / "config.toml").write_text(
                f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.handle}"\npassword_file = "app-password"\n\n'
                f'{stack.identity_toml()}\n'
                f'[access]\nmode = "allowlist"\nallowlist = ["{flooder.did}", "{bystander.did}"]\n\n'
                '[ingest]\nmode = "firehose"\n\n'
                f"[limits]\nper_author_per_minute = 1000000\nper_author_burst = 100000\nper_author_backlog = {opts.n + 10}\n\n"
                f"[executor]\n{executor}\n"
                f'[gateway]\nlisten = "127.0.0.1:{port}"\n\n'
                '[state]\ndir = "state"\n'
            )
            flood = await Session.login(stack.pds_url, flooder.handle, flooder.app_password)
            lone = await Session.login(stack.pds_url, bystander.handle, bystander.app_password)
            bundle = (await client.publish(flood, None, BUNDLE_SOURCE.encode(), "python", name="echo.py",
                                           endpoints=["echo"])).ref

            def invocation(i: int) -> dict:
                return client.invocation_record(runner.did, bundle, "echo", {"i": i})

            t0 = time.monotonic()
            for first in range(0, opts.n, 200):
                await flood.client.com.atproto.repo.apply_writes({"repo": flood.did, "writes": [
                    {"$type": "com.atproto.repo.applyWrites#create", "collection": INVOCATION,
                     "value": {"$type": INVOCATION, **invocation(i)}}
                    for i in range(first, min(opts.n, first + 200))]})
            print(f"posted {opts.n} invocations while no runner ran, in {time.monotonic() - t0:.1f} s", file=sys.stderr)

            proc = RunnerProcess(tmp / "config.toml", tmp / "runner.log")
            db = tmp / "state" / "atrund.sqlite3"
            pds_pid = stack.pid
            proc.start()
            assert proc.proc is not None
            started = time.monotonic()
            pds_cpu0 = proc_cpu_seconds(pds_pid)
            samples: list[tuple[float, int]] = []
            first_rss = hwm = 0
            serving_cpu = 0.0
            lone_uri = None
            try:
                while True:
                    if proc.exited() is not None:
                        raise RuntimeError(f"the runner exited with {proc.exited()}:\n{proc.log_tail()}")
                    rss, hwm = memory_kib(proc.proc.pid)
                    samples.append((time.monotonic() - started, rss))
                    # The state database is the runner's own while it runs (atrund.state): ask /metrics.
                    figures = await metrics(port)
                    stored = figures.get("atrund_invocations_accepted_total", 0)
                    written = figures.get("atrund_results_written_total", 0)
                    if stored and not first_rss:
                        first_rss = rss  # serving: connected, first frames in
                        serving_cpu = proc.cpu_seconds()  # what starting up cost, left out of the figure
                    if lone_uri is None and stored >= min(1000, opts.n):
                        lone_uri, _ = await lone.create_record(INVOCATION, invocation(-1))
                    if written >= opts.n + (lone_uri is not None):
                        break
                    if time.monotonic() - started > opts.timeout:
                        raise RuntimeError(f"not drained after {opts.timeout} s: {written} of {opts.n + 1} results written")
                    await asyncio.sleep(0.1)
                drained = time.monotonic() - started
                runner_cpu, pds_cpu = proc.cpu_seconds(), proc_cpu_seconds(pds_pid) - pds_cpu0
            finally:
                proc.stop()
                await flood.close()
                await lone.close()

            seen, began = query(db, "SELECT seen_at, started_at FROM invocations WHERE uri = ?", lone_uri)[0]
            ahead = query(db, "SELECT count(*) FROM invocations WHERE author = ? AND started_at > ? AND started_at < ?",
                          flooder.did, seen, began)[0][0]
            queued_then = query(db, "SELECT count(*) FROM invocations WHERE author = ? AND (started_at IS NULL OR started_at > ?)",
                                flooder.did, seen)[0][0]
            statuses = dict(query(db, "SELECT status, count(*) FROM invocations GROUP BY status"))
            peak = max(rss for _, rss in samples)
            print()
            print(f"atrund backlog bench: {opts.n} invocations queued from one author, firehose ingest, "
                  f"concurrency {opts.concurrency}, isolation {opts.isolation or 'auto'}")
            print(f"  drained in {drained:.1f} s ({opts.n / drained:.1f} invocations/s); statuses: {statuses}")
            done = opts.n + 1
            print(f"  CPU per invocation: runner {(runner_cpu - serving_cpu) * 1000 / done:.2f} ms (its own process from the "
                  f"first stored, workers not counted; {serving_cpu:.1f} s to start), PDS + PLC {pds_cpu * 1000 / done:.2f} ms; "
                  f"{runner_cpu / drained * 100:.0f}% and {pds_cpu / drained * 100:.0f}% of one core over the drain")
            print(f"  runner RSS: {first_rss / 1024:.1f} MiB when the first invocation was stored, peak {peak / 1024:.1f} MiB sampled, "
                  f"high-water mark {hwm / 1024:.1f} MiB (kernel VmHWM), {samples[-1][1] / 1024:.1f} MiB at the end")
            print(f"  the bystander's single invocation, posted with {queued_then} of the flooder's not yet started: "
                  f"waited {(began - seen) * 1000:.0f} ms from stored to started; "
                  f"{ahead} of the flooder's started in between")
            return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/backlog.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", type=int, default=10_000, help="invocations the flooder queues")
    p.add_argument("--concurrency", type=int, default=4, help="runner's [executor] concurrency")
    p.add_argument("--isolation", default="process", help="runner's [executor] isolation")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the drain may take")
    sys.exit(asyncio.run(main(p.parse_args())))
