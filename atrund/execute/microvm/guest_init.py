"""PID 1 inside an atrund microVM (the ``microvm`` backend): copied into rootfs.ext4 as
/sbin/atrun-init by ``atrund image build``. Stdlib only, run as ``python3 -I -S``.

One VM serves one worker: one request, or (with reuse) the requests of one reuse key. This program mounts what a runtime needs (the root filesystem
itself is read-only), starts the runtime's at-run-exec as an unprivileged user with limits,
and relays between at-run-exec and the host over ONE channel, in frames, so that nothing the
bundle prints can ever be mistaken for the protocol: the bundle never holds the channel, only
pipes to this init. When at-run-exec has ended it reports the exit status and powers the VM
off (QEMU runs with -no-reboot and Firecracker exits on reboot, so the monitor exits too).

Frames (both directions): one byte kind, four bytes big-endian length, payload.
  host -> guest   B  the bundle: file name, NUL, the file's bytes (written to /bundle, root-owned, 0444)
                  I  bytes for at-run-exec's stdin
                  C  at-run-exec's stdin ends
  guest -> host   O  at-run-exec's stdout      E  its stderr
                  L  what the bundle left running, found when an answer line ended (sent
                     before that line's O frame, so the host knows it before the answer)
                  X  it ended: its exit code as text (negative: killed by that signal)
                  M  the guest kernel's OOM-kill count as text (sent before X)

The channel: a virtio-serial port named ``atrun`` (QEMU), or vsock to the host (CID 2) on
the port given as ``atrun.vsock=PORT`` (Firecracker forwards it to ``<uds>_PORT`` on the host).

Kernel command line: atrun.runtime=NAME (directory under /opt/atrund/runtimes), atrun.uid,
atrun.data_mb (RLIMIT_DATA), atrun.nproc (RLIMIT_NPROC), atrun.tmp_mb (size of /tmp),
atrun.vsock. The command of each runtime comes from its runtime.json, as on the host.
"""

import ctypes
import json
import os
import resource
import select
import signal
import socket
import struct
import sys

RUNTIMES = "/opt/atrund/runtimes"
PYTHON = "/usr/bin/python3"  # {python}, as in the container image
PORT_NAME = "atrun"
HEADER = struct.Struct(">cI")
MAX_FRAME = 8 << 20  # a bundle is at most a few MiB; anything larger is a broken host
# The host keeps only a tail of stderr per request (executor.output_bytes): past this much in one
# request, only the last STDERR_TAIL bytes cross the channel, at the end, so a flood costs the
# guest, not the channel.
STDERR_PASS = 256 << 10
STDERR_TAIL = 8192

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
    with open("/proc/cmdline") as f:
        words = f.read().split()
    return dict(w.split("=", 1) for w in words if w.startswith("atrun.") and "=" in w)


def open_channel(opts):
    if "atrun.vsock" in opts:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.connect((socket.VMADDR_CID_HOST, int(opts["atrun.vsock"])))
        return s.detach()
    base = "/sys/class/virtio-ports"
    for port in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{port}/name") as f:
                if f.read().strip() == PORT_NAME:
                    return os.open(f"/dev/{port}", os.O_RDWR | os.O_NOCTTY)
        except OSError:
            continue
    raise OSError(f"no virtio-serial port named {PORT_NAME} and no atrun.vsock")


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def send(fd, kind, payload=b""):
    write_all(fd, HEADER.pack(kind, len(payload)) + payload)


def oom_kills():
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


def runtime_command(name):
    with open(f"{RUNTIMES}/{name}/runtime.json") as f:
        spec = json.load(f)
    paths = {"{python}": PYTHON}
    if "program" in spec:  # the runtime's own program, where the image has it (as on the host: runtimes.Program)
        paths["{" + spec["program"]["name"] + "}"] = spec["program"]["inImage"]
    out = []
    for word in spec["command"]:
        for key, value in paths.items():
            word = word.replace(key, value)
        out.append(word.replace("{dir}", f"{RUNTIMES}/{name}"))
    return out


def left_running(pid, program):
    """What runs besides at-run-exec (and the runtime's own program, if it has one) once an
    answer is out: a process below it, an orphan handed to this init, a thread of the process
    that runs the bundle. Empty if nothing."""
    below, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                below += len(kids)
                todo.extend(kids)
        except OSError:
            continue
    try:
        with open("/proc/1/task/1/children") as f:
            orphans = [k for k in f.read().split() if int(k) != pid]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return ""
    if below > (1 if program else 0) or orphans:
        return "a process still running"
    if not program and threads > 1:
        return "a thread still running"
    return ""


def has_program(name):
    with open(f"{RUNTIMES}/{name}/runtime.json") as f:
        return "program" in json.load(f)


def start_worker(opts):
    """at-run-exec as the unprivileged uid, with pipes for stdin, stdout and stderr."""
    uid = int(opts.get("atrun.uid", "65534"))
    command = runtime_command(opts.get("atrun.runtime", "python"))
    workdir = "/tmp/worker"
    os.mkdir(workdir, 0o700)
    os.chown(workdir, uid, uid)
    pipes = [os.pipe() for _ in range(3)]
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(pipes[0][0], 0)
            os.dup2(pipes[1][1], 1)
            os.dup2(pipes[2][1], 2)
            os.closerange(3, 1 << 16)
            os.setsid()
            limits = {resource.RLIMIT_NPROC: int(opts.get("atrun.nproc", "64")), resource.RLIMIT_CORE: 0,
                      resource.RLIMIT_NOFILE: 256, resource.RLIMIT_FSIZE: 64 << 20}
            if "atrun.data_mb" in opts:
                limits[resource.RLIMIT_DATA] = int(opts["atrun.data_mb"]) << 20
            for res, value in limits.items():
                resource.setrlimit(res, (value, value))
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no exec gains privileges (the root is nosuid too)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.chdir(workdir)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TMPDIR": workdir, "HOME": workdir, "LANG": "C.UTF-8"}
            os.execve(command[0], command, env)
        except BaseException as e:  # noqa: BLE001 - the child must never return into PID 1's code
            log(f"cannot start {command}: {e}")
            os._exit(127)
    os.close(pipes[0][0])
    os.close(pipes[1][1])
    os.close(pipes[2][1])
    return pid, pipes[0][1], pipes[1][0], pipes[2][0]


