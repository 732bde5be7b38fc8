"""Container backend benchmark: atrund's cold and warm round trips against plain Docker, in one run.

Method (one machine, one run, the same image, so the figures compare):
- docker run: `docker run --rm IMAGE python3 -c pass` through the docker CLI, the baseline a
  cold start is held to (target: cold within 1.2x of it). Also with the same hardening flags
  the backend uses, since those cost time too.
- docker exec: `docker exec CONTAINER python3 -c pass` into a running container, the usual
  way to get a warm-ish start (the warm round trip is held to <= 20 ms p50, docker exec is
  about 80-100 ms here).
- atrund cold: a container pool with no warm workers; execute() to the answer (create, attach,
  start, at-run-exec ready, request, answer). The container's removal runs after the answer,
  off the caller's path, as in production.
- atrund warm: a pool kept warm; execute() to the answer with a worker already waiting.
  Calls are spaced so refilling the pool does not compete with the measured call.

    .venv/bin/python bench/containers.py [-n 20] [--runtime runc|runsc] [--image atrund-runtime:latest]
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

HARDENED = ["--read-only", "--tmpfs", "/tmp:size=64m", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--network", "none", "--pids-limit", "64", "--memory", "640m", "--user", "900000:900000", "--init"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def timed(cmd: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append((time.perf_counter() - t) * 1000)
    return out


def docker_exec(image: str, runtime: str, n: int) -> list[float]:
    cid = subprocess.run(["docker", "run", "-d", "--rm", "--runtime", runtime, image, "sleep", "600"],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        timed(["docker", "exec", cid, "python3", "-c", "pass"], 2)  # first exec warms the engine's caches
        return timed(["docker", "exec", cid, "python3", "-c", "pass"], n)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


async def atrund(settings: ExecutorSection, code: str, n: int, warm: int) -> list[float]:
    executor = create_executor(settings)
    if warm:
        await executor.warm(warm)
    request = ExecRequest(code_path=code, endpoint="main", timeout=30)
    out = []
    try:
        await executor.execute(request, "python")  # the engine connection and image check, once
        for _ in range(n):
            if warm:
                for _ in range(200):  # wait for the refill: measure a call that finds a worker waiting
                    if executor.stats().warm["python"] >= warm:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(0.3)  # let the previous container's removal finish
            t = time.perf_counter()
            r = await executor.execute(request, "python")
            out.append((time.perf_counter() - t) * 1000)
            assert r.success, r.error
    finally:
        await executor.shutdown()
    return out


def row(name: str, values: list[float]) -> str:
    return f"{name:<34} p50 {statistics.median(values):7.1f} ms   p90 {pct(values, 0.9):7.1f} ms   n={len(values)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--runtime", default="runc", choices=["runc", "runsc"])
    parser.add_argument("--image", default="atrund-runtime:latest")
    args = parser.parse_args()
    settings = dict(isolation="container", container={"image": args.image, "runtime": args.runtime})
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "bundle.py"
        code.write_text("def main(args):\n    return {'ok': True}\n")
        print(f"container backend, runtime {args.runtime}, image {args.image}, n={args.n}", flush=True)
        run = ["docker", "run", "--rm", "--runtime", args.runtime]
        figures = {
            "docker run --rm (plain)": timed([*run, args.image, "python3", "-c", "pass"], args.n),
            "docker run --rm (hardened)": timed([*run, *HARDENED, args.image, "python3", "-c", "pass"], args.n),
            "docker exec": docker_exec(args.image, args.runtime, args.n),
            "atrund cold": asyncio.run(atrund(ExecutorSection(warm=0, **settings), str(code), args.n, 0)),
            "atrund warm": asyncio.run(atrund(ExecutorSection(warm=1, **settings), str(code), args.n, 1)),
        }
    for name, values in figures.items():
        print(row(name, values))
    p50 = {name: statistics.median(v) for name, v in figures.items()}
    cold_ratio = p50["atrund cold"] / p50["docker run --rm (plain)"]
    print(f"cold / docker run (plain):    {cold_ratio:.2f}x   (target <= 1.2x)")
    print(f"cold / docker run (hardened): {p50['atrund cold'] / p50['docker run --rm (hardened)']:.2f}x")
    print(f"warm / docker exec:           {p50['atrund warm'] / p50['docker exec']:.3f}x   "
          f"(warm p50 {p50['atrund warm']:.1f} ms, target <= 20 ms)")


if __name__ == "__main__":
    main()
