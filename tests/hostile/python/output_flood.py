"""Output flood: hundreds of megabytes on stdout and stderr, then a normal answer. Contained when
the answer still arrives intact and the runner kept only a bounded tail of the noise."""
import sys


def main(args):
    chunk = "A" * 65536 + "\n"
    for _ in range(args.get("chunks", 2000)):
        sys.stdout.write(chunk)
        sys.stderr.write(chunk)
    return {"answer": "intact"}
