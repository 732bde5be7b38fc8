"""HTTP gateway benchmark: requests per second and latency of a trivial handleRequest, with hot
workers (reuse on) and without (reuse off), beside a bare aiohttp server, in one run.

    .venv/bin/python bench/gateway.py                 # 400 requests, 4 at a time
    .venv/bin/python bench/gateway.py -n 1000 -c 8 --warm 8 --concurrency 8

Method
------
1. Start a LocalStack (reference PDS + PLC on loopback); create an author and a runner account;
   publish a Python bundle whose handleRequest returns a fixed 200 "hi".
2. Start the runner as a real subprocess (``atrund serve``) with the gateway on a free loopback
   port, ``[executor] warm`` and ``concurrency`` from the flags, and a rate limit far above what
   is measured. Wait for /healthz. This is done twice, one runner after the other: with
   ``[executor] reuse = "bundle"`` (hot workers, the default) and with ``reuse = "never"``.
3. Warm-up (not counted): 2 x concurrency requests, so the bundle is fetched, verified and
   cached and the pool is warm.
4. Measure, closed loop: ``-c`` clients, each sending its next request when the previous answer
   arrived, until ``-n`` requests are answered. Latency = request sent -> whole body read, per
   request (aiohttp client, one keep-alive connection per client). Requests/s = n / wall time.
   Targets, in the same run:
   - ``hot latest``: /{did}/{rkey}/ - the latest bundle version (its CID is trusted for
     ``latest_cache_seconds``, default 5 s, so most requests do not ask the PDS), reuse on;
   - ``hot ?cid=``: pinned, no PDS lookups at all, reuse on;
   - ``hot printing``: pinned, reuse on, a bundle that prints a line per request, so each
     request also leaves a log entry (atrund.logbook: kept output, written once a second);
   - ``never ?cid=``: pinned, reuse off (a fresh worker per request, as before hot workers);
   - ``aiohttp hello``: a bare aiohttp server (subprocess) answering "hi" - the floor of this
     client and of aiohttp on this machine; the ratio says what running a bundle costs.
   Every answer should be 200 with body "hi"; others are counted and shown, and make the exit
   status 1 (the figures are printed all the same).

With reuse on, a request goes to a hot worker of the bundle, so the figure is the runner's own
request path plus one round trip to a waiting process; with reuse off it is bounded by how fast
the pool can start workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atrund import client  # noqa: E402
from atrund.atproto.session import Session  # noqa: E402
from atrund.dev.stack import LocalStack  # noqa: E402

HANDLER = 'def handleRequest(req):\n    return {"status": 200, "headers": {"content-type": "text/plain"}, "body": "hi"}\n'
# The same answer after printing a line: every request then leaves a log entry (atrund.logbook).
PRINTING = 'def handleRequest(req):\n    print("request", req["path"])\n' + HANDLER.split("\n", 1)[1]
HELLO_SERVER = '''
import sys
from aiohttp import web
async def hi(request):
    return web.Response(text="hi")
app = web.Application()
app.router.add_get("/", hi)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_up(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode} before answering {url}")
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout} s")


async def measure(url: str, n: int, clients: int) -> dict:
    latencies: list[float] = []
    bad: list[str] = []
    remaining = n

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            async with http.get(url) as r:
                body = await r.read()
            latencies.append(time.perf_counter() - t0)
            if r.status != 200 or body != b"hi":
                bad.append(f"{r.status} {body[:200]!r}")

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"n": n, "rps": n / wall, "p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000, "max_ms": max(latencies) * 1000,
            "bad": len(bad), "bad_example": bad[0] if bad else None}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", type=int, default=400, help="requests measured per target")
    p.add_argument("-c", "--clients", type=int, default=4, help="requests in flight")
    p.add_argument("--warm", type=int, default=4, help="runner's [executor] warm")
    p.add_argument("--concurrency", type=int, default=4, help="runner's [executor] concurrency")
    p.add_argument("--isolation", default=None, help="runner's [executor] isolation (unset: auto)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    opts = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="atrund-gw-bench-") as tmp, LocalStack(data_dir=Path(tmp) / "stack") as stack:
        d = Path(tmp)
        author, runner_account = stack.create_account("author"), stack.create_account("runner")
        session = await Session.login(stack.pds_url, author.handle, author.app_password)
        published = await client.publish(session, None, HANDLER.encode(), "python")
        printing = await client.publish(session, None, PRINTING.encode(), "python")
        uri, cid = published.uri, published.cid
        await session.close()
        rkey = uri.rsplit("/", 1)[1]

        hello_port = free_port()
        hello = subprocess.Popen([sys.executable, "-c", HELLO_SERVER, str(hello_port)], cwd=ROOT)
        results, health = {}, {}
        try:
            await wait_up(f"http://127.0.0.1:{hello_port}/", hello)
            for reuse in ("bundle", "never"):
                name = "hot" if reuse == "bundle" else "never"
                async with runner(d / reuse, stack, runner_account, author, opts, reuse) as base:
                    pinned = f"{base}/{author.did}/{rkey}/?cid={cid}"
                    await measure(pinned, 2 * opts.clients, opts.clients)  # warm-up, not counted
                    if reuse == "bundle":
                        results["hot latest"] = await measure(f"{base}/{author.did}/{rkey}/", opts.n, opts.clients)
                    results[f"{name} ?cid="] = await measure(pinned, opts.n, opts.clients)
                    if reuse == "bundle":
                        logged = f"{base}/{author.did}/{printing.uri.rsplit('/', 1)[1]}/?cid={printing.cid}"
                        await measure(logged, 2 * opts.clients, opts.clients)
                        results["hot printing"] = await measure(logged, opts.n, opts.clients)
                    async with aiohttp.ClientSession() as http:
                        async with http.get(f"{base}/healthz") as r:
                            health[name] = (await r.json())["pool"]
            results["aiohttp hello"] = await measure(f"http://127.0.0.1:{hello_port}/", opts.n, opts.clients)
        finally:
            hello.terminate()
            hello.wait(30)

    print(f"gateway bench: {opts.n} requests per target, {opts.clients} in flight; runner warm={opts.warm} "
          f"concurrency={opts.concurrency} isolation={health['hot']['isolation']}")
    print(f"{'target':<16} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'not 200':>8}")
    for name, r in results.items():
        print(f"{name:<16} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['max_ms']:>8.1f} {r['bad']:>8}")
        if r["bad"]:
            print(f"  e.g. {r['bad_example']}")
    floor = results["aiohttp hello"]["rps"]
    for name in ("hot latest", "hot ?cid=", "hot printing", "never ?cid="):
        print(f"{name}: {results[name]['rps'] / floor:.3f} x the bare aiohttp server's requests/s")
    print(f"hot printing (a log entry per request) / hot ?cid=: {results['hot printing']['rps'] / results['hot ?cid=']['rps']:.3f}")
    for name, pool in health.items():
        print(f"pool ({name}) after the run: cold starts {pool['coldStarts']}, hot hits {pool.get('hotHits')}, "
              f"completed {pool['completed']}, p50 {pool['latencyP50Ms']} ms, p95 {pool['latencyP95Ms']} ms (worker round trip)")
    if opts.json:
        print(json.dumps({"options": vars(opts), "results": results, "pool": health}))
    if any(r["bad"] for r in results.values()):
        sys.exit(1)


@contextlib.asynccontextmanager
async def runner(d: Path, stack, account, author, opts, reuse: str):
    """``atrund serve`` for ``account`` with its gateway on a free port; yields the gateway's URL."""
    d.mkdir()
    port = free_port()
    (d / "pw").write_text(account.app_password)
    isolation = f'isolation = "{opts.isolation}"\n' if opts.isolation else ""
    (d / "config.toml").write_text(
        f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{account.handle}"\npassword_file = "pw"\n'
        f'{stack.identity_toml()}[access]\nallowlist = ["{author.did}"]\n'
        f'[executor]\nwarm = {opts.warm}\nconcurrency = {opts.concurrency}\nreuse = "{reuse}"\n{isolation}'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nrate_per_minute = 10000000.0\nburst = 1000000\n'
        '[state]\ndir = "state"\n'
    )
    log = open(d / "runner.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "atrund.cli", "serve", "-c", str(d / "config.toml"), "--json-logs"],
                             stdout=log, stderr=log, cwd=d)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_up(f"{base}/healthz", serve)
        yield base
    finally:
        serve.terminate()
        serve.wait(30)
        log.close()
        problems = [line for line in (d / "runner.log").read_text(errors="replace").splitlines()
                    if '"level": "error"' in line or '"level": "warning"' in line]
        if problems:
            print(f"runner log ({reuse}): {len(problems)} warnings/errors, e.g.:", *problems[:5], sep="\n  ", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
