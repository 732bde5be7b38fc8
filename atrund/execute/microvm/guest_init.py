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

With a network grant (atrun.net=PORTS) the guest's only namespace is set up as a worker's
egress namespace on the host is (anyip.py, copied beside this file: AnyIP routes, a listener per
granted port, a DNS socket on the resolv.conf nameservers), and what reaches those sockets
crosses the same channel as streams, to the runner's egress proxy (atrund/execute/egress/proxy.py
``Egress.relay``), which checks and counts each connection. ID is four bytes big-endian.
  guest -> host   T  a connection the bundle made: ID, port (two bytes), the address it asked for (text)
                  D  ID, bytes it sent            F  ID: it sent no more (EOF)
                  R  ID: the stream ends at once (reset)
                  W  ID, four bytes n: n more bytes of D may come from the host (written to the bundle)
                  Q  query ID, a DNS query datagram
  host -> guest   D, F, R and W for a stream, the same way round
                  A  query ID, the DNS answer datagram
Each direction of a stream has a window of WINDOW bytes: neither side sends D past what the
other has acknowledged with W, so neither side ever holds more than that per stream for the
other, and a bundle that never reads cannot make the runner buffer.

The channel: a virtio-serial port named ``atrun`` (QEMU), or vsock to the host (CID 2) on
the port given as ``atrun.vsock=PORT`` (Firecracker forwards it to ``<uds>_PORT`` on the host).

Kernel command line: atrun.runtime=NAME (directory under /opt/atrund/runtimes), atrun.uid,
atrun.data_mb (RLIMIT_DATA), atrun.nproc (RLIMIT_NPROC), atrun.tmp_mb (size of /tmp),
atrun.vsock, atrun.net. The command of each runtime comes from its runtime.json, as on the host.
"""

import ctypes
import importlib.util
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
ANYIP = "/usr/lib/atrun/anyip.py"  # atrund/execute/egress/anyip.py, copied by the image build
ID = struct.Struct(">I")
CREDIT = struct.Struct(">II")
WINDOW = 256 << 10  # bytes of a stream one side may send before the other acknowledges them
MAX_STREAMS = 64  # connections open at once (the runner's proxy holds as many)
MAX_QUERIES = 32  # DNS queries waiting for their answer

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


class Stream:
    """One connection the bundle made, as the guest sees it."""

    def __init__(self, sock):
        self.sock = sock
        self.credit = WINDOW  # bytes the host will still take
        self.pending = bytearray()  # bytes from the host, not yet taken by the bundle
        self.eof_in = False  # the host sent F
        self.eof_out = False  # the bundle's side ended; F sent


class Net:
    """The guest's side of the egress relay: listeners and DNS sockets in, streams over the channel."""

    def __init__(self, chan, listeners, dns):
        self.chan = chan
        self.listeners = {s.fileno(): s for s in listeners}
        self.dns = {s.fileno(): s for s in dns}
        self.streams = {}  # ID -> Stream
        self.by_fd = {}  # descriptor -> ID
        self.queries = {}  # query ID -> (socket, the asker's address)
        self.next_id = 1

    def readers(self):
        out = list(self.listeners) + list(self.dns)
        return out + [s.sock.fileno() for s in self.streams.values() if s.credit > 0 and not s.eof_out]

    def writers(self):
        return [s.sock.fileno() for s in self.streams.values() if s.pending]

    def owns(self, fd):
        return fd in self.listeners or fd in self.dns or fd in self.by_fd

    def readable(self, fd):
        if fd in self.listeners:
            return self._accept(self.listeners[fd])
        if fd in self.dns:
            return self._query(self.dns[fd])
        sid = self.by_fd.get(fd)
        stream = self.streams.get(sid)
        if stream is None:
            return
        try:
            data = stream.sock.recv(min(stream.credit, 65536))
        except BlockingIOError:
            return
        except OSError:
            return self._reset(sid, tell=True)
        if not data:
            stream.eof_out = True
            send(self.chan, b"F", ID.pack(sid))
            return self._maybe_done(sid)
        stream.credit -= len(data)
        send(self.chan, b"D", ID.pack(sid) + data)

    def writable(self, fd):
        sid = self.by_fd.get(fd)
        stream = self.streams.get(sid)
        if stream is None:
            return
        try:
            n = stream.sock.send(stream.pending)
        except BlockingIOError:
            return
        except OSError:
            return self._reset(sid, tell=True)
        del stream.pending[:n]
        send(self.chan, b"W", CREDIT.pack(sid, n))
        self._flushed(sid)

    def frame(self, kind, payload):
        """A frame from the host for the network (False: not one of its kinds)."""
        if kind not in (b"D", b"F", b"R", b"W", b"A") or len(payload) < ID.size:
            return False
        sid = ID.unpack_from(payload)[0]
        if kind == b"A":
            asked = self.queries.pop(sid, None)
            if asked is not None:
                try:
                    asked[0].sendto(payload[ID.size:], asked[1])
                except OSError:
                    pass
            return True
        stream = self.streams.get(sid)
        if stream is None:
            return True  # ended here already
        if kind == b"D":
            stream.pending += payload[ID.size:]
            if len(stream.pending) > WINDOW:  # past the window: a broken host; the stream goes
                self._reset(sid, tell=True)
        elif kind == b"W" and len(payload) >= CREDIT.size:
            stream.credit += CREDIT.unpack_from(payload)[1]
        elif kind == b"F":
            stream.eof_in = True
            self._flushed(sid)
        elif kind == b"R":
            self._reset(sid, tell=False)
        return True

    def _accept(self, listener):
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if len(self.streams) >= MAX_STREAMS:
            return _abort(conn)
        host, port = conn.getsockname()[:2]
        conn.setblocking(False)
        sid, self.next_id = self.next_id, self.next_id + 1
        self.streams[sid] = Stream(conn)
        self.by_fd[conn.fileno()] = sid
        send(self.chan, b"T", ID.pack(sid) + struct.pack(">H", port) + host.split("%")[0].encode())

    def _query(self, sock):
        try:
            data, addr = sock.recvfrom(4096)
        except OSError:
            return
        if len(self.queries) >= MAX_QUERIES:
            return  # a flood of queries is dropped, as a busy server would
        qid, self.next_id = self.next_id, self.next_id + 1
        self.queries[qid] = (sock, addr)
        send(self.chan, b"Q", ID.pack(qid) + data)

    def _flushed(self, sid):
        stream = self.streams[sid]
        if stream.eof_in and not stream.pending:
            try:
                stream.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._maybe_done(sid)

    def _maybe_done(self, sid):
        stream = self.streams[sid]
        if stream.eof_in and stream.eof_out and not stream.pending:
            self._drop(sid).close()

    def _reset(self, sid, tell):
        if tell:
            send(self.chan, b"R", ID.pack(sid))
        _abort(self._drop(sid))

    def _drop(self, sid):
        stream = self.streams.pop(sid)
        del self.by_fd[stream.sock.fileno()]
        return stream.sock


