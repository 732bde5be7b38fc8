"""Bundle state (ctx.state) costs: a get or set round trip inside a hot worker, and what a run's
writes add to the commit of its outcome on SQLite.

    .venv/bin/python bench/state.py                 # process backend when root, else none
    .venv/bin/python bench/state.py --isolation none --runs 50 --calls 200

Method
------
1. Round trips. One executor (``warm = 0``, reuse on), a real State on a tmp file and the
   runner's BundleState. A Python bundle times each of ``--calls`` ``ctx.state.set`` and then as
   many ``ctx.state.get`` with ``time.perf_counter`` around the call, inside the bundle: the
   worker's line out, the runner's parse, the store read (or the buffered write), the reply in.
   ``--runs`` runs, each in the same hot worker after a first run that is not counted; the
   writes of each run are committed (a transaction of their own, as for the gateway).
2. Commit cost. ``State.finish`` (mark done + queue the result record, one transaction, WAL,
   synchronous=FULL) timed ``--commits`` times without writes and as many times with a
   counter's write (one key), alternating; the figure is the difference of the medians.

Prints p50 and p95 of each, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atrund.config import BundleStateSection, ExecutorSection  # noqa: E402
from atrund.execute import ExecRequest, create_executor  # noqa: E402
from atrund.kv import BundleState  # noqa: E402
from atrund.state import BundleWrites, State  # noqa: E402

BUNDLE = """
import time

def calls(args, ctx):
    sets, gets = [], []
    for i in range(args["n"]):
        t = time.perf_counter()
        ctx.state.set(f"k{i % 50}", {"i": i})
        sets.append(time.perf_counter() - t)
    for i in range(args["n"]):
        t = time.perf_counter()
        ctx.state.get(f"k{i % 50}")
        gets.append(time.perf_counter() - t)
    return {"set": [int(x * 1e6) for x in sets], "get": [int(x * 1e6) for x in gets]}
"""
URI = "at://did:plc:benchbenchbenchbenchbenc/dev.atrun.bundle/counter"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * (len(values) - 1)))]


async def round_trips(isolation: str, runs: int, calls: int, work: Path) -> dict[str, list[float]]:
    code = work / "bundle.py"
    code.write_text(BUNDLE)
    code.chmod(0o644)
    work.chmod(0o755)
    store = State(work / "state" / "atrund.sqlite3")
    kv = BundleState(store, BundleStateSection(max_ops_per_run=2 * calls))
    executor = create_executor(ExecutorSection(isolation=isolation, warm=0))
    out: dict[str, list[float]] = {"set": [], "get": []}
    try:
        for i in range(runs + 1):
            session = kv.session(URI)
            r = await executor.execute(ExecRequest(code_path=str(code), endpoint="calls", args={"n": calls}, timeout=60),
                                       "python", session)
            assert r.success, r.error
            kv.commit_alone(session)
            if i:  # the first run starts the worker and loads the bundle
                for kind in out:
                    out[kind] += [us / 1000 for us in r.data[kind]]
        print(f"pool: {executor.stats()}")
    finally:
        await executor.shutdown()
        store.close()
    return out


def commits(n: int, work: Path) -> dict[str, list[float]]:
    store = State(work / "commits" / "atrund.sqlite3")
    record = {"$type": "dev.atrun.result", "status": "success", "data": {"n": 1}}
    out: dict[str, list[float]] = {"without state": [], "with a write": []}
    try:
        for i in range(2 * n):
            uri = f"at://did:plc:bench/dev.atrun.invocation/{i:013d}"
            store.accept(uri, "did:plc:bench", "cid", {})
            store.mark_running(uri)
            writes = BundleWrites("did:plc:bench", "counter", {"n": str(i)}) if i % 2 else None
            t = time.perf_counter()
            store.finish(uri, "success", f"r{i}", record, writes)
            out["with a write" if writes else "without state"].append((time.perf_counter() - t) * 1000)
    finally:
        store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isolation", default="process" if os.geteuid() == 0 else "none")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--calls", type=int, default=100, help="sets and as many gets per run")
    ap.add_argument("--commits", type=int, default=300)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trips = asyncio.run(round_trips(a.isolation, a.runs, a.calls, work))
        for kind, values in trips.items():
            print(f"ctx.state.{kind} round trip ({a.isolation}, hot worker, n={len(values)}): "
                  f"p50 {statistics.median(values):.3f} ms, p95 {pct(values, 0.95):.3f} ms")
        figures = commits(a.commits, work)
        for kind, values in figures.items():
            print(f"State.finish {kind} (n={len(values)}): p50 {statistics.median(values):.3f} ms, p95 {pct(values, 0.95):.3f} ms")
        added = statistics.median(figures["with a write"]) - statistics.median(figures["without state"])
        print(f"added by a run's write to the commit: {added:+.3f} ms (p50)")


if __name__ == "__main__":
    main()
