"""Symlink escape: inside a directory it was granted, the bundle plants a symlink to a file
outside the grant and reads through it. Landlock judges the file reached, not the path used."""
import os


def main(args):
    link = os.path.join(args["granted"], "escape")
    try:
        os.symlink(args["target"], link)
    except FileExistsError:
        pass
    try:
        with open(link) as f:
            return {"read": f.read()}
    except OSError as e:
        return {"denied": type(e).__name__}
