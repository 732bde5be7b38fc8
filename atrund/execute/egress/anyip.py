"""What a worker's egress namespace holds, built: loopback up, "AnyIP" routes, a listener per
granted TCP port and a DNS socket per nameserver address (netns.py says why and how it is used).

Standalone on purpose (stdlib only, no annotations it would have to evaluate): the runner imports
it, and the privileged helper (process/forkserver.py) loads it by path to build a namespace for an
unprivileged runner (``[runner] user``), which cannot make one itself.
"""

import ctypes
import os
import socket
import struct

CLONE_NEWNET = 0x40000000
# rtnetlink, for what `ip link set lo up` and `ip route add local 0.0.0.0/0 dev lo` (and ::/0) do,
# without starting a program per worker.
RTM_NEWLINK, RTM_NEWROUTE, NLMSG_ERROR = 16, 24, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 1, 4, 0x200, 0x400
IFF_UP, RTA_OIF = 1, 4
RT_TABLE_LOCAL, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL = 255, 3, 254, 2
_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(Exception):
    """The namespace could not be made or set up; the message says which step."""


class Namespace:
    """A worker's namespace: its descriptor (for the worker's setns), a TCP listener per granted
    port and a UDP socket per nameserver address, all made inside it."""

    def __init__(self, fd, listeners=(), dns=()):
        self.fd = fd
        self.listeners = list(listeners)
        self.dns = list(dns)

    def close(self) -> None:
        for s in self.listeners + self.dns:
            s.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def nameservers(resolv_conf="/etc/resolv.conf"):
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


def build(ports, servers, existing=None):
    """A new namespace (or ``existing``, a descriptor of one with nothing in it but loopback),
    set up by the calling thread, which joins it and comes back: it must be a thread that serves
    nothing else (the runner's thread made for it, or the single-threaded helper)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    ns = Namespace(-1)
    try:
        made = _libc.unshare(CLONE_NEWNET) if existing is None else _libc.setns(existing, CLONE_NEWNET)
        if made != 0:
            raise NamespaceError(f"cannot make a network namespace for a worker: {os.strerror(ctypes.get_errno())}")
        try:
            if existing is not None and [name for _, name in socket.if_nameindex()] != ["lo"]:
                raise NamespaceError("the worker's network namespace has a device besides loopback (not --network none)")
            ns.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            ns.listeners, ns.dns = serve_here(ports, servers)
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # never: this thread ends here anyway
                os._exit(70)
    except BaseException:
        ns.close()
        raise
    finally:
        os.close(own)
    return ns


def serve_here(ports, servers):
    """Set up the calling thread's namespace (AnyIP routes, loopback up) and make in it a
    listener per port and a DNS socket per server: (listeners, dns sockets). Also what a
    microVM's atrun-init does to the guest's only namespace (it loads this file by path)."""
    try:
        _route_everything_here(socket.AF_INET6 if _ipv6() else None)
    except OSError as e:
        raise NamespaceError(f"cannot set up a worker's network namespace: {e.strerror}") from e
    listeners, dns = [], []
    try:
        listeners += [_listener(port) for port in ports]
        dns += [_datagram(address) for address in servers]
    except BaseException:
        for s in listeners + dns:
            s.close()
        raise
    return listeners, dns


def _route_everything_here(ipv6):
    """Loopback up, and every IPv4 (and, if on, IPv6) address a local one ("AnyIP")."""
    lo = socket.if_nametoindex("lo")
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as nl:
        _ask(nl, RTM_NEWLINK, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, lo, IFF_UP, IFF_UP))
        for family in (socket.AF_INET, *([ipv6] if ipv6 else [])):
            route = struct.pack("=BBBBBBBBI", family, 0, 0, 0, RT_TABLE_LOCAL, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, 0)
            _ask(nl, RTM_NEWROUTE, route + struct.pack("=HHI", 8, RTA_OIF, lo), NLM_F_CREATE | NLM_F_EXCL)


def _ask(nl, kind, body, flags=0):
    nl.send(struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, 0, 0) + body)
    reply = nl.recv(65536)
    if struct.unpack_from("=H", reply, 4)[0] != NLMSG_ERROR:
        raise OSError(0, "rtnetlink answered something other than an acknowledgement")
    if (error := struct.unpack_from("=i", reply, 16)[0]) != 0:
        raise OSError(-error, os.strerror(-error))


def _ipv6():
    """IPv6 on in this thread's namespace (a container engine turns it off in its own): a
    namespace without it simply has no IPv6 way out."""
    for conf in ("all", "lo"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:  # the namespace of this thread
                f.write("0")
        except OSError:
            return False
    return True


def _listener(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as mapped addresses
    s.bind(("::", port))
    s.listen(128)
    s.setblocking(False)
    return s


def _datagram(address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((address, 53))
    s.setblocking(False)
    return s
