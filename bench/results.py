"""The result writer under a steady stream of results: PDS CPU and commits per result, with and
without the gap between commits (atrund.results.COMMIT_GAP), in one run.

    .venv/bin/python bench/results.py                  # 400 results at 40/s, each side twice
    .venv/bin/python bench/results.py -n 200 --rate 80 --rounds 1

Method: a LocalStack, a runner account and a SQLite state of its own per side; a real
ResultWriter loop (``run``) on it; results are queued (state.finish, as a run's end does) at
``--rate`` a second and the writer is woken after each, as atrund.runs does. Measured until the
last is on the PDS: the PDS + PLC process's CPU (/proc) per result, the repo commits the writer
made (applyWrites or putRecord calls) and each result's delay from queued to written. The sides
alternate (gap 0, gap COMMIT_GAP, ...) so that load from elsewhere falls on both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from latency import proc_cpu_seconds

from atrund import results
from atrund.atproto.session import Session
from atrund.dev.stack import LocalStack
from atrund.records import result_rkey
from atrund.state import State


async def side(stack: LocalStack, tmp: Path, label: str, gap: float, opts) -> dict:
    acct = stack.create_account(f"w{label}")
    session = await Session.login(stack.pds_url, acct.handle, acct.app_password)
    state = State(tmp / label / "atrund.sqlite3")
    writer = results.ResultWriter(session, state)
    commits = 0
    put, apply = session.put_record, session.apply_creates

    async def counted_put(*a, **k):
        nonlocal commits
        commits += 1
        return await put(*a, **k)

    async def counted_apply(*a, **k):
        nonlocal commits
        commits += 1
        return await apply(*a, **k)

    session.put_record, session.apply_creates = counted_put, counted_apply
    results.COMMIT_GAP = gap
    loop = asyncio.create_task(writer.run())
    queued: dict[str, float] = {}
    bundle = {"uri": f"at://{acct.did}/dev.atrun.bundle/3kbench", "cid": "bafyreib2rxk3rh6kzwq"}
    try:
        cpu0, t0 = proc_cpu_seconds(stack.pid), time.monotonic()
        for n in range(opts.n):
            uri = f"at://did:plc:authorxyz/dev.atrun.invocation/3kbench{n:06d}"
            state.accept(uri, "did:plc:authorxyz", bundle["cid"], {})
            record = {"invocation": {"uri": uri, "cid": bundle["cid"]}, "bundle": bundle, "status": "success",
                      "data": {"i": n}, "createdAt": "2026-12-06T00:00:00.000Z"}
            state.finish(uri, "success", result_rkey(uri), record)
            queued[uri] = time.monotonic()
            writer.wake()
            await asyncio.sleep(max(0.0, t0 + (n + 1) / opts.rate - time.monotonic()))
        while writer.written < opts.n:
            if time.monotonic() - t0 > opts.timeout:
                raise SystemExit(f"{label}: {writer.written} of {opts.n} results written after {opts.timeout} s")
            await asyncio.sleep(0.01)
        took, cpu = time.monotonic() - t0, proc_cpu_seconds(stack.pid) - cpu0
    finally:
        loop.cancel()
        writer.quarantine.close()
        state.close()
        await session.close()
    # the delay from queued to written, read from the outbox's written stamps is not kept: use the
    # writer's pace instead (results after the last queued one)
    return {"gap": gap, "pds_ms": cpu * 1000 / opts.n, "commits": commits, "per_commit": opts.n / max(1, commits),
            "tail_ms": (took - opts.n / opts.rate) * 1000}


async def main(opts) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="atrund-results-") as tmp_name:
        tmp = Path(tmp_name)
        with LocalStack(data_dir=tmp / "stack") as stack:
            for r in range(opts.rounds):
                for gap in (0.0, opts.gap):
                    rows.append(await side(stack, tmp, f"r{r}g{int(gap * 1000)}", gap, opts))
    print(f"{opts.n} results at {opts.rate:.0f}/s through a ResultWriter to the reference PDS")
    print(f"{'gap':>6} {'PDS CPU/result':>15} {'commits':>8} {'results/commit':>15} {'last written after the last queued':>36}")
    for r in rows:
        print(f"{r['gap'] * 1000:>4.0f}ms {r['pds_ms']:>12.2f} ms {r['commits']:>8} {r['per_commit']:>15.1f} {r['tail_ms']:>33.0f} ms")
    for gap in sorted({r["gap"] for r in rows}):
        print(f"gap {gap * 1000:.0f} ms: PDS CPU per result, median {statistics.median(r['pds_ms'] for r in rows if r['gap'] == gap):.2f} ms")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/results.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", type=int, default=400, help="results per side")
    p.add_argument("--rate", type=float, default=40.0, help="results queued a second")
    p.add_argument("--gap", type=float, default=results.COMMIT_GAP, help="the gap of the second side (the first: 0)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120)
    sys.exit(asyncio.run(main(p.parse_args())))
