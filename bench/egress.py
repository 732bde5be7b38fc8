"""Egress benchmark: what the egress proxy adds to a connection, beside a direct one, in one run.

Method (one machine, one run, so the figures are comparable): a server process on loopback
(an echo port, a sink that reads to EOF, a source that writes N MiB) and the same Python bundle
run twice: under ``process`` granted ``127.0.0.1:PORT`` (with ``net_private = 127.0.0.1/32``),
so every connection goes through its network namespace and the runner's egress proxy, and
under ``none`` (no sandbox: the host's network, a direct connection). Inside the bundle:

- connect: time to connect, send one byte and read its echo, per connection (median, p95);
- upload / download: MiB/s over one connection, sending to the sink / reading from the source.

Goal (issue 15): at most 1 ms added per connection, at least 0.5x the direct throughput.

    .venv/bin/python bench/egress.py [-n 200] [--mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atrund.config import ExecutorSection  # noqa: E402
from atrund.execute import ExecRequest, create_executor  # noqa: E402
from atrund.execute.protocol import ExecPermissions  # noqa: E402

SERVER = r"""
import socket, sys, threading
def serve(sock, handle):
    while True:
        c, _ = sock.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def echo(c):
    with c:
        while d := c.recv(65536):
            c.sendall(d)
def sink(c):
    with c:
        n = 0
        while d := c.recv(1 << 20):
            n += len(d)
        c.sendall(str(n).encode())
def source(c):
    with c:
        size = int(c.recv(64))
        block = b"x" * (1 << 20)
        for _ in range(size):
            c.sendall(block)
socks = []
for handler in (echo, sink, source):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64); socks.append(s)
    threading.Thread(target=serve, args=(s, handler), daemon=True).start()
print(" ".join(str(s.getsockname()[1]) for s in socks), flush=True)
sys.stdin.read()
"""

BUNDLE = r"""
import socket, statistics, time

def main(a):
    host = "127.0.0.1"
    lat = []
    for _ in range(a["n"]):
        t = time.perf_counter()
        s = socket.create_connection((host, a["echo"]))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        s.recv(1)
        lat.append((time.perf_counter() - t) * 1000)
        s.close()
    block = b"x" * (1 << 20)
    s = socket.create_connection((host, a["sink"]))
    t = time.perf_counter()
    for _ in range(a["mib"]):
        s.sendall(block)
    s.shutdown(socket.SHUT_WR)
    got = int(s.recv(64))
    up = time.perf_counter() - t
    s.close()
    s = socket.create_connection((host, a["source"]))
    t = time.perf_counter()
    s.sendall(str(a["mib"]).encode())
    n = 0
    while d := s.recv(1 << 20):
        n += len(d)
    down = time.perf_counter() - t
    lat.sort()
    return {"connect_ms": statistics.median(lat), "connect_p95_ms": lat[int(0.95 * (len(lat) - 1))],
            "upload_mib_s": got / up / (1 << 20), "download_mib_s": n / down / (1 << 20)}
"""


async def run(isolation: str, path: str, args: dict, ports: list[int]) -> dict:
    settings = ExecutorSection(isolation=isolation, warm=0, memory_mb=256, max_timeout=300)
    executor = create_executor(settings)
    try:
        net = [f"127.0.0.1:{p}" for p in ports]
        request = ExecRequest(code_path=path, endpoint="main", args=args, timeout=300,
                              permissions=ExecPermissions(net=net, net_private=["127.0.0.1/32"]))
        r = await executor.execute(request, "python")
        if not r.success:
            raise SystemExit(f"{isolation}: {r.error}")
        return r.data
    finally:
        await executor.shutdown()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help="connections timed")
    parser.add_argument("--mib", type=int, default=256, help="MiB sent and received")
    opts = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        echo, sink, source = (int(p) for p in server.stdout.readline().split())
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(BUNDLE)
        os.chmod(f.name, 0o644)
        args = {"n": opts.n, "mib": opts.mib, "echo": echo, "sink": sink, "source": source}
        direct = await run("none", f.name, args, [echo, sink, source])
        proxied = await run("process", f.name, args, [echo, sink, source])
    finally:
        server.stdin.close()
        server.wait()
        os.unlink(f.name)
    print(f"{'':24}{'direct (none)':>16}{'egress proxy':>16}{'proxy/direct':>14}")
    for key, unit in (("connect_ms", "ms"), ("connect_p95_ms", "ms"), ("upload_mib_s", "MiB/s"), ("download_mib_s", "MiB/s")):
        print(f"{key + ' (' + unit + ')':24}{direct[key]:16.3f}{proxied[key]:16.3f}{proxied[key] / direct[key]:14.2f}")
    added = proxied["connect_ms"] - direct["connect_ms"]
    print(f"\nadded per connection (median): {added:.3f} ms (goal <= 1 ms)")
    print(f"throughput ratio: upload {proxied['upload_mib_s'] / direct['upload_mib_s']:.2f}x, "
          f"download {proxied['download_mib_s'] / direct['download_mib_s']:.2f}x (goal >= 0.5x)")
    print(json.dumps({"direct": direct, "proxied": proxied}))


if __name__ == "__main__":
    asyncio.run(main())