def relay(chan, pid, stdin, stdout, stderr, program=False):
    """Frames from the host to at-run-exec's stdin and the bundle file; its output to frames.
    Returns at-run-exec's exit code once it has ended and its output is drained."""
    buf = b""
    outputs = {stdout: b"O", stderr: b"E"}  # the pipes still open
    status = None
    host_open = True
    passed = 0  # stderr bytes forwarded as they came, this request
    tail = b""  # stderr past STDERR_PASS, last bytes only

    # Non-blocking: stderr is also read outside select()'s word (before an answer), so a read
    # that select() promised may find the pipe emptied already.
    os.set_blocking(stderr, False)

    def read_now(fd):
        """What the pipe holds now (b"" at its end), or None if nothing."""
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            return None

    def forward_stderr(data):
        """Send stderr on as it comes, until STDERR_PASS this request; past it keep only a tail."""
        nonlocal passed, tail
        if passed >= STDERR_PASS:
            tail = (tail + data)[-STDERR_TAIL:]
        else:
            send(chan, b"E", data)
            passed += len(data)

    while outputs or status is None:
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                status = os.waitstatus_to_exitcode(st)
                # Whatever the bundle left running goes with it (it may hold the output pipes open).
                # As PID 1, kill(-1) reaches every other process of the VM.
                os.kill(-1, signal.SIGKILL)
        while True:  # reap orphans the bundle left (PID 1's duty)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        watch = list(outputs) + ([chan] if host_open else [])
        ready, _, _ = select.select(watch, [], [], 0.2)
        for fd in ready:
            if fd == chan:
                data = os.read(chan, 65536)
                if not data:
                    host_open = False  # the host went away: nobody to answer; end the worker
                    os.kill(-1, signal.SIGKILL)
                    continue
                buf += data
                while len(buf) >= HEADER.size:
                    kind, size = HEADER.unpack_from(buf)
                    if size > MAX_FRAME:
                        raise OSError(f"frame of {size} bytes from the host")
                    if len(buf) < HEADER.size + size:
                        break
                    payload, buf = buf[HEADER.size:HEADER.size + size], buf[HEADER.size + size:]
                    if kind == b"B":
                        name, _, content = payload.partition(b"\0")
                        path = "/bundle/" + os.path.basename(name.decode())
                        with open(path, "wb") as f:
                            f.write(content)
                        os.chmod(path, 0o444)
                    elif kind == b"I" and stdin is not None:
                        try:
                            write_all(stdin, payload)
                        except BrokenPipeError:
                            pass
                    elif kind == b"C" and stdin is not None:
                        os.close(stdin)
                        stdin = None
            elif fd == stderr:
                data = read_now(fd)
                if data is None:
                    continue  # taken already, before an answer below
                if data:
                    forward_stderr(data)
                else:
                    if tail:
                        send(chan, b"E", b"\n[...]\n" + tail)
                        tail = b""
                    os.close(fd)
                    del outputs[fd]
            else:
                data = os.read(fd, 65536)
                if data and b"\n" in data:  # an answer line ends here
                    if left := left_running(pid, program):
                        send(chan, b"L", left.encode())
                    # This request's output goes before its answer. The bundle printed before it
                    # answered, but select() may have seen only stdout ready (a preempted guest can
                    # write both pipes between its two checks): what stderr holds now was written
                    # first. A pipe holds 64 KiB, so a few reads take all of it; a thread that keeps
                    # printing cannot hold the answer back.
                    for _ in range(4):
                        if stderr not in outputs or not (more := read_now(stderr)):
                            break  # nothing more now, or its end (which the loop closes)
                        forward_stderr(more)
                    if tail:  # this request's last words, past STDERR_PASS
                        send(chan, b"E", b"\n[...]\n" + tail)
                        tail = b""
                    passed = 0  # an answer: the next request's output passes again
                if data:
                    send(chan, b"O", data)
                else:
                    os.close(fd)
                    del outputs[fd]
    return status


def main():
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not os.path.exists("/dev/null"):
        mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID)
    opts = cmdline()
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={int(opts.get('atrun.tmp_mb', '64'))}m")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m")
    mount("tmpfs", "/bundle", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    chan = open_channel(opts)
    oom_before = oom_kills()
    pid, stdin, stdout, stderr = start_worker(opts)
    status = relay(chan, pid, stdin, stdout, stderr, has_program(opts.get("atrun.runtime", "python")))
    send(chan, b"M", str(oom_kills() - oom_before).encode())
    send(chan, b"X", str(status).encode())
    log(f"at-run-exec ended ({status})")


def power_off():
    try:
        os.sync()
    finally:
        libc.reboot(LINUX_REBOOT_CMD_RESTART)
        os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # noqa: BLE001 - PID 1 must not exit (kernel panic): report, power off
        log(f"{type(e).__name__}: {e}")
    sys.stderr.flush()
    power_off()