def _abort(sock):
    """Close with a reset, as a refused connection is under the other backends."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def start_network(chan, opts):
    """The guest's namespace as a worker's egress namespace, if the request grants network."""
    if not opts.get("atrun.net"):
        return None
    spec = importlib.util.spec_from_file_location("anyip", ANYIP)
    anyip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anyip)
    ports = [int(p) for p in opts["atrun.net"].split(",") if p]
    listeners, dns = anyip.serve_here(ports, anyip.nameservers())
    return Net(chan, listeners, dns)


def relay(chan, pid, stdin, stdout, stderr, program=False, net=None):
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
        watch = list(outputs) + ([chan] if host_open else []) + (net.readers() if net else [])
        ready, writable, _ = select.select(watch, net.writers() if net and host_open else [], [], 0.2)
        for fd in writable:
            net.writable(fd)
        for fd in ready:
            if net is not None and net.owns(fd):
                if host_open:
                    net.readable(fd)
            elif fd != chan and fd not in outputs:
                continue  # a stream that ended while this round ran (its number may come back)
            elif fd == chan:
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
                    if net is not None and net.frame(kind, payload):
                        pass
                    elif kind == b"B":
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
    net = start_network(chan, opts)
    oom_before = oom_kills()
    pid, stdin, stdout, stderr = start_worker(opts)
    status = relay(chan, pid, stdin, stdout, stderr, has_program(opts.get("atrun.runtime", "python")), net)
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
