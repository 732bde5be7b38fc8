"""Write outside the granted paths (the bundle's private /tmp is all it gets by default)."""


def main(args):
    try:
        with open(args["path"], "w") as f:
            f.write("pwned")
        return {"wrote": args["path"]}
    except OSError as e:
        return {"denied": type(e).__name__}
