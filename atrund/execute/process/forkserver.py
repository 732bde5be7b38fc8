"""The fork server (zygote) of the ``process`` backend: fenced workers without a fresh interpreter.

The exec path starts every worker as ``setpriv ... unshare ... python3 fence.py SPEC``, and the
runtime as a third interpreter after that: three program starts before any request is read.
This program is started once per backend, as root, single-threaded, stdlib only (run with
``python3 -I -S``, the same interpreter and flags as every at-run-exec; it never imports the
runner's package). It has already imported what the fence and the runtimes' at-run-exec programs
import, built the seccomp filter, and compiled each at-run-exec into a code object. Then, for
each spawn request on its socket (a socketpair with the runner: no path on any file system):

- the server unshares a PID namespace for its next child only, forks (the child is PID 1 of
  the new namespace) and goes back to its own PID namespace for later children;
- the child (the worker's init) sets PR_SET_PDEATHSIG, starts a session of its own, puts the
  three pipe ends the runner sent (SCM_RIGHTS) on fds 0, 1 and 2 and closes every other
  descriptor it inherited (the server's socket, its pidfds); then what ``unshare`` does on the
  exec path: new mount, IPC, UTS and network namespaces (a worker granted network joins the
  one the runner made for it, its fourth descriptor, instead: fence.join_network), every mount private, a fresh /proc; then the fence (fence.enter: cgroups, /tmp, /run,
  rlimits, no_new_privs, groups, gid, uid, Landlock), the same function the exec path runs;
- it forks the runtime's process, which loads the seccomp filter and runs the at-run-exec code
  object as ``__main__`` with the relocated argv and the spec's environment; the init stays,
  reaping orphans and passing on the runtime's exit status (fence.serve_as_init).

No secret ever passes through this process: a spec holds a uid, paths, limits and the
runtime's command, and the request (with its secrets) goes from the runner to the worker's
stdin. So the server's memory, which every forked worker inherits a copy of, tells a bundle
nothing it may not know. The server reaps its children and reports their exit status on the
socket; it dies with the runner (PR_SET_PDEATHSIG), and its workers die with it.

It is also the privileged helper of a runner that runs as its own user (``[runner] user``,
atrund/privsep.py): the runner starts it as root, then drops every privilege, and asks it for
the few things only root can do. Then the first message carries a ``policy`` (sent while the
runner was still root, so trusted), and every later request is checked against it: the
helper takes no path and no command from the runner, only names and numbers it checks (see
``Policy``; docs/architecture.md "The privileged helper").

Messages (SOCK_SEQPACKET, one JSON object each):
  runner -> server  {"runner": PID, "fence": PATH, "anyip": PATH, "programs": [PATH, ...],
                     "policy": POLICY (only for an unprivileged runner)}  first, once
  server -> runner  {"ready": true}  once, after start-up
  runner -> server  {"id": N, "spec": SPEC, "network": bool} with fds stdin, stdout, stderr
                    (and, when network is granted, a fourth: the network namespace to join);
                    under a policy only the spec's runtime, uid, workdir's name, grants,
                    ports, rlimits and whether cgroups are on are read, each checked
  server -> runner  {"id": N, "pid": PID} with a pidfd of the worker's init, or {"id": N, "error": TEXT}
  server -> runner  {"exit": PID, "code": CODE}  (CODE: exit status, or -signal)
  runner -> server  {"kill": PID}  SIGKILL to the init of a worker this server forked (no answer)
  runner -> server  {"id": N, "netns": {"ports": [PORT...], "servers": [ADDRESS...]}} or
                    {"id": N, "netns": {"ports": [...], "container": ID, "pid": PID}}
  server -> runner  {"id": N, "listeners": L, "dns": D} with fds: the namespace, L TCP listeners,
                    D DNS sockets (anyip.build), or {"id": N, "error": TEXT}
  runner -> server  {"id": N, "mount": NAME, "size_mb": MB} / {"id": N, "unmount": NAME}
                    (policy only: a worker directory, by name, in the policy's work root)
  server -> runner  {"id": N, "ok": true} or {"id": N, "error": TEXT}
  runner -> server  {"id": N, "monitor": {"runtime": NAME, "ports": [PORT...]}}  (policy only:
                    a microVM for a runtime the policy has a monitor command for, while fewer
                    than its monitor_limit run; see monitor())
  server -> runner  {"id": N, "pid": PID} with fds: a pidfd of the monitor's init, the VM's
                    channel (a connected stream socket) and its console (a pipe's read end);
                    later {"exit": PID, "code": CODE} as for a worker; {"kill": PID} kills it

Usage: ``python3 -I -S - SOCKET_FD`` with this program on stdin; the first message on the
socket says the rest (see start()).
"""

