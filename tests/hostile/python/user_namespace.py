"""Create a user namespace: inside it the bundle is root with every capability, a first step of
many kernel escapes. seccomp denies CLONE_NEWUSER."""
import ctypes

CLONE_NEWUSER = 0x10000000


def main(args):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) == 0:
        return {"unshared": True}
    return {"unshared": False, "errno": ctypes.get_errno()}
