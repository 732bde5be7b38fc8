"""stat() and readlink() are outside Landlock: a bundle that cannot read a directory can still
learn what is in it by name, and when it changed. The runner keeps its state directory 0700 and
its bundle cache 0400, so a worker's uid cannot even stat what is in there."""
import os


def main(args):
    out = {}
    for path in args["paths"]:
        try:
            os.stat(path)
            out[path] = "seen"
        except OSError as e:
            out[path] = type(e).__name__
    return out
