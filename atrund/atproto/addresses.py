"""Which addresses the runner's own requests may reach: no SSRF through a DID document.

Whoever controls a DID document chooses the PDS URL the runner fetches bundles and records
from, and a did:web names its own host; a gateway caller can name such DIDs. Without a guard
that is a request, made by the runner, to the operator's loopback services, the LAN or a cloud
metadata service (169.254.169.254). So every connection of the runner's readers (PLC, DID
documents, PDSes, blobs, handle resolution, the firehose's relay) is checked here, on the
address actually connected to:

- a name is resolved once, by :class:`GuardedResolver`; an answer with any refused address is
  refused as a whole, and the connection is made only to the addresses checked (no second
  lookup, so no DNS rebinding between the check and the connect);
- :func:`guarded_socket` checks the address of every socket before it connects: an IP literal
  in a URL, which aiohttp never passes to a resolver, and every redirect, which is a new
  connection, are checked the same way.

Refused (``refusal``): loopback, "this network", RFC 1918 private, CGNAT (100.64/10), link-local,
multicast, reserved and documentation ranges, IPv6 unique-local, local-use NAT64
(64:ff9b:1::/48) and Teredo, and the IPv4-mapped, IPv4-compatible, NAT64 (64:ff9b::/96) and
6to4 forms of any refused IPv4 address. ``[identity] allow_private_addresses = true`` turns the guard off: the local dev
stack runs its PDS and PLC on loopback and sets it.

The runner account's own PDS (``runner.pds``, where it logs in and writes results) is the
operator's own, named in the configuration, and is not checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import aiohappyeyeballs
import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from atrund.errors import PrivateAddress

# (network, what it is), IPv4: every range that is not a public unicast address.
_V4 = [(ipaddress.ip_network(net), what) for net, what in (
    ("0.0.0.0/8", "a 'this network' address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a carrier-grade NAT address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
)]
_V6 = [(ipaddress.ip_network(net), what) for net, what in (
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("100::/64", "a discard-only address"),
    ("2001:db8::/32", "a documentation address"),
    ("fc00::/7", "a unique-local address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("2001::/32", "a Teredo address"),
)]
# IPv6 forms that carry an IPv4 address, and where it sits: a refused IPv4 address must not
# come back in through one of them (a NAT64 gateway or a dual-stack socket would reach it).
_EMBEDDING = [(ipaddress.ip_network(net), shift, what) for net, shift, what in (
    ("::ffff:0:0/96", 0, "IPv4-mapped"),
    ("::/96", 0, "IPv4-compatible"),
    ("64:ff9b::/96", 0, "NAT64"),
    ("2002::/16", 80, "6to4"),
)]


def refusal(address: str) -> str | None:
    """Why the runner must not connect to ``address`` (an IP address as text), or None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is no part of the address
    except ValueError:
        return f"{address!r} is not an IP address"
    if ip.version == 4:
        return next((f"{address} is {what}" for net, what in _V4 if ip in net), None)
    if why := next((f"{address} is {what}" for net, what in _V6 if ip in net), None):
        return why
    for net, shift, form in _EMBEDDING:
        if ip in net:
            inner = ipaddress.IPv4Address((int(ip) >> shift) & 0xFFFFFFFF)
            why = refusal(str(inner))
            return f"{address} is the {form} form of {why.replace(' is ', ', ', 1)}" if why else None
    return None


class RefusedAddress(OSError):
    """Raised inside aiohttp's connector (which passes an OSError through as the cause of its
    ClientConnectorError); :func:`translate` turns it into a PrivateAddress."""


def _refuse(host: str, address: str, why: str) -> RefusedAddress:
    named = f"{host} resolves to {why.replace(' is ', ', ', 1)}" if host != address else why
    return RefusedAddress(f"{named}: the runner does not connect to private, loopback or link-local addresses")


def guarded_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """The socket factory of the guarded connector: every connection, to a resolved name, an IP
    literal or a redirect's target, passes here with the exact address it is about to connect to."""
    family, type_, proto, _, sockaddr = addr_info
    if why := refusal(sockaddr[0]):
        raise _refuse(sockaddr[0], sockaddr[0], why)
    return socket.socket(family=family, type=type_, proto=proto)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name when any address it resolves to is refused: a name
    that resolves to a public and a private address is not a PDS, it is a probe."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            if why := refusal(answer["host"]):
                raise _refuse(host, answer["host"], why)
        return answers

    async def close(self) -> None:
        await self._inner.close()


def http_session(allow_private: bool, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """An aiohttp session for the runner's reads: guarded unless ``allow_private``."""
    if allow_private:
        return aiohttp.ClientSession(timeout=timeout)
    # The connector keeps its DNS cache: what it caches is what the resolver checked.
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(), socket_factory=guarded_socket)
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


def translate(e: BaseException, what: str) -> PrivateAddress | None:
    """The PrivateAddress that ``e`` (an aiohttp error) is, its message led by ``what`` (the
    request), or None if ``e`` is some other failure."""
    cause = e.os_error if isinstance(e, aiohttp.ClientConnectorError) else e
    return PrivateAddress(f"{what}: {cause}") if isinstance(cause, RefusedAddress) else None


async def open_stream_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP socket connected to ``host``:``port``, for a client that takes a connected socket
    (the firehose's websocket): resolved once, every address checked, then connected only to
    those addresses. PrivateAddress if any is refused; OSError if none answers."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        if why := refusal(info[4][0]):
            raise PrivateAddress(str(_refuse(host, info[4][0], why)))
    async with asyncio.timeout(timeout):
        return await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=0.25)
