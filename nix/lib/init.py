"""PID 1 of an atrun runtime microVM (rootfs.ext4, built by nix/lib/runtime.nix).

One VM runs one worker: this program mounts what at-run-exec needs, connects the protocol
channel, starts /bin/at-run-exec as the unprivileged `atrun` user (uid 1000) with stdin and
stdout on that channel and stderr on the console, reaps every process until at-run-exec has
ended, and powers the VM off (Firecracker exits when the guest reboots).

Kernel command line (all optional):
  atrun.vsock=PORT    connect the protocol channel to the host over vsock (CID 2, PORT);
                      Firecracker forwards it to the Unix socket <uds_path>_PORT on the host.
                      Without it the channel is the serial console /dev/ttyS0 in raw mode
                      (pass `quiet` then, so kernel messages stay off the channel).
  atrun.bundle=DEV    a block device (default /dev/vdb, if present) mounted read-only at
                      /bundle; requests name their codePath under /bundle.
  atrun.uid=N         the uid/gid at-run-exec runs as (default 1000).

Stdlib only, run as `python3 -I -S`: nothing here may depend on site-packages.
"""

import ctypes
import os
import socket
import sys
import termios
import tty

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
LINUX_REBOOT_CMD_RESTART = 0x01234567


def log(msg):
    os.write(2, f"atrun-init: {msg}\n".encode())


def mount(source, target, fstype, flags=0, data=""):
    os.makedirs(target, exist_ok=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def cmdline():
    try:
        words = open("/proc/cmdline").read().split()
    except OSError:
        return {}
    return dict(w.split("=", 1) for w in words if w.startswith("atrun.") and "=" in w)


def channel(opts):
    """The descriptor at-run-exec speaks the protocol on."""
    if "atrun.vsock" in opts:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.connect((socket.VMADDR_CID_HOST, int(opts["atrun.vsock"])))
        return os.dup(s.detach())
    fd = os.open("/dev/ttyS0", os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd, termios.TCSANOW)  # no echo, no newline translation: bytes as sent
    return fd


def power_off():
    os.sync()
    libc.reboot(LINUX_REBOOT_CMD_RESTART)
    os._exit(0)


def main():
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m")
    opts = cmdline()
    bundle = opts.get("atrun.bundle", "/dev/vdb")
    if os.path.exists(bundle):
        mount(bundle, "/bundle", "ext4", MS_RDONLY | MS_NOSUID | MS_NODEV)
    uid = int(opts.get("atrun.uid", "1000"))
    fd = channel(opts)
    workdir = "/tmp/worker"
    os.mkdir(workdir, 0o700)
    os.chown(workdir, uid, uid)

    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(fd, 0)
            os.dup2(fd, 1)
            os.setsid()
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.chdir(workdir)
            env = {"PATH": "/bin", "TMPDIR": workdir, "HOME": workdir, "LANG": "C.UTF-8"}
            os.execve("/bin/at-run-exec", ["/bin/at-run-exec"], env)
        except BaseException as e:  # noqa: BLE001 - the child must never return into PID 1's code
            log(f"cannot start /bin/at-run-exec: {e}")
            os._exit(127)
    os.close(fd)
    while True:  # PID 1 reaps orphans too; stop when at-run-exec itself has ended
        try:
            done, status = os.wait()
        except ChildProcessError:
            break
        if done == pid:
            log(f"at-run-exec ended ({os.waitstatus_to_exitcode(status)})")
            break


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # noqa: BLE001 - PID 1 must not exit (kernel panic): report, power off
        log(f"{type(e).__name__}: {e}")
    power_off()
