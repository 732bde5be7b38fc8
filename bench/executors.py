"""Executor benchmark: cold start, warm and hot round trips and throughput, per runtime and backend.

Method (all on this machine, in one run, so the figures are comparable):
- cold: a pool with no warm workers and reuse off; time from execute() to the answer (spawn,
  runtime start, ready line, request, answer).
- warm: a pool kept warm, reuse off; time from execute() to the answer with a worker already
  waiting (it still loads the bundle). Calls are spaced so the refill of the pool does not
  compete with the measured call.
- hot: reuse on (the default); the same bundle again and again, so every request after the
  first goes to the worker that served the one before, bundle loaded (the first is not counted).
- bare start: the runtime's own start of an empty program (`python3 -I -S -c pass`,
  `deno run` of an empty file, `node` of an empty file), the floor any fresh process pays.
- in-process: the endpoint called in an already-running interpreter (Python only), so that
  "runner overhead" = warm round trip - in-process call.
- throughput: M trivial invocations through a pool at concurrency 2 and 8 (warm = concurrency),
  reuse on.

    .venv/bin/python bench/executors.py [-n 30] [--runtimes python,deno,node] [--backends none,process]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atrund.config import ExecutorSection  # noqa: E402
from atrund.execute import ExecRequest, create_executor  # noqa: E402
from atrund.execute.runtimes import load_runtimes  # noqa: E402

BUNDLES = {
    "python": ("def main(args):\n    return {'ok': True}\n", ".py"),
    "deno": ("export function main(args) { return { ok: true } }\n", ".ts"),
    "node": ("export function main(args) { return { ok: true } }\n", ".mjs"),
}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def bare_start(runtime: str, program: str, tmp: Path, n: int) -> float:
    empty = tmp / f"empty{BUNDLES[runtime][1]}"
    empty.write_text("")
    cmd = {"python": [program, "-I", "-S", "-c", "pass"], "deno": [program, "run", "--no-config", "-q", str(empty)],
           "node": [program, str(empty)]}[runtime]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


async def round_trips(runtime: str, backend: str, code: Path, n: int, warm: int, reuse: str = "never") -> list[float]:
    executor = create_executor(ExecutorSection(warm=warm, isolation=backend, concurrency=max(warm, 1), reuse=reuse))
    if warm:
        await executor.warm(warm)
    times = []
    try:
        for _ in range(n):
            req = ExecRequest(code_path=str(code), endpoint="main", timeout=30)
            t = time.perf_counter()
            r = await executor.execute(req, runtime)
            times.append((time.perf_counter() - t) * 1000)
            assert r.success, r.error
            if warm and reuse == "never":
                for _ in range(200):  # let the refill finish so it does not compete with the next call
                    if executor.stats().warm[runtime] >= warm:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.02)
    finally:
        await executor.shutdown()
    return times


async def throughput(runtime: str, backend: str, code: Path, total: int, concurrency: int) -> float:
    executor = create_executor(ExecutorSection(warm=concurrency, isolation=backend, concurrency=concurrency))
    await executor.warm(concurrency)
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            r = await executor.execute(ExecRequest(code_path=str(code), endpoint="main", timeout=30), runtime)
            assert r.success, r.error

    t = time.perf_counter()
    try:
        await asyncio.gather(*(one() for _ in range(total)))
    finally:
        await executor.shutdown()
    return total / (time.perf_counter() - t)


def in_process_call_ms(n: int = 10000) -> float:
    ns: dict = {}
    exec(BUNDLES["python"][0], ns)  # noqa: S102 - our own constant benchmark bundle
    fn = ns["main"]
    t = time.perf_counter()
    for _ in range(n):
        fn({})
    return (time.perf_counter() - t) * 1000 / n


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=30, help="round trips per measurement")
    ap.add_argument("--runtimes", default="python,deno,node")
    ap.add_argument("--backends", default="none,process")
    ap.add_argument("--throughput", type=int, default=100, help="invocations per throughput run (0: skip)")
    opts = ap.parse_args()
    runtimes = load_runtimes(ExecutorSection().runtimes_dir)
    tmp = Path(tempfile.mkdtemp(prefix="atrund-bench-"))
    baseline = in_process_call_ms()
    print(f"in-process call of the Python endpoint: {baseline * 1000:.2f} µs")
    header = (f"{'runtime':8} {'backend':8} {'bare p50':>9} {'cold p50':>9} {'cold p95':>9} {'warm p50':>9} {'warm p95':>9} "
              f"{'hot p50':>9} {'hot p95':>9} {'overhead':>9} {'c=2 /s':>8} {'c=8 /s':>8}")
    print(header)
    print("-" * len(header))
    for rt_name in opts.runtimes.split(","):
        if rt_name not in runtimes:
            print(f"{rt_name:8} (no runtime directory)")
            continue
        source, ext = BUNDLES[rt_name]
        code = tmp / f"bundle{ext}"
        code.write_text(source)
        program = next(w for w in reversed(runtimes[rt_name].command) if w.startswith("/") and not w.startswith(str(runtimes[rt_name].dir)))
        bare = bare_start(rt_name, program, tmp, opts.n)
        for backend in opts.backends.split(","):
            cold = await round_trips(rt_name, backend, code, opts.n, warm=0)
            warm = await round_trips(rt_name, backend, code, opts.n, warm=2)
            hot = (await round_trips(rt_name, backend, code, opts.n + 1, warm=0, reuse="bundle"))[1:]
            tp2 = await throughput(rt_name, backend, code, opts.throughput, 2) if opts.throughput else 0
            tp8 = await throughput(rt_name, backend, code, opts.throughput, 8) if opts.throughput else 0
            h50 = statistics.median(hot)
            overhead = f"{h50 - baseline:.2f}" if rt_name == "python" else "-"
            print(f"{rt_name:8} {backend:8} {bare:9.1f} {statistics.median(cold):9.1f} {pct(cold, .95):9.1f} "
                  f"{statistics.median(warm):9.2f} {pct(warm, .95):9.2f} {h50:9.2f} {pct(hot, .95):9.2f} {overhead:>9} "
                  f"{tp2:8.1f} {tp8:8.1f}")
    print("ms unless noted; overhead: hot round trip minus the in-process call of the same endpoint.")


if __name__ == "__main__":
    asyncio.run(main())
