"""The egress proxy of one worker: every TCP connection its namespace lets out passes here.

A connection arrives on a listener in the worker's namespace (netns.py), to the address and
port the worker asked for. The proxy lets it through only if a grant opens that port to that
address: an address the worker's DNS responder handed out for a granted name (and a port that
name's grant opens), or an address a grant names literally. It then connects, from the runner's
own namespace, to that same address (never to a name: the answer it checked is the address it
uses, so a second lookup cannot rebind it), unless the address is private in any form and no
``[permissions] net_private`` range holds it. Bytes and connections are counted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

import structlog

from atrund.execute.egress import netns
from atrund.execute.egress.dns import Resolver, Responder
from atrund.execute.egress.policy import Grants, IPAddress
from atrund.execute.protocol import ExecEgress

log = structlog.get_logger("atrund.egress")
CONNECT_TIMEOUT = 10.0
CHUNK = 256 * 1024


@dataclass
class Counts:
    """What a worker's egress carried: connections let out and refused, bytes each way."""

    connections: int = 0
    refused: int = 0
    bytes_out: int = 0
    bytes_in: int = 0

    def snapshot(self) -> ExecEgress:
        return ExecEgress(self.connections, self.refused, self.bytes_out, self.bytes_in)


class Egress:
    """One worker's network: its namespace, DNS responder and proxy, until closed."""

    def __init__(self, grants: Grants, resolver: Resolver) -> None:
        self.grants = grants
        self.resolver = resolver
        self.counts = Counts()  # the pool reads them around each request (result metrics, /metrics)
        self.handed: dict[IPAddress, str] = {}
        self.namespace: netns.Namespace | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._links: set[asyncio.Task] = set()

    @property
    def netns_fd(self) -> int:
        assert self.namespace is not None
        return self.namespace.fd

    async def start(self) -> None:
        ns = self.namespace = await asyncio.to_thread(netns.create, self.grants.ports, netns.nameservers())
        loop = asyncio.get_running_loop()
        try:
            for listener in ns.listeners:
                self._servers.append(await asyncio.start_server(self._serve, sock=listener))
            for sock in ns.dns:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: Responder(self.grants, self.resolver, self.handed), sock=sock)
                self._transports.append(transport)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._transports:
            transport.close()
        for task in list(self._links):
            task.cancel()
        if self._links:
            await asyncio.gather(*self._links, return_exceptions=True)
        if self.namespace is not None:
            self.namespace.close()  # the listeners asyncio had are closed already; closing again is harmless
            self.namespace = None

    def allowed(self, address: IPAddress, port: int) -> str | None:
        """Why a connection to ``address:port`` is refused, or None."""
        name = self.handed.get(address) or self.handed.get(self.grants.target(address))
        if not ((name is not None and port in self.grants.name_ports(name)) or port in self.grants.address_ports(address)):
            return f"{self.grants.target(address)} port {port} is not granted"
        return self.grants.refused(address)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._links.add(task)
        try:
            host, port = writer.get_extra_info("sockname")[:2]
            address = ipaddress.ip_address(host.split("%")[0])
            if (why := self.allowed(address, port)) is not None:
                self._count_refused(why)
                _reset(writer)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(str(self.grants.target(address)), port), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:
                self._count_refused(f"{address} port {port}: {e}")
                _reset(writer)
                return
            self.counts.connections += 1
            _nodelay(writer)
            _nodelay(up_writer)
            try:
                await asyncio.gather(self._pipe(reader, up_writer, "bytes_out"), self._pipe(up_reader, writer, "bytes_in"))
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._links.discard(task)

    def _count_refused(self, why: str) -> None:
        self.counts.refused += 1
        log.info("egress refused", why=why)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, field: str) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                setattr(self.counts, field, getattr(self.counts, field) + len(data))
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Refuse with a reset, as a closed port would, rather than a connection that ends at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
