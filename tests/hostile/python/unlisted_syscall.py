"""Make a system call no runtime needs: personality(0xffffffff), which only asks for the
process's execution domain and succeeds everywhere unfiltered. Under an allowlist filter every
call outside the runtime's list answers EPERM, however harmless it looks: the kernel surface a
bundle can reach is what the runtime was seen to use, not everything but a denylist."""
import ctypes

SYS_personality = 135  # x86_64
QUERY = 0xFFFFFFFF


def main(args):
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(SYS_personality, QUERY)
    return {"result": result, "errno": ctypes.get_errno() if result == -1 else 0}