import ast
import ctypes
import gc
import importlib.util
import io
import ipaddress
import json
import os
import re
import select
import signal
import socket
import sys
import types

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG = 1
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # ignored by the server, not by what it forks
MAX_MESSAGE = 1 << 20
MAX_PORTS, MAX_SERVERS = 64, 8  # per namespace: the egress proxy's own caps are lower
sys.dont_write_bytecode = True  # no __pycache__ written as root into the checkout (restored for the runtime)


def load_module(name, path):
    """fence.py or anyip.py as a module (not on sys.path, so a bundle cannot import it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fence = libc = anyip = None  # set by start()
WORKER_NAME = re.compile(r"w([0-9]+)-[a-z0-9_]+")  # backend.py: mkdtemp(prefix=f"w{uid}-")
CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
RLIMITS = ("DATA", "CPU", "FSIZE", "NOFILE", "NPROC", "CORE")


class Refused(Exception):
    """A request the policy does not allow: answered as an error, the server goes on."""


class Policy:
    """What an unprivileged runner may ask for, fixed while it was root (the first message).

    A spawn's spec is rebuilt from it: the runtime's command, relocated directories and system
    calls, the system paths and the environment are the policy's, looked up by the runtime's
    name; the uid must be in the runner's range (the runner's flock on it keeps two live workers
    apart, and a uid outside the range is never a worker's); the worker directory is a name in the
    work root; granted paths must lie within what the operator allowed; ports, limits are numbers.
    """

    def __init__(self, raw):
        self.work_root = raw["work_root"]
        self.work_fd = os.open(self.work_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.uids = range(int(raw["uid_base"]), int(raw["uid_base"]) + int(raw["uids"]))
        self.share_gid = int(raw["share_gid"])
        self.cgroups = list(raw["cgroups"])
        self.grant_read, self.grant_write = list(raw["grant_read"]), list(raw["grant_write"])
        self.runtimes = raw["runtimes"]
        self.fixed = raw["fixed"]
        self.monitors = raw.get("monitors") or {}  # runtime -> the VM monitor's command (microvm only)
        self.monitor_limit = int(raw.get("monitor_limit", 0))  # monitors running at once, at most

    def monitor(self, asked):
        """The monitor command for a VM of the runtime ``asked`` names, with the ports the guest
        relays (its only variable part, appended to the guest kernel's command line as numbers)."""
        if not self.monitors:
            raise Refused("this runner's backend starts no virtual machines")
        argv = self.monitors.get(asked.get("runtime")) if isinstance(asked, dict) else None
        if argv is None:
            raise Refused(f"not a runtime of this runner: {asked.get('runtime') if isinstance(asked, dict) else asked!r}")
        ports = tcp_ports(asked.get("ports"))
        argv = list(argv)
        if ports:
            cmdline = argv.index("-append") + 1
            argv[cmdline] += " atrun.net=" + ",".join(map(str, ports))
        return argv

    def worker(self, name):
        """A worker directory's name, checked: ``w{uid}-{random}`` with a uid of the range."""
        match = WORKER_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None or int(match.group(1)) not in self.uids:
            raise Refused(f"not a worker directory name: {name!r}")
        return name

    def spec(self, asked):
        """The spec a worker is fenced with, from what the runner asked for."""
        runtime = self.runtimes.get(asked.get("runtime"))
        if runtime is None:
            raise Refused(f"not a runtime of this runner: {asked.get('runtime')!r}")
        uid = asked.get("uid")
        if type(uid) is not int or uid not in self.uids or asked.get("gid") != uid:
            raise Refused(f"not a worker uid of this runner: {uid!r}")
        workdir = asked.get("workdir")  # only its name is read: the work root is the policy's
        name = self.worker(os.path.basename(workdir) if isinstance(workdir, str) else None)
        if not name.startswith(f"w{uid}-"):
            raise Refused(f"worker directory {name} is not uid {uid}'s")
        ports = tcp_ports(asked.get("ports"))
        rlimits = asked.get("rlimits")
        if not isinstance(rlimits, dict) or set(rlimits) != set(RLIMITS) or not all(type(v) is int and v >= 0 for v in rlimits.values()):
            raise Refused(f"rlimits must set exactly {', '.join(RLIMITS)}")
        return {
            **self.fixed,
            "uid": uid, "gid": uid, "share_gid": self.share_gid, "workdir": f"{self.work_root}/{name}",
            "argv": runtime["argv"], "relocate": runtime["relocate"], "syscalls": runtime["syscalls"],
            "grant_read": granted(asked.get("grant_read"), self.grant_read),
            "grant_write": granted(asked.get("grant_write"), self.grant_write),
            "ports": ports, "rlimits": rlimits,
            "cgroups": [f"{parent}/{name}/tasks" for parent in self.cgroups] if asked.get("cgroups") else [],
        }


def tcp_ports(ports):
    """``ports``, checked to be a short list of TCP port numbers."""
    if not isinstance(ports, list) or len(ports) > MAX_PORTS or not all(type(p) is int and 0 < p < 65536 for p in ports):
        raise Refused("ports must be a list of TCP port numbers")
    return ports


def granted(paths, roots):
    """``paths``, each within one of ``roots`` as written and as resolved now (the runner's own
    check, access._path_allowed, made again here: the runner may be the one lying)."""
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise Refused("granted paths must be a list of strings")
    for path in paths:
        normal, real = os.path.normpath(path), os.path.realpath(path)
        if not os.path.isabs(path) or not any(
                root == "*" or (within(normal, os.path.normpath(root)) and within(real, os.path.realpath(root))) for root in roots):
            raise Refused(f"{path} is not within what the operator grants")
    return paths


def within(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


class Become(Exception):
    """Raised in a worker's runtime process: unwinds out of the server to run the at-run-exec."""

    def __init__(self, code, argv, env):
        super().__init__()
        self.code, self.argv, self.env = code, argv, env


class Programs:
    """Each at-run-exec compiled once (again if the file changes), and what it imports at its
    top level imported here, so a worker pays neither."""

    def __init__(self):
        self.compiled = {}

    def code(self, path, filename):
        st = os.stat(path)
        key = (path, filename)
        found = self.compiled.get(key)
        if found is None or found[0] != (st.st_mtime_ns, st.st_size):
            with open(path, "rb") as f:
                source = f.read()
            tree = ast.parse(source, filename)
            preload(tree)
            found = ((st.st_mtime_ns, st.st_size), compile(tree, filename, "exec", dont_inherit=True))
            self.compiled[key] = found
        return found[1]


def preload(tree):
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in names:
            try:
                __import__(name)
            except ImportError:
                pass  # the program itself will say so, in the worker


def servable(argv):
    """A command this server can run: this interpreter, with -I -S, on a program file."""
    return len(argv) >= 4 and argv[0] == sys.executable and argv[1:3] == ["-I", "-S"]


class Server:
    def __init__(self, sock, policy=None):
        self.sock = sock
        self.policy = policy  # set for an unprivileged runner: every request is checked against it
        self.programs = Programs()
        self.children = {}  # pidfd (the server's own copy, for reaping) -> pid
        self.monitors = set()  # pids of the monitor inits running
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.self_fd = os.pidfd_open(os.getpid())  # a worker's init checks the server is alive through it
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)

    def serve(self):
        while True:
            for fd, _ in self.poll.poll():
                if fd == self.sock.fileno():
                    self.receive()
                else:
                    self.reap(fd)

    def receive(self):
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            data, fds = b"", []
        if not data:
            os._exit(0)  # the runner closed its end: its backend is closed
        msg = None
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise Refused("a request is a JSON object")
            if "spec" in msg:
                if len(fds) != (4 if msg.get("network") else 3):
                    raise Refused(f"expected {4 if msg.get('network') else 3} descriptors, got {len(fds)}")
                self.spawn(msg, fds)
            elif fds:
                raise Refused("only a spawn carries descriptors")
            elif "kill" in msg:
                self.kill(msg["kill"])
            elif "netns" in msg:
                self.netns(msg)
            elif "mount" in msg or "unmount" in msg:
                self.mount(msg)
            elif "monitor" in msg:
                self.monitor(msg)
            else:
                raise Refused("not a request this server knows")
        except Become:
            raise  # in the worker's runtime process, which holds none of these descriptors any more
        except Exception as e:  # noqa: BLE001 - a bad request must not end the server
            self.send({"id": msg.get("id") if isinstance(msg, dict) else None, "error": f"{type(e).__name__}: {e}"})
        for fd in fds:  # the worker has its copies
            os.close(fd)

    def spawn(self, msg, fds):
        spec = self.policy.spec(msg["spec"]) if self.policy else msg["spec"]
        if not servable(spec["argv"]):
            raise ValueError(f"not a command this fork server runs: {spec['argv'][:4]}")
        code = self.programs.code(spec["argv"][3], fence.moved(spec["argv"][3], fence.relocation(spec["relocate"])))
        pid, pidfd = self.fork_init(lambda: worker_init(self, spec, msg.get("network", False), fds, code))  # leaves only by Become
        self.send({"id": msg["id"], "pid": pid}, [pidfd])

    def fork_init(self, init):
        """Fork a child that runs ``init`` as PID 1 of a new PID namespace (it never returns); its
        pid, and a pidfd this server reaps it by."""
        sys.stderr.flush()
        check(libc.unshare(CLONE_NEWPID), "unshare a PID namespace")  # for the next child only
        try:
            pid = os.fork()
        except OSError:
            check(libc.setns(self.own_pidns, CLONE_NEWPID), "return to the server's PID namespace")
            raise
        if pid == 0:
            for sig in STOP_SIGNALS:  # the server ignores them; a worker or monitor must not
                signal.signal(sig, signal.SIG_DFL)
            init()
        # Later children must not land in this child's namespace: a failure here ends the server.
        if libc.setns(self.own_pidns, CLONE_NEWPID) != 0:
            os._exit(70)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.poll.register(pidfd, select.POLLIN)
        return pid, pidfd

    def kill(self, pid):
        """SIGKILL to a worker's init, if this server forked it (an unprivileged runner may not
        signal a worker's uid itself); the kernel then kills its whole PID namespace."""
        for pidfd, child in self.children.items():
            if child == pid:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return

    def netns(self, msg):
        """A worker's egress namespace (anyip.build), made here for a runner that cannot: a new
        one, or a container's (``--network none``: nothing in it but loopback, which build checks)."""
        asked = msg["netns"]
        ports = tcp_ports(asked.get("ports") if isinstance(asked, dict) else None)
        existing = None
        if "container" in asked:
            existing, servers = self.container_netns(asked.get("container"), asked.get("pid"))
        else:
            servers = asked.get("servers")
            if not isinstance(servers, list) or len(servers) > MAX_SERVERS:
                raise Refused("servers must be a list of addresses")
        try:
            servers = [str(ipaddress.ip_address(a)) for a in servers]
        except (TypeError, ValueError) as e:
            raise Refused(f"not a nameserver address: {e}") from None
        try:
            ns = anyip.build(ports, servers, existing)
        finally:
            if existing is not None:
                os.close(existing)
        try:
            self.send({"id": msg["id"], "listeners": len(ns.listeners), "dns": len(ns.dns)},
                      [ns.fd, *(s.fileno() for s in ns.listeners + ns.dns)])
        finally:
            ns.close()

    def container_netns(self, cid, pid):
        """The network namespace of container ``cid``'s init ``pid``, checked to be that
        container's (its cgroup names it) and not the host's, and its nameservers."""
        if not isinstance(cid, str) or not CONTAINER_ID.fullmatch(cid) or type(pid) is not int or pid <= 1:
            raise Refused("a container is named by its 64-hex id and its init's pid")
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                if cid not in f.read():
                    raise Refused(f"process {pid} is not in container {cid[:12]}")
            if os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
                raise Refused("that is the host's network namespace")
            servers = anyip.nameservers(f"/proc/{pid}/root/etc/resolv.conf")
        except BaseException:
            os.close(fd)
            raise
        return fd, servers

    def mount(self, msg):
        """Mount a worker directory's tmpfs, or detach it: by name, in the policy's work root."""
        if self.policy is None:
            raise Refused("mounts are asked only under a policy")
        if "mount" in msg:
            name, size = self.policy.worker(msg["mount"]), msg.get("size_mb")
            if type(size) is not int or not 0 < size <= 1 << 20:
                raise Refused("size_mb must be a number of megabytes")
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.policy.work_fd)
            try:
                opts = f"size={size}m,nr_inodes=4096,mode=0700".encode()  # as backend.mount_tmpfs
                check(libc.mount(b"tmpfs", f"/proc/self/fd/{fd}".encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts),
                      f"mount a tmpfs on {name}")
            finally:
                os.close(fd)
        else:
            name = self.policy.worker(msg["unmount"])
            libc.umount2(f"{self.policy.work_root}/{name}".encode(), MNT_DETACH | UMOUNT_NOFOLLOW)  # not mounted: nothing to do
        self.send({"id": msg["id"], "ok": True})

    def monitor(self, msg):
        """Start a microVM's monitor (QEMU) for an unprivileged runner: the command is the
        policy's (binary, kernel, initramfs, rootfs, memory, vCPUs, its seccomp sandbox and its
        drop to nobody, all fixed before the runner dropped); the request picks a runtime and
        the ports of a network grant. Like a worker, the monitor's init is PID 1 of a PID
        namespace of its own and dies with this server, and the monitor with it (QEMU's own drop
        to nobody clears any parent-death signal QEMU had); ``kill`` names that init."""
        if self.policy is None:
            raise Refused("monitors are started only under a policy")
        argv = self.policy.monitor(msg["monitor"])
        if len(self.monitors) >= self.policy.monitor_limit:
            raise Refused(f"{len(self.monitors)} monitors are running: the policy allows {self.policy.monitor_limit} at once")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        console, console_end = os.pipe2(os.O_CLOEXEC)
        try:
            pid, pidfd = self.fork_init(lambda: monitor_init(self, argv, theirs.fileno(), console_end))
            self.monitors.add(pid)
            self.send({"id": msg["id"], "pid": pid}, [pidfd, ours.fileno(), console])
        finally:
            for end in (ours, theirs):
                end.close()
            os.close(console)
            os.close(console_end)

    def reap(self, pidfd):
        pid = self.children.pop(pidfd)
        self.poll.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self.monitors.discard(pid)
        self.send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def send(self, msg, fds=()):
        try:
            socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds))
        except OSError:
            os._exit(0)  # the runner is gone


