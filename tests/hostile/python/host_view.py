"""Look at the host from inside: its hostname, its boot id (one per machine and boot: a tracking
id), the kernel's command line, the load of the whole machine, PID 1's command line (on the exec
path, the fence's spec), and the mount table, where every other worker's directory (this
runner's and other runners') shows as a tmpfs. The process backend gives the worker a hostname of
its own, shows those files empty, hides every process but the worker's own, and leaves no other
worker's directory in its mount table. Also asks for inotify, which would report events in host
directories the bundle cannot list: on no runtime's seccomp allowlist."""
import ctypes
import os
import socket


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return type(e).__name__


def main(args):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    return {
        "hostname": socket.gethostname(),
        "boot_id": read("/proc/sys/kernel/random/boot_id"),
        "cmdline": read("/proc/cmdline"),
        "loadavg": read("/proc/loadavg"),
        "init_cmdline": read("/proc/1/cmdline"),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "worker_mounts": [m for m in mounts if m.startswith(args["root"].rstrip("/") + "/")],
        "inotify": "EPERM" if fd == -1 and ctypes.get_errno() == 1 else ("ok" if fd >= 0 else ctypes.get_errno()),
    }
