"""Connect to a pathname UNIX socket the host left world-writable (a database, a container
engine). Landlock does not judge sockets outside the granted paths: seccomp denies AF_UNIX."""
import socket


def main(args):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(args["path"])
        return {"connected": True}
    except OSError as e:
        return {"connected": False, "why": type(e).__name__}
    finally:
        s.close()
