"""Write an answer line of its own on the protocol channel and end the process before the
runtime answers: any line at all (metrics of 10**30, NaN, "yes" for true, status 101, ...), so
the runner takes it for the runtime's answer. The Python runtime cannot prevent this (the bundle
shares its interpreter; the protocol stream is the global ``_protocol`` of ``__main__``). What
must hold is the runner: it checks every answer as untrusted data, and one that breaks the
schema becomes a ProtocolError naming the field and the rule.

args: {"line": the raw answer line to write}, or {"honest": true} for a normal return.
"""
import os
import sys


def main(args):
    if args.get("honest"):
        return {"honest": True}
    protocol = sys.modules["__main__"]._protocol
    protocol.write(args["line"] + "\n")
    protocol.flush()
    os._exit(0)
