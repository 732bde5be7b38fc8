"""The egress proxy of one worker: every TCP connection its namespace lets out passes here.

A connection arrives on a listener in the worker's namespace (netns.py), to the address and
port the worker asked for. The proxy lets it through only if a grant opens that port to that
address: an address the worker's DNS responder handed out for a granted name (and a port that
name's grant opens), or an address a grant names literally. It then connects, from the runner's
own namespace, to that same address (never to a name: the answer it checked is the address it
uses, so a second lookup cannot rebind it), unless the address is private in any form and no
``[permissions] net_private`` range holds it. A refused connection is reset, as a closed port.

Each listener has a thread that accepts; each connection a thread that checks, connects and
then moves the bytes one way while a second thread moves them back, in the kernel (``splice``
through a pipe), counted as they go. A copy through the event loop carried a fifth of a direct
connection's throughput; the DNS responder, whose answers are small, stays on the loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from dataclasses import dataclass, field

import structlog

from atrund.execute.egress import netns
from atrund.execute.egress.dns import Resolver, Responder
from atrund.execute.egress.policy import Grants, IPAddress
from atrund.execute.protocol import ExecEgress

log = structlog.get_logger("atrund.egress")
CONNECT_TIMEOUT = 10.0
SETTLE_SECONDS = 0.2  # how long a count waits for the connections a worker just made to be checked
MAX_LINKS = 64  # connections one worker may hold open at once (two runner threads each)
CHUNK = 1 << 20
F_SETPIPE_SZ = 1031


@dataclass
class Counts:
    """What a worker's egress carried: connections let out and refused, bytes each way. Each
    splice thread counts in a cell of its own (one writer, no lock per chunk), folded in when it
    ends; a snapshot adds the live cells."""

    connections: int = 0
    refused: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    live: dict[int, tuple[str, list[int]]] = field(default_factory=dict, repr=False)

    def add(self, name: str, n: int) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def cell(self, name: str) -> list[int]:
        cell = [0]
        with self.lock:
            self.live[id(cell)] = (name, cell)
        return cell

    def fold(self, cell: list[int]) -> None:
        with self.lock:
            name, _ = self.live.pop(id(cell))
            setattr(self, name, getattr(self, name) + cell[0])

    def snapshot(self) -> ExecEgress:
        with self.lock:
            running = {"bytes_out": 0, "bytes_in": 0}
            for name, cell in self.live.values():
                running[name] += cell[0]
            return ExecEgress(self.connections, self.refused, self.bytes_out + running["bytes_out"],
                              self.bytes_in + running["bytes_in"])


class Egress:
    """One worker's network: its namespace, DNS responder and proxy, until closed."""

    def __init__(self, grants: Grants, resolver: Resolver, helper=None) -> None:
        self.grants = grants
        self.resolver = resolver
        self.helper = helper  # an unprivileged runner's privileged helper (forked.ForkServer), which makes the namespace
        self.counts = Counts()  # the pool reads them around each request (result metrics, /metrics)
        self.handed: dict[IPAddress, str] = {}
        self.namespace: netns.Namespace | None = None
        self._closed = False
        self._transports: list[asyncio.BaseTransport] = []
        self._links: set[socket.socket] = set()  # both ends of every open connection
        self._unchecked: set[int] = set()  # connections accepted, not yet counted as let out or refused (ids)
        self._on_refuse: dict[int, object] = {}  # relayed connections (ids): what to call if refused
        self._responder = Responder(grants, resolver, self.handed)  # for queries that come as bytes (answer())

    @property
    def netns_fd(self) -> int:
        assert self.namespace is not None
        return self.namespace.fd

    async def start(self, existing: int | None = None, resolv_conf: str = "/etc/resolv.conf",
                    container: tuple[str, int] | None = None) -> None:
        """Make the worker's namespace (or set up ``existing``, a descriptor of a namespace with
        nothing but loopback) and serve it. ``resolv_conf``: the file the worker's resolver reads.
        With a helper, the helper makes it; ``container`` (its id and its init's pid) then names
        the namespace to set up instead of ``existing``."""
        if self.helper is not None:
            servers = None if container else netns.nameservers(resolv_conf)
            ns = self.namespace = await self.helper.netns(self.grants.ports, servers, container)
        else:
            ns = self.namespace = await asyncio.to_thread(netns.create, self.grants.ports, netns.nameservers(resolv_conf), existing)
        loop = asyncio.get_running_loop()
        try:
            for sock in ns.dns:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: Responder(self.grants, self.resolver, self.handed), sock=sock)
                self._transports.append(transport)
        except BaseException:
            await self.close()
            raise
        for listener in ns.listeners:
            listener.setblocking(True)
            threading.Thread(target=self._accept, args=(listener,), daemon=True, name="atrund-egress").start()

    async def close(self) -> None:
        self._closed = True
        for transport in self._transports:
            transport.close()
        if self.namespace is not None:
            for listener in self.namespace.listeners:
                _shut(listener)  # wakes its accept thread, which then ends
        for sock in list(self._links):
            _shut(sock)  # ends the splice threads, which close their sockets
        if self.namespace is not None:
            self.namespace.close()
            self.namespace = None

    async def answer(self, query: bytes) -> bytes | None:
        """The DNS answer to a query a worker sent another way than to its namespace's DNS
        socket (a microVM's guest relays its resolver's datagrams); None: not DNS."""
        return await self._responder.reply(query)

    async def settled(self, within: float = SETTLE_SECONDS) -> None:
        """Wait, at most ``within`` seconds, until every connection the worker has made so far
        is counted: none waits in a listener's accept queue or for its check. A worker's
        connect() returns as soon as the kernel queued the connection, before a proxy thread
        took it, so a count read right after a request could miss its last connections."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._unchecked or any(_backlog(sock) for sock in (self.namespace.listeners if self.namespace else ())):
            if loop.time() >= deadline:
                return
            await asyncio.sleep(0.001)

    def allowed(self, address: IPAddress, port: int) -> str | None:
        """Why a connection to ``address:port`` is refused, or None."""
        name = self.handed.get(address) or self.handed.get(self.grants.target(address))
        if not ((name is not None and port in self.grants.name_ports(name)) or port in self.grants.address_ports(address)):
            return f"{self.grants.target(address)} port {port} is not granted"
        return self.grants.refused(address)

    # Threads from here on: a connection is accepted, checked, connected and carried without a
    # hop through the event loop (each hop cost a loop wake-up per connection).

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # shut down by close()
            self._unchecked.add(id(conn))  # set.add and discard are atomic under the GIL
            self._start(conn, None)

    def relay(self, conn: socket.socket, address: IPAddress, port: int, refused=None) -> None:
        """Carry ``conn`` (a connected stream socket) as a connection the worker made to
        ``address:port``, checked and counted as one accepted in its namespace. For a worker
        whose connections reach the runner another way than a listener (a microVM's guest names
        the destination in its open frame); no namespace is made for those. ``refused``, if
        given, is called (from a proxy thread) when the connection is refused: the end of a Unix
        socket pair cannot say "reset" by itself."""
        if refused is not None:
            self._on_refuse[id(conn)] = refused
        self._unchecked.add(id(conn))
        self._start(conn, (address, port))

    def _start(self, conn: socket.socket, destination: tuple[IPAddress, int] | None) -> None:
        try:
            threading.Thread(target=self._link, args=(conn, destination), daemon=True, name="atrund-egress").start()
        except RuntimeError:  # no thread to be had: refused, as a full backlog would be
            self._refuse(conn, "the runner cannot start a thread for it")

    def _link(self, conn: socket.socket, destination: tuple[IPAddress, int] | None) -> None:
        try:
            self._carry(conn, destination)
        except (OSError, RuntimeError) as e:  # the worker reset it meanwhile; no thread or descriptor left
            log.info("egress connection failed", why=str(e))
            self._unchecked.discard(id(conn))
            conn.close()

    def _carry(self, conn: socket.socket, destination: tuple[IPAddress, int] | None) -> None:
        if destination is None:  # accepted in the namespace: the address the worker asked for
            host, port = conn.getsockname()[:2]
            address = ipaddress.ip_address(host.split("%")[0])
        else:
            address, port = destination
        why = self.allowed(address, port)
        if why is None and len(self._links) >= 2 * MAX_LINKS:
            why = f"more than {MAX_LINKS} connections open at once"
        if why is not None:
            return self._refuse(conn, why)
        target = self.grants.target(address)
        up = socket.socket(socket.AF_INET if target.version == 4 else socket.AF_INET6, socket.SOCK_STREAM)
        up.settimeout(CONNECT_TIMEOUT)
        try:
            up.connect((str(target), port))
        except OSError as e:
            up.close()
            return self._refuse(conn, f"{target} port {port}: {e or 'timed out'}")
        up.settimeout(None)
        if self._closed:
            self._unchecked.discard(id(conn))
            up.close()
            conn.close()
            return
        self.counts.add("connections", 1)
        self._on_refuse.pop(id(conn), None)
        self._unchecked.discard(id(conn))
        for sock in (conn, up):
            if sock.family != socket.AF_UNIX:  # a relayed connection's end is a Unix socket pair
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._links.add(sock)
        ends = [2]  # the second pump to finish closes both sockets
        lock = threading.Lock()
        try:
            threading.Thread(target=self._pump, args=(up, conn, "bytes_in", ends, lock), daemon=True,
                             name="atrund-egress").start()
        except RuntimeError:
            ends[0] = 1  # no thread for the way back: this pump stops at once and closes both
            _shut(conn)
        self._pump(conn, up, "bytes_out", ends, lock)

    def _refuse(self, conn: socket.socket, why: str) -> None:
        if (tell := self._on_refuse.pop(id(conn), None)) is not None:
            tell()
        self.counts.add("refused", 1)
        self._unchecked.discard(id(conn))
        log.info("egress refused", why=why)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, as a closed port
        conn.close()

    def _pump(self, src: socket.socket, dst: socket.socket, name: str, ends: list[int], lock: threading.Lock) -> None:
        """Move bytes from ``src`` to ``dst`` in the kernel until EOF, then pass the EOF on."""
        cell = self.counts.cell(name)
        s, d = src.fileno(), dst.fileno()
        r = w = -1
        try:
            r, w = os.pipe()
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
            except OSError:
                pass  # a smaller pipe only moves less per call
            while n := os.splice(s, w, CHUNK):
                while n:
                    moved = os.splice(r, d, n)
                    n -= moved
                    cell[0] += moved
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _shut(src)
            _shut(dst)
        finally:
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
            self.counts.fold(cell)
            with lock:
                ends[0] -= 1
                last = ends[0] == 0
            if last:
                for sock in (src, dst):
                    self._links.discard(sock)
                    sock.close()


def _backlog(listener: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue: TCP_INFO's tcpi_unacked, which
    Linux fills with the accept backlog for a listener."""
    try:
        return struct.unpack_from("I", listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)[0]
    except OSError:
        return 0


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
