"""Fork bomb: every process forks for ever. Contained when the run ends at the deadline and
nothing of it is left: the process backend bounds it with RLIMIT_NPROC on the worker's own
uid and tears it down with the PID namespace. (none cannot: RLIMIT_NPROC is ignored for root.)"""
import os


def main(args):
    while True:
        try:
            os.fork()
        except OSError:
            pass
