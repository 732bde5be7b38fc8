"""Dump the environment looking for runner secrets: its own, and every /proc/*/environ it can
open (the runner's own process included, if it is visible)."""
import os


def main(args):
    found = {"own": dict(os.environ), "others": []}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if args["canary"].encode() in f.read():
                        found["others"].append(int(pid))
            except OSError:
                pass
    return found
