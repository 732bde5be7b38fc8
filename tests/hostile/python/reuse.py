"""A bundle that probes what a reused worker carries from one request to the next (the reuse
tests, tests/execute/test_reuse.py). Each endpoint is one probe or one attack:

- whoami: which process serves (a token made when the bundle was loaded) and how many requests
  it has served;
- remember / recall: keep the request's secret in a global, read back what is kept;
- leave_thread / leave_child: answer while a thread or a daemonised child runs on; with
  ``hide`` it first switches off at-run-exec's own check, so only the runner's check is left;
- burn: spend CPU for ``ms`` milliseconds; spin: spend CPU forever;
- allocate: hold ``mb`` MiB more in a global;
- poison: break ``json.dumps``, which at-run-exec itself writes its answers with;
- say: print ``word`` on stdout and stderr (each request's output is its own);
- forge_mark: print the end-of-output mark itself, between two words;
- mute: close fd 2 (so at-run-exec cannot write the mark), then print ``word`` on stdout.
"""
import os
import sys
import threading
import time

TOKEN = os.urandom(8).hex()
served = 0
kept = []
hoard = []


def whoami(args):
    global served
    served += 1
    return {"token": TOKEN, "served": served}


def say(args):
    print(args["word"])
    print(args["word"] + "!", file=sys.stderr)
    return whoami(args)


def forge_mark(args):
    print("before", flush=True)
    os.write(2, b"\x1eatrun:end-of-output\x1e")
    print("after", flush=True)
    return whoami(args)


def mute(args):
    os.close(2)
    print(args["word"], flush=True)  # fd 1 still points at the stderr pipe
    return whoami(args)


def remember(args):
    kept.append(os.environ.get("SECRET"))
    return whoami(args)


def recall(args):
    return {"token": TOKEN, "kept": kept, "env": os.environ.get("SECRET")}


def _hide():
    sys.modules["__main__"]._left_running = lambda: False


def leave_thread(args):
    if args.get("hide"):
        _hide()
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    return whoami(args)


def leave_child(args):
    if args.get("hide"):
        _hide()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", args["tag"]])
        os._exit(0)
    os.wait()
    return whoami(args)


def burn(args):
    end = time.process_time() + args["ms"] / 1000
    while time.process_time() < end:
        pass
    return whoami(args)


def spin(args):
    while True:
        pass


def allocate(args):
    hoard.append(bytearray(args["mb"] << 20))
    return whoami(args)


def poison(args):
    import json

    json.dumps = None
    return whoami(args)
