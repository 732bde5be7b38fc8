"""What a network grant allows, as the lexicon documents it (``dev.atrun.defs#permissions``):

- ``host`` allows that name on ports 80 and 443; ``host:port`` that name on that port only;
- ``*.example.com`` allows example.com and every name below it (80 and 443, or the port given);
- ``*`` allows any name (80 and 443);
- an IP address (``[v6]:port`` with a port), a CIDR range or ``localhost`` allows those addresses.

Whatever a name resolves to, and whatever address a grant names, the proxy refuses what the
runner's own fetches refuse (atrund/atproto/addresses.py: loopback, private, link-local, CGNAT,
multicast, unique-local, reserved, documentation and unspecified addresses, in every form:
IPv4-mapped, NAT64, 6to4), unless the operator grants a range that holds them in
``[permissions] net_private``. Pure functions: no sockets here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from atrund.atproto.addresses import refusal

DEFAULT_PORTS = frozenset({80, 443})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
LOCALHOST = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class Rule:
    """One grant: a name pattern (``*`` any, ``*.x`` x and below, else exact) or address ranges,
    and the ports it opens."""

    name: str | None
    networks: tuple[IPNetwork, ...]
    ports: frozenset[int]

    def matches_name(self, name: str) -> bool:
        if self.name is None:
            return False
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            return name == self.name[2:] or name.endswith(self.name[1:])
        return name == self.name

    def matches_address(self, address: IPAddress) -> bool:
        return any(address in n for n in self.networks) or self.name == "*"


def normal_name(name: str) -> str:
    return name.strip().lower().rstrip(".")


def split_port(entry: str) -> tuple[str, frozenset[int]]:
    """``host:port`` or ``[v6]:port`` names a port; a bare IPv6 address (several colons) does not."""
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and (host.count(":") == 0 or host.endswith("]")) and 0 < int(port) < 65536:
        return host.strip("[]"), frozenset({int(port)})
    return entry.strip("[]"), DEFAULT_PORTS


def parse(entry: str) -> Rule:
    host, ports = split_port(entry.strip())
    host = normal_name(host)
    if host == "localhost":
        return Rule(None, LOCALHOST, ports)
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        return Rule(host, (), ports)
    return Rule(None, (network, *(n for n in [embedded_network(network)] if n is not None)), ports)


def embedded_network(network: IPNetwork) -> IPNetwork | None:
    """An IPv4-mapped single address granted as IPv6 also names its IPv4 form (and back)."""
    if network.version == 6 and network.prefixlen == 128 and network.network_address.ipv4_mapped:
        return ipaddress.ip_network(network.network_address.ipv4_mapped)
    return None


def embedded(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, NAT64, 6to4), if it carries one."""
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in n for n in NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in SIX_TO_FOUR:
        return address.sixtofour
    return None


def parse_private(cidrs) -> tuple[IPNetwork, ...]:
    """The operator's ``net_private`` ranges (validated by the configuration already)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


class Grants:
    """A worker's network grant and the operator's private ranges: what its proxy allows."""

    def __init__(self, net, net_private=()) -> None:
        self.rules = tuple(parse(e) for e in net)
        self.private = parse_private(net_private)

    @property
    def ports(self) -> list[int]:
        """Every TCP port some grant opens: the proxy listens on these only."""
        return sorted({p for r in self.rules for p in r.ports})

    def name_granted(self, name: str) -> bool:
        name = normal_name(name)
        return any(r.matches_name(name) for r in self.rules)

    def name_ports(self, name: str) -> frozenset[int]:
        name = normal_name(name)
        return frozenset(p for r in self.rules if r.matches_name(name) for p in r.ports)

    def address_ports(self, address: IPAddress) -> frozenset[int]:
        """Ports a grant opens to this address literally (an IP, a range, localhost, or ``*``)."""
        forms = [address, *(a for a in [embedded(address)] if a is not None)]
        return frozenset(p for r in self.rules if any(r.matches_address(a) for a in forms) for p in r.ports)

    def refused(self, address: IPAddress) -> str | None:
        """Why the proxy will not connect to ``address``, or None: not public in some form it
        takes, and not within an operator's ``net_private`` range. An IPv4-mapped address is its
        IPv4 address (the proxy connects to that); NAT64 and 6to4 addresses are judged both ways."""
        target = self.target(address)
        forms = [target, *(a for a in [embedded(target)] if a is not None)]
        if any(a in n for a in forms for n in self.private):
            return None
        return refusal(str(target))  # the runner's own rule for its fetches: one list of what is not public

    def target(self, address: IPAddress) -> IPAddress:
        """Where the proxy connects for ``address``: an IPv4-mapped address is IPv4."""
        return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address
