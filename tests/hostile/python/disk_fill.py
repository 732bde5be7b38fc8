"""Fill the disk: write 1 MiB files into /tmp until something says no. Contained when the
bundle's own /tmp quota (a size-limited tmpfs) runs out, not the host's disk. RLIMIT_FSIZE
alone would not do: it limits each file, not how many."""


def main(args):
    written = 0
    block = b"x" * (1 << 20)
    while written < args.get("stop_mb", 100_000):
        try:
            with open(f"/tmp/fill-{written}", "wb") as f:
                f.write(block)
        except OSError as e:
            return {"written_mb": written, "stopped_by": e.strerror}
        written += 1
    return {"written_mb": written}
