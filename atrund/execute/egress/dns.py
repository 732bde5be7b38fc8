"""Name resolution for a worker granted network: the runner resolves, the worker only asks.

``Resolver`` is the runner's side: the system resolver, or the DNS server
``executor.egress_nameserver`` names. ``Responder`` answers the worker's queries on its
namespace's DNS sockets: A and AAAA for granted names only, with only the addresses the proxy
would connect to (``Grants.refused``), and remembers each address it handed out and for which
name, because that is what the proxy lets the worker connect to. Nothing is forwarded: a query
for any other name, to any other server, leaves no trace outside the namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog

from atrund.execute.egress.policy import Grants, IPAddress, normal_name

log = structlog.get_logger("atrund.egress")
TTL = 30  # seconds a worker may cache an answer; the proxy remembers the address for the worker's life
MAX_REMEMBERED = 4096
MAX_PENDING = 32


class Resolver:
    """Addresses of a name, as the runner (not the worker) resolves them."""

    def __init__(self, nameserver: str | None = None, timeout: float = 5.0) -> None:
        self.nameserver = nameserver
        self.timeout = timeout

    async def resolve(self, name: str) -> list[IPAddress]:
        try:
            if self.nameserver is None:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM), self.timeout)
                found = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
            else:
                found = [a for rdtype in ("A", "AAAA") for a in await self._ask(name, rdtype)]
        except (OSError, asyncio.TimeoutError, dns.exception.DNSException, ValueError):
            return []
        return list(dict.fromkeys(found))

    async def _ask(self, name: str, rdtype: str) -> list[IPAddress]:
        host, _, port = self.nameserver.rpartition(":")
        query = dns.message.make_query(name, rdtype)
        answer = await dns.asyncquery.udp(query, host.strip("[]"), timeout=self.timeout, port=int(port))
        return [ipaddress.ip_address(r.address) for rrset in answer.answer
                if rrset.rdtype == dns.rdatatype.from_text(rdtype) for r in rrset]


class Responder(asyncio.DatagramProtocol):
    """The DNS server a worker's namespace has: answers granted names from the runner's resolver."""

    def __init__(self, grants: Grants, resolver: Resolver, handed: dict[IPAddress, str]) -> None:
        self.grants = grants
        self.resolver = resolver
        self.handed = handed  # address -> the granted name it was handed out for
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(self.pending) >= MAX_PENDING:
            return  # a flood of queries is dropped, as a busy server would
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, data: bytes, addr) -> None:
        reply = await self.reply(data)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    async def reply(self, data: bytes) -> bytes | None:
        """The answer to one query (None: not DNS, no answer). Also what a microVM's relay asks
        for a query its guest's resolver sent (no datagram socket on the runner's side there)."""
        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - not DNS: no answer
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        if len(query.question) != 1:
            reply.set_rcode(dns.rcode.FORMERR)
        else:
            question = query.question[0]
            name = normal_name(question.name.to_text())
            if not self.grants.name_granted(name):
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                version = 4 if question.rdtype == dns.rdatatype.A else 6
                addresses = [a for a in await self.resolver.resolve(name)
                             if a.version == version and self.grants.refused(a) is None]
                for a in addresses:
                    if len(self.handed) < MAX_REMEMBERED or a in self.handed:
                        self.handed[a] = name
                if addresses:  # else no data: the name has no address the proxy would connect to
                    reply.answer.append(dns.rrset.from_text_list(question.name, TTL, dns.rdataclass.IN,
                                                                 question.rdtype, [str(a) for a in addresses]))
        return reply.to_wire()
