"""Reach a host pathname UNIX socket without socket(AF_UNIX): socketpair(AF_UNIX, SOCK_DGRAM)
makes an unbound datagram socket, and sendto() may name any datagram socket on the host whose
file it can write (Landlock does not govern UNIX sockets; the filter used to refuse only
socket(AF_UNIX)). The process backend's filter now makes only stream pairs, which cannot send
to another address."""
import socket


def main(args):
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    except OSError as e:
        return {"paired": False, "why": type(e).__name__, "errno": e.errno}
    try:
        a.sendto(b"hello from the bundle", args["path"])
        return {"paired": True, "sent": True}
    except OSError as e:
        return {"paired": True, "sent": False, "why": type(e).__name__}
    finally:
        a.close()
        b.close()
