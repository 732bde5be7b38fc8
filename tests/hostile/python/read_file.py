"""Read a file the bundle was not granted: the runner's config or app password, /etc/shadow.
Evidence of success is the file's content in the answer."""


def main(args):
    try:
        with open(args["path"]) as f:
            return {"read": f.read()}
    except OSError as e:
        return {"denied": type(e).__name__}
