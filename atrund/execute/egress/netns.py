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
lives while the worker or the runner's descriptors hold it. What the namespace holds is built by
anyip.py; an unprivileged runner (``[runner] user``) cannot make a namespace, so its privileged
helper builds it and hands the descriptors back (process/forked.py ``ForkServer.netns``).
"""

from __future__ import annotations

import threading

from atrund.execute.base import ExecutorError
from atrund.execute.egress.anyip import Namespace, NamespaceError, build, nameservers

__all__ = ["Namespace", "check", "create", "nameservers"]


def create(ports: list[int], servers: list[str], existing: int | None = None) -> Namespace:
    """A new namespace (or ``existing``, a descriptor of one with nothing in it but loopback,
    e.g. a container's under ``--network none``) with listeners on ``ports`` and DNS sockets on
    ``servers``:53. Runs in a thread made for it (a thread in another namespace must never
    serve anything else)."""
    out: list = []

    def run() -> None:
        try:
            out.append(build(ports, servers, existing))
        except NamespaceError as e:
            out.append(ExecutorError(str(e)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append(e)

    thread = threading.Thread(target=run, name="atrund-netns")
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def check() -> str | None:
    """Why a worker's egress namespace cannot be made on this host, or None (for doctor)."""
    try:
        create([], []).close()
    except (OSError, ExecutorError) as e:
        return str(e)
    return None
