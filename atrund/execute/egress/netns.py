"""A worker's network namespace whose only way out is the runner's proxy.

The runner makes it (in a thread of its own, which joins the new namespace and comes back),
with nothing in it but the loopback device, and "AnyIP" routes: every IPv4 and IPv6 address is
local to the namespace (``local 0.0.0.0/0 dev lo``). So a connection to any address ends inside
the namespace, on a listening socket the runner made there before the worker joins: one per
granted TCP port, bound to the wildcard address, whose accepted connections tell the proxy the
address the worker asked for (``getsockname``). A port no grant opens has no listener (refused),
UDP has one socket only, the DNS responder on the nameserver addresses the worker's
/etc/resolv.conf names; every other datagram goes nowhere. Nothing outside can connect in: the
namespace has no device but loopback. The sockets belong to the namespace they were made in,
so the runner serves them from its own.

The worker joins the namespace by its descriptor (fence.py's join_network); the namespace
lives while the worker or the runner's descriptors hold it.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from dataclasses import dataclass, field

from atrund.execute.base import ExecutorError

CLONE_NEWNET = 0x40000000
# rtnetlink, for what `ip link set lo up` and `ip route add local 0.0.0.0/0 dev lo` (and ::/0) do,
# without starting a program per worker.
RTM_NEWLINK, RTM_NEWROUTE, NLMSG_ERROR = 16, 24, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 1, 4, 0x200, 0x400
IFF_UP, RTA_OIF = 1, 4
RT_TABLE_LOCAL, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL = 255, 3, 254, 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Namespace:
    fd: int  # /proc/thread-self/ns/net of the namespace, for the worker's setns
    listeners: list[socket.socket] = field(default_factory=list)  # TCP, one per granted port
    dns: list[socket.socket] = field(default_factory=list)  # UDP, one per nameserver address

    def close(self) -> None:
        for s in self.listeners + self.dns:
            s.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The addresses the worker's resolver will ask (glibc's default, 127.0.0.1, if none)."""
    found = []
    try:
        with open(resolv_conf) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    found.append(words[1].split("%")[0])
    except OSError:
        pass
    return found or ["127.0.0.1"]


def create(ports: list[int], servers: list[str], existing: int | None = None) -> Namespace:
    """A new namespace (or ``existing``, a descriptor of one with nothing in it but loopback,
    e.g. a container's under ``--network none``) with listeners on ``ports`` and DNS sockets on
    ``servers``:53. Runs in a thread made for it (a thread in another namespace must never
    serve anything else)."""
    out: list = []

    def build() -> None:
        try:
            out.append(_build(ports, servers, existing))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append(e)

    thread = threading.Thread(target=build, name="atrund-netns")
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _build(ports: list[int], servers: list[str], existing: int | None) -> Namespace:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    ns = Namespace(-1)
    try:
        made = _libc.unshare(CLONE_NEWNET) if existing is None else _libc.setns(existing, CLONE_NEWNET)
        if made != 0:
            raise ExecutorError(f"cannot make a network namespace for a worker: {os.strerror(ctypes.get_errno())}")
        try:
            ns.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _route_everything_here(socket.AF_INET6 if _ipv6() else None)
            except OSError as e:
                raise ExecutorError(f"cannot set up a worker's network namespace: {e.strerror}") from e
            ns.listeners = [_listener(port) for port in ports]
            ns.dns = [_datagram(address) for address in servers]
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # never: this thread ends here anyway
                os._exit(70)
    except BaseException:
        ns.close()
        raise
    finally:
        os.close(own)
    return ns


def _route_everything_here(ipv6: int | None) -> None:
    """Loopback up, and every IPv4 (and, if on, IPv6) address a local one ("AnyIP")."""
    lo = socket.if_nametoindex("lo")
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as nl:
        _ask(nl, RTM_NEWLINK, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, lo, IFF_UP, IFF_UP))
        for family in (socket.AF_INET, *([ipv6] if ipv6 else [])):
            route = struct.pack("=BBBBBBBBI", family, 0, 0, 0, RT_TABLE_LOCAL, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, 0)
            _ask(nl, RTM_NEWROUTE, route + struct.pack("=HHI", 8, RTA_OIF, lo), NLM_F_CREATE | NLM_F_EXCL)


def _ask(nl: socket.socket, kind: int, body: bytes, flags: int = 0) -> None:
    nl.send(struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, 0, 0) + body)
    reply = nl.recv(65536)
    if struct.unpack_from("=H", reply, 4)[0] != NLMSG_ERROR:
        raise OSError(0, "rtnetlink answered something other than an acknowledgement")
    if (error := struct.unpack_from("=i", reply, 16)[0]) != 0:
        raise OSError(-error, os.strerror(-error))


def _ipv6() -> bool:
    """IPv6 on in this thread's namespace (a container engine turns it off in its own): a
    namespace without it simply has no IPv6 way out."""
    for conf in ("all", "lo"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:  # the namespace of this thread
                f.write("0")
        except OSError:
            return False
    return True


def check() -> str | None:
    """Why a worker's egress namespace cannot be made on this host, or None (for doctor)."""
    try:
        create([], []).close()
    except (OSError, ExecutorError) as e:
        return str(e)
    return None


def _listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as mapped addresses
    s.bind(("::", port))
    s.listen(128)
    s.setblocking(False)
    return s


def _datagram(address: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((address, 53))
    s.setblocking(False)
    return s
