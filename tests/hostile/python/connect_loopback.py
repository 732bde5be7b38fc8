"""Connect to a loopback TCP port that was not granted (a database, the runner's own PDS...)."""
import socket


def main(args):
    try:
        socket.create_connection(("127.0.0.1", args["port"]), timeout=2).close()
        return {"connected": True}
    except OSError as e:
        return {"connected": False, "why": type(e).__name__}