def check(result, what):
    if result < 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def worker_init(server, spec, network, fds, code):
    """In the forked child, PID 1 of its new namespace: become the worker's fenced init, fork
    its runtime process (which raises Become), and serve as init. Never returns otherwise."""
    try:
        if network:
            fence.join_network(fds[3])  # first, while the descriptors are ours
        os.setsid()  # a process group of our own, not the server's (which the pool never kills)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)  # inheritable
        # Close the server's socket, its pidfds and everything else it holds; keep only a pidfd on
        # the server itself until the parent-death signal is set for good (fence.enter).
        alive = server.self_fd
        os.closerange(3, alive)
        os.closerange(alive + 1, 1 << 20)
        fresh_stdio()
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if network else CLONE_NEWNET)  # joined above if granted
        fence.check(libc.unshare(flags), "unshare namespaces")
        fence.check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
        fence.check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NOEXEC | MS_NODEV, None), "mount /proc")
        argv = fence.enter(spec, lambda: not select.select([alive], [], [], 0)[0])
        os.close(alive)
        child = os.fork()
    except BaseException as e:  # noqa: BLE001 - said on the worker's stdout, as the fence says its errors
        fence.fail(f"{type(e).__name__}: {e}")
    if child == 0:
        fence.seccomp_filter(spec.get("syscalls"))  # in the runtime's process only, as on the exec path
        raise Become(code, argv[3:], spec["env"])
    fence.serve_as_init(child)


