"""Leave a child running after the answer: double fork and setsid, so it leaves the worker's
process group, then answer at once. Contained when the child is gone after the run."""
import os


def main(args):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", args["tag"]])
        os._exit(0)
    os.wait()
    return {"left": args["tag"]}
