"""Replicas as separate hosts: a bridge on this host and, per replica, a network namespace joined
to it by a veth pair, with its own address (10.A.B.2, .3, ...; the host is 10.A.B.1). A replica in
one reaches Postgres, the PDS and the PLC over its veth, as it would across a network, and a test
can cut that link (``cut``/``mend``) to partition it. Shared test code, not tests.

Postgres can listen on the host's bridge address itself (atrund.dev.postgres's ``also_listen``).
The local stack listens on 127.0.0.1 only, and its DID documents name the PDS
``http://localhost:PORT``. So the host side runs a TCP relay on the bridge address for the
stack's ports (forwarded to loopback), and each namespace gets an /etc/netns/NAME/hosts in which
``localhost`` is the host's bridge address: ``ip netns exec`` mounts it over /etc/hosts, and a
replica's every connection to the stack then leaves through its veth. Its own loopback stays its own.

Names carry this process's pid and a counter (``at<pid>x<k>``), so concurrent runs never meet, and
everything made is removed on exit, a failed test included; nothing else is touched. Needs root and
iproute2 (scripts/setup installs it).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

_made = itertools.count()


def available() -> str | None:
    """Why namespaced replicas cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is missing (scripts/setup installs it)"
    return None


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> str:
    """A 10.A.B prefix no address or route of this host uses."""
    taken = _ip("-4", "-o", "addr") + _ip("-4", "route", "show", "table", "all")
    for n in itertools.count(os.getpid()):
        prefix = f"10.{200 + n // 256 % 50}.{n % 256}"
        if f" {prefix}." not in taken and f"\n{prefix}." not in "\n" + taken:
            return prefix
    raise AssertionError("unreachable")


class Subnet:
    """``with Subnet(ports) as net``: the bridge, the host relay for ``ports`` (on 127.0.0.1),
    and ``net.join(n)`` a namespace per replica."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.tag = f"at{os.getpid()}x{next(_made)}"
        self.bridge = f"{self.tag}b"
        self.prefix = _free_subnet()
        self.host = f"{self.prefix}.1"
        self.spaces: list[str] = []
        self._relay: subprocess.Popen | None = None

    def __enter__(self) -> Subnet:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            self._relay = subprocess.Popen([sys.executable, __file__, self.host, *map(str, self.ports)],
                                           stdout=subprocess.PIPE, text=True)
            assert self._relay.stdout.readline().strip() == "ready", "the host relay did not start"
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def veth(self, n: int) -> str:
        """The host end of replica ``n``'s veth pair."""
        return f"{self.tag}v{n}"

    def address(self, n: int) -> str:
        return f"{self.prefix}.{n + 2}"

    def join(self, n: int) -> str:
        """Namespace ``n``: its veth to the bridge, its address, its own loopback, and
        ``localhost`` meaning this host. Returns its name."""
        name, veth, peer = f"{self.tag}n{n}", self.veth(n), f"{self.tag}p{n}"
        _ip("netns", "add", name)
        self.spaces.append(name)
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(f"{self.host} localhost\n")
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", name)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", name, "link", "set", peer, "name", "eth0")
        _ip("-n", name, "addr", "add", f"{self.address(n)}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def command(self, n: int, argv: list[str]) -> list[str]:
        """``argv`` run in namespace ``n`` (``ip netns exec`` execs it: the same pid)."""
        return ["ip", "netns", "exec", self.spaces[n], *argv]

    def cut(self, n: int) -> None:
        """Partition replica ``n``: its link to the bridge goes down."""
        _ip("link", "set", self.veth(n), "down")

    def mend(self, n: int) -> None:
        _ip("link", "set", self.veth(n), "up")

    def close(self) -> None:
        if self._relay is not None:
            self._relay.kill()
            self._relay.wait()
            self._relay.stdout.close()
            self._relay = None
        for name in self.spaces:  # deleting a namespace deletes its end of the pair, and so the pair
            _ip("netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        self.spaces = []
        for n in range(64):  # a veth whose namespace was never made
            if _ip("link", "show", self.veth(n), check=False):
                _ip("link", "del", self.veth(n), check=False)
        _ip("link", "del", self.bridge, check=False)


# -- the host relay: python tests/netns.py ADDRESS PORT... -----------------------------------------

async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def _forward(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    up_writer.close()
    writer.close()


async def _relay(address: str, ports: list[int]) -> None:
    for port in ports:
        await asyncio.start_server(lambda r, w, port=port: _forward(port, r, w), address, port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_relay(sys.argv[1], [int(p) for p in sys.argv[2:]]))