def monitor_init(server, argv, channel, console):
    """In the forked child, PID 1 of its new namespace, still root: the monitor's init. It runs
    the monitor (console on stdout and stderr, the VM's channel on fd 3, where the policy's
    command expects it), reaps, and exits with the monitor's status; it keeps this server's
    parent-death signal, so the namespace, monitor included, goes when this server goes."""
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if select.select([server.self_fd], [], [], 0)[0]:
            os._exit(70)  # the server died before the line above
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(console, 1)
        os.dup2(console, 2)
        if channel == 3:
            os.set_inheritable(3, True)
        else:
            os.dup2(channel, 3)
        os.closerange(4, 1 << 20)  # the server's socket, its pidfds, the other ends
        child = os.fork()
        if child == 0:
            try:
                os.execve(argv[0], argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
            except OSError as e:
                os.write(2, f"cannot start {argv[0]}: {e.strerror}\n".encode())
            os._exit(127)
        os.close(3)  # the channel is the monitor's alone: the runner sees its end close when it dies
    except BaseException:  # noqa: BLE001 - nothing to tell but the exit status
        os._exit(70)
    fence.serve_as_init(child)


def fresh_stdio():
    """sys.stdin/stdout/stderr over the new fds 0-2, as a fresh interpreter would make them (the
    server's were made for /dev/null, which is seekable: pipes are not)."""
    for name, fd, mode in (("stdin", 0, "rb"), ("stdout", 1, "wb"), ("stderr", 2, "wb")):
        old = getattr(sys, name)
        buffered = io.open(fd, mode, closefd=False)
        stream = io.TextIOWrapper(buffered, encoding=old.encoding, errors=old.errors, newline="\n",
                                  line_buffering=old.line_buffering)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def become(job):
    """Run the at-run-exec code object as ``__main__``, as ``python3 -I -S at-run-exec`` would."""
    server_globals = globals()
    os.environ.clear()
    os.environ.update(job.env)
    sys.argv = list(job.argv)
    sys.dont_write_bytecode = False  # as in a fresh interpreter (the server writes none into the checkout)
    main = types.ModuleType("__main__")
    main.__file__ = job.argv[0]
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    for name in [n for n in sys.modules if n == "fence"]:
        del sys.modules[name]
    code = job.code
    server_globals.clear()  # nothing of the server's state stays reachable from the bundle by name
    exec(code, main.__dict__)  # noqa: S102 - the runtime's own at-run-exec, compiled at start-up


def start(argv):
    """Set up from the runner's first message: {"runner": PID, "fence": PATH, "programs": [PATH...]}.
    Nothing of it is on the command line, which every worker's /proc/self/cmdline shows."""
    global fence, libc, anyip
    sock = socket.socket(fileno=int(argv[1]))
    config = json.loads(sock.recv(MAX_MESSAGE) or b"null")
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # A stop is the runner's to make: Ctrl-C in a terminal signals the whole process group, and a
    # service manager may signal every process of the unit; the runner then drains its running
    # work through this server, which ends when the runner closes its socket (or dies).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if not config or os.getppid() != config["runner"]:
        os._exit(1)  # the runner died before the line above
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # this program's source came on stdin
    os.close(devnull)
    fence = load_module("fence", config["fence"])
    anyip = load_module("anyip", config["anyip"])
    libc = fence.libc
    server = Server(sock, Policy(config["policy"]) if config.get("policy") else None)
    for path in config["programs"]:
        server.programs.code(path, path)  # imports what it imports; recompiled with the worker's path on first use
    fence.seccomp_rules()
    gc.freeze()  # what is loaded now stays out of every collection: forked workers do not copy its pages for the GC
    server.send({"ready": True})
    return server


if __name__ == "__main__":
    try:
        start(sys.argv).serve()
    except Become as job:
        pending = job
    become(pending)
