"""Create, bind and listen on an AF_VSOCK socket: a channel to the hypervisor or to other guests
that no Landlock rule covers (Landlock's network rules are TCP only). Refused by the process
backend's filter, which lets socket() make only IPv4, IPv6 and netlink sockets."""
import socket


def main(args):
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as e:
        return {"created": False, "why": type(e).__name__, "errno": e.errno}
    try:
        s.bind((socket.VMADDR_CID_ANY, 5005))
        s.listen(1)
        return {"created": True, "listening": True}
    except OSError as e:
        return {"created": True, "listening": False, "why": type(e).__name__}
    finally:
        s.close()
