"""Executor benchmark: cold start, warm and hot round trips and throughput, per runtime and backend.

Method (all on this machine, in one run, so the figures are comparable):
- cold: a pool with no warm workers and reuse off; time from execute() to the answer (spawn,
  runtime start, ready line, request, answer). "cold CPU": the CPU time every process involved
  (runner, fork server, workers) used per cold call, which other load on the machine does not
  inflate the way it inflates wall time; "bare CPU" likewise for the bare start.
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

Backends: a backend name, or ``process-exec``: the process backend with its fork server off
(executor.process.fork_server = false), each worker a fresh setpriv + unshare + fence.py +
interpreter, as before the fork server; ``container-engine``: the container backend with the
engine's default seccomp profile (executor.container.seccomp = "engine") instead of the process
backend's allowlist, the peer of ``container``. A backend is prepared (the fork server started) before
the timed calls: that is paid once per runner, not per cold start.

    .venv/bin/python bench/executors.py [-n 30] [--runtimes python,deno,node] [--backends none,process,process-exec]
        [--cold-only] [--stages]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import resource
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


CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class CpuMeter:
    """CPU time of this process and everything it starts: a cpuacct cgroup of its own (cgroup v1,
    as root), which counts killed workers too; without one, this process and its reaped
    descendants (getrusage), which misses workers killed before their parents reaped them."""

    def __init__(self) -> None:
        self.group: Path | None = CPUACCT / f"atrund-bench-{os.getpid()}"
        try:
            self.group.mkdir()
            (self.group / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            self.group = None

    def ms(self) -> float:
        if self.group is not None:
            return int((self.group / "cpuacct.usage").read_text()) / 1e6
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime) * 1000

    def close(self) -> None:
        if self.group is not None:
            (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))
            try:
                self.group.rmdir()
            except OSError:
                pass  # a process of ours still in it; the next boot clears it


CPU = CpuMeter()
VARIANTS = {"process-exec": {"isolation": "process", "process": {"fork_server": False}},
            "container-engine": {"isolation": "container", "container": {"seccomp": "engine"}}}


def section(backend: str, **settings) -> ExecutorSection:
    return ExecutorSection(**{"isolation": backend, **VARIANTS.get(backend, {}), **settings})


def bare_start(runtime: str, program: str, tmp: Path, n: int) -> tuple[float, float]:
    empty = tmp / f"empty{BUNDLES[runtime][1]}"
    empty.write_text("")
    cmd = {"python": [program, "-I", "-S", "-c", "pass"], "deno": [program, "run", "--no-config", "-q", str(empty)],
           "node": [program, str(empty)]}[runtime]
    times = []
    cpu = CPU.ms()
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), (CPU.ms() - cpu) / n


async def round_trips(runtime: str, backend: str, code: Path, n: int, warm: int,
                      reuse: str = "never") -> tuple[list[float], float]:
    """Round-trip times, and the CPU-ms per call that the runner, the fork server (not its own
    start-up: measured from after ready()) and the workers used."""
    executor = create_executor(section(backend, warm=warm, concurrency=max(warm, 1), reuse=reuse))
    await executor.backend.ready()
    if warm:
        await executor.warm(warm)
    times = []
    cpu = CPU.ms()
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
    return times, (CPU.ms() - cpu) / n


async def throughput(runtime: str, backend: str, code: Path, total: int, concurrency: int) -> float:
    executor = create_executor(section(backend, warm=concurrency, concurrency=concurrency))
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


STAGES = ("spawn", "ready", "answer", "kill")


async def stages(runtime: str, backend: str, code: Path, n: int) -> list[tuple[float, float]]:
    """Where a cold start goes: p50 wall and CPU ms of each stage, one worker at a time, straight
    through the backend. spawn: until the backend returns the worker (sandbox set up, process
    made); ready: until its ready line; answer: request to answer (the runtime's own program
    starts here for deno and node); kill: the teardown, off the caller's path in the pool."""
    from atrund.execute.protocol import ExecPermissions

    executor = create_executor(section(backend, reuse="never"))
    await executor.backend.ready()
    rt = executor.runtimes[runtime]
    rows = []
    try:
        for _ in range(n):
            marks = [(time.perf_counter(), CPU.ms())]
            worker = await executor.backend.spawn(rt, executor.settings, ExecPermissions())
            marks.append((time.perf_counter(), CPU.ms()))
            await worker.stdout.readline()
            marks.append((time.perf_counter(), CPU.ms()))
            req = ExecRequest(code_path=worker.stage(str(code)), endpoint="main", timeout=30)
            worker.stdin.write(req.to_json().encode() + b"\n")
            await worker.stdin.drain()
            worker.stdin.close()
            answer = await worker.stdout.readline()
            marks.append((time.perf_counter(), CPU.ms()))
            await worker.kill()
            marks.append((time.perf_counter(), CPU.ms()))
            assert b'"success":true' in answer, answer
            rows.append([((b[0] - a[0]) * 1000, b[1] - a[1]) for a, b in itertools.pairwise(marks)])
            await asyncio.sleep(0.05)
    finally:
        await executor.shutdown()
    return [(statistics.median(r[i][0] for r in rows), statistics.median(r[i][1] for r in rows)) for i in range(len(STAGES))]


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
    ap.add_argument("--backends", default="none,process,process-exec")
    ap.add_argument("--throughput", type=int, default=100, help="invocations per throughput run (0: skip)")
    ap.add_argument("--cold-only", action="store_true", help="measure bare and cold starts only")
    ap.add_argument("--stages", action="store_true", help="only where a cold start's time goes, stage by stage")
    opts = ap.parse_args()
    if opts.stages:
        await print_stages(opts)
        return
    runtimes = load_runtimes(ExecutorSection().runtimes_dir)
    tmp = Path(tempfile.mkdtemp(prefix="atrund-bench-"))
    baseline = in_process_call_ms()
    print(f"in-process call of the Python endpoint: {baseline * 1000:.2f} µs")
    header = (f"{'runtime':8} {'backend':12} {'bare p50':>9} {'bare CPU':>9} {'cold p50':>9} {'cold p95':>9} {'cold CPU':>9} "
              f"{'warm p50':>9} {'warm p95':>9} "
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
        bare, bare_cpu = bare_start(rt_name, program, tmp, opts.n)
        for backend in opts.backends.split(","):
            cold, cold_cpu = await round_trips(rt_name, backend, code, opts.n, warm=0)
            warm = hot = [0.0]
            tp2 = tp8 = 0.0
            if not opts.cold_only:
                warm = (await round_trips(rt_name, backend, code, opts.n, warm=2))[0]
                hot = (await round_trips(rt_name, backend, code, opts.n + 1, warm=0, reuse="bundle"))[0][1:]
                tp2 = await throughput(rt_name, backend, code, opts.throughput, 2) if opts.throughput else 0
                tp8 = await throughput(rt_name, backend, code, opts.throughput, 8) if opts.throughput else 0
            h50 = statistics.median(hot)
            overhead = f"{h50 - baseline:.2f}" if rt_name == "python" else "-"
            print(f"{rt_name:8} {backend:12} {bare:9.1f} {bare_cpu:9.1f} {statistics.median(cold):9.1f} {pct(cold, .95):9.1f} "
                  f"{cold_cpu:9.1f} "
                  f"{statistics.median(warm):9.2f} {pct(warm, .95):9.2f} {h50:9.2f} {pct(hot, .95):9.2f} {overhead:>9} "
                  f"{tp2:8.1f} {tp8:8.1f}")
    print("ms unless noted; CPU: CPU-ms per start or cold call, every process counted (the runner's included); "
          "overhead: hot round trip minus the in-process call of the same endpoint.")


async def print_stages(opts) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="atrund-bench-"))
    print("p50 wall ms / CPU ms (every process) per stage of a cold start")
    for rt_name in opts.runtimes.split(","):
        source, ext = BUNDLES[rt_name]
        code = tmp / f"bundle{ext}"
        code.write_text(source)
        for backend in opts.backends.split(","):
            found = await stages(rt_name, backend, code, opts.n)
            print(f"{rt_name:8} {backend:12} " + "  ".join(f"{name} {w:6.1f}/{c:5.1f}" for name, (w, c) in zip(STAGES, found, strict=True))
                  + f"  total to answer {sum(w for w, _ in found[:3]):6.1f}/{sum(c for _, c in found[:3]):5.1f}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        CPU.close()
