"""Memory bomb: allocate (and touch) 64 MiB at a time until something says no. Contained when
the allocation fails inside the bundle's own limit (RLIMIT_DATA), not on the host."""


def main(args):
    hoard = []
    while True:
        hoard.append(bytearray(64 * 1024 * 1024))
        if len(hoard) * 64 > args.get("stop_mb", 1 << 20):
            return {"allocated_mb": len(hoard) * 64}
