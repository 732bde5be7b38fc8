"""The ``process`` backend: the none backend's worker inside a kernel sandbox (Linux).

Each worker is started as
``setpriv --pdeathsig KILL -- unshare --mount --pid --fork --kill-child --mount-proc --ipc --uts [--net] -- python3 fence.py SPEC``
so it has its own PID namespace (killing the worker kills everything it started, setsid or
not), its own mount namespace with a private /tmp, its own network namespace (with no device
but loopback; one whose only way out is the runner's egress proxy if the request grants
network: atrund/execute/egress/), and then the fence (atrund/execute/process/fence.py): hard rlimits, an unprivileged uid of its
own, Landlock over files, TCP ports and signals. The runtime's own permission flags (Deno,
Node) apply on top, inside.

Warm workers carry the default fence (no network, no paths beyond the runtime); a request that
is granted more gets a worker started for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import structlog

from atrund.execute import procs
from atrund.execute.base import ExecutorError
from atrund.execute.direct import SAFE_PATH, SETPRIV, DirectWorker, check_program, data_limit, spawn_process
from atrund.execute.egress.dns import Resolver
from atrund.execute.egress.policy import Grants
from atrund.execute.egress.proxy import Egress
from atrund.execute.pool import Backend, Census, Worker, cpu_limit, leftovers
from atrund.execute.process.forked import (
    FENCE,
    SYSTEM_PYTHON,
    ForkedWorker,
    ForkServer,
    connect_pipes,
    programs,
    servable,
)
from atrund.execute.protocol import ExecEgress, ExecPermissions
from atrund.execute.runtimes import Runtime, load_runtimes
from atrund.execute.workdir import owned_dir, work_root

log = structlog.get_logger("atrund.execute")

# What every runtime may read besides its own directory: system libraries and a few files.
SYSTEM_READ = [
    "/usr", "/lib", "/lib64", "/bin", "/sbin", "/proc", "/dev/urandom", "/dev/random",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/nsswitch.conf",
    "/etc/hosts", "/etc/resolv.conf", "/etc/host.conf", "/etc/gai.conf", "/etc/ssl", "/etc/ca-certificates",
    "/etc/passwd", "/etc/group", "/etc/mime.types",
]
SYSTEM_WRITE = ["/dev/null", "/dev/zero", "/dev/full"]
WORKER_ENV = {"PATH": SAFE_PATH, "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}


def ports_for(net: list[str]) -> list[int]:
    """TCP ports a network grant allows (host:port that port, a bare host 80 and 443): Landlock's
    connect rules, under the egress proxy, which enforces the hosts (atrund/execute/egress/)."""
    return Grants(net).ports


class UidPool:
    """One unprivileged uid per live worker, from a configured range.

    A uid is held with an flock on a file named for it, so two runners on one host (or two
    pools in one process) never hand the same uid to two live workers.
    """

    def __init__(self, base: int, count: int, lock_dir: Path) -> None:
        self.free = list(range(base, base + count))
        self.lock_dir = lock_dir
        self.held: dict[int, int] = {}

    def take(self) -> int:
        for uid in list(self.free):
            if self.hold(uid):
                return uid
        raise ExecutorError("no sandbox uid free: raise executor.process.uids")

    def hold(self, uid: int) -> bool:
        """Take ``uid`` if no one (in any process) holds it."""
        if uid not in self.free:
            return False
        fd = os.open(self.lock_dir / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.free.remove(uid)
        self.held[uid] = fd
        return True

    def give(self, uid: int) -> None:
        os.close(self.held.pop(uid))
        self.free.append(uid)


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
MS_NOSUID, MS_NODEV = 2, 4


def mount_tmpfs(path: Path, size_mb: int) -> None:
    """A size-limited tmpfs for a worker's /tmp: a bundle filling it fills its own quota, not the host's disk."""
    opts = f"size={size_mb}m,nr_inodes=4096,mode=0700".encode()  # inodes cost unaccounted kernel memory
    if _libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
        err = ctypes.get_errno()
        raise ExecutorError(f"cannot mount a tmpfs for a worker at {path}: {os.strerror(err)}")


def unmount(path: Path) -> None:
    _libc.umount2(str(path).encode(), MNT_DETACH)


def worker_mounts(root: Path) -> list[Path]:
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo") as f:
        return [Path(line.split()[4]) for line in f if line.split()[4].startswith(prefix)]


CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "pids")


class Cgroups:
    """One cgroup (v1 memory and pids) per worker: the worker's whole tree together, not each
    process, is held to its memory (tmpfs pages included) and process count. Absent where the
    cgroup v1 controllers are not mounted writable; `atrund doctor` says which."""

    def __init__(self, name: str = "atrund") -> None:
        self.parents = {c: CGROUP_ROOT / c / name for c in CGROUP_CONTROLLERS}
        try:
            for d in self.parents.values():
                d.mkdir(exist_ok=True)
            self.available = True
        except OSError:
            self.available = False
        self._open: dict[tuple[str, str, str], int] = {}  # (worker, controller, file) -> descriptor

    def create(self, name: str, memory_bytes: int, pids: int) -> list[str]:
        """The files the worker's fence joins by writing "0"; empty if cgroups are not available.

        ``tasks``, not ``cgroup.procs``: the fence is single-threaded, and a thread moving itself
        spares the kernel the global write lock a whole-process move takes (an RCU grace
        period: about 12 ms per worker on this kernel, the largest part of a cold start)."""
        if not self.available:
            return []
        mem, pid = self.parents["memory"] / name, self.parents["pids"] / name
        for d in (mem, pid):
            d.mkdir(exist_ok=True)
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        try:
            (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))  # no escape into swap
        except OSError:
            pass  # swap accounting is off on this kernel
        (pid / "pids.max").write_text(str(pids))
        return [str(mem / "tasks"), str(pid / "tasks")]

    def tasks(self, name: str) -> int | None:
        """How many threads the worker runs, all its processes together; None without cgroups."""
        return int(text) if (text := self._read("pids", name, "pids.current")) else None

    def processes(self, name: str) -> list[int] | None:
        """The worker's processes; None without cgroups."""
        text = self._read("pids", name, "cgroup.procs")
        return [int(p) for p in text.split()] if text is not None else None

    def _read(self, controller: str, name: str, file: str) -> str | None:
        """The file's content now. Each is opened once per worker and read again with pread (a
        cgroup file is generated afresh at offset 0): one system call per read, between every
        two requests of a hot worker."""
        if not self.available:
            return None
        key = (name, controller, file)
        try:
            fd = self._open.get(key)
            if fd is None:
                fd = self._open[key] = os.open(self.parents[controller] / name / file, os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(fd, 65536, 0).decode()
        except OSError:
            return None

    def _forget(self, name: str) -> None:
        for key in [k for k in self._open if k[0] == name]:
            os.close(self._open.pop(key))

    def usage(self, name: str) -> int | None:
        """Memory the worker's whole tree holds now (its /tmp pages included)."""
        return int(text) if (text := self._read("memory", name, "memory.usage_in_bytes")) else None

    async def remove(self, name: str) -> None:
        self._forget(name)
        if not self.available:
            return
        for parent in self.parents.values():
            for _ in range(50):  # the kernel empties a cgroup a moment after its last task dies
                try:
                    (parent / name).rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    await asyncio.sleep(0.02)

    def remove_leftovers(self, uids: "UidPool") -> None:
        """Remove the cgroups of workers a crashed runner left: only those whose uid nobody
        holds. A cgroup is empty for a moment between its creation and the fence joining it,
        so "empty" alone would let one runner starting up break another's worker start."""
        for parent in self.parents.values() if self.available else ():
            for child in parent.iterdir():
                uid = _worker_uid(child.name)
                if not child.is_dir() or uid is None or not uids.hold(uid):
                    continue
                try:
                    child.rmdir()  # fails, harmlessly, if a process still lives in it
                except OSError:
                    pass
                finally:
                    uids.give(uid)


def _worker_uid(name: str) -> int | None:
    """The uid in a worker directory's or cgroup's name, ``w{uid}-{random}``."""
    head = name[1:].split("-", 1)[0] if name.startswith("w") else ""
    return int(head) if head.isdigit() else None


class Sandbox:
    """What a fenced worker holds on the host besides its processes: its /tmp (a tmpfs), its
    cgroup and its uid. Released only once no process of the worker can be left."""

    def __init__(self, workdir: Path, uid: int, uids: UidPool, cgroups: Cgroups, helper: ForkServer | None = None) -> None:
        self.workdir = workdir
        self.uid = uid
        self._uids: UidPool | None = uids
        self._cgroups = cgroups
        self._helper = helper  # an unprivileged runner's: it mounts and detaches the tmpfs
        self.egress: Egress | None = None  # a worker granted network: its namespace and proxy

    def stage(self, code_path: str) -> str:
        """Copy the verified bundle into the worker's /tmp; the sandbox sees nothing else of ours."""
        name = "bundle" + Path(code_path).suffix
        shutil.copyfile(code_path, self.workdir / name)
        os.chmod(self.workdir / name, 0o444)
        return f"/tmp/{name}"

    def census(self, runtime: Runtime, cpu: bool) -> Census | None:
        """From the worker's cgroups where there are some (None otherwise), in as few reads as
        will do: the fence (PID 1 of the namespace, one single-threaded process) and at-run-exec,
        also single-threaded for a runtime without a program of its own, are exactly two tasks; a
        runtime with a program has threads of its own, so its processes are counted instead.
        Both ways of starting a worker put the same two processes in its cgroups."""
        name = self.workdir.name
        pids = None
        if runtime.program is None:
            tasks = self._cgroups.tasks(name)
            if tasks is None:
                return None
            left = None if tasks <= 2 else "a thread or process still running"
        else:
            pids = self._cgroups.processes(name)
            if pids is None:
                return None
            left = leftovers(len(pids) - 1, 1, runtime)
        if cpu:
            pids = pids or self._cgroups.processes(name) or []
        return Census(left=left, cpu=procs.cpu_spent(pids) if cpu else 0.0, memory=self._cgroups.usage(name))

    async def egress_counts(self) -> ExecEgress | None:
        if self.egress is None:
            return None
        await self.egress.settled()
        return self.egress.counts.snapshot()

    async def mount(self, size_mb: int) -> None:
        if self._helper is not None:
            await self._helper.mount(self.workdir.name, size_mb)
        else:
            mount_tmpfs(self.workdir, size_mb)

    async def unmount(self) -> None:
        """Detached: the tmpfs goes once the namespace's last user is gone."""
        if self._helper is not None:
            try:
                await self._helper.unmount(self.workdir.name)
            except ExecutorError as e:  # the helper is gone: nothing is left to write into it either
                log.warning("could not detach a worker directory", workdir=str(self.workdir), error=str(e))
        else:
            unmount(self.workdir)

    async def release(self) -> None:
        """After the worker's processes are dead."""
        if self.egress is not None:
            await self.egress.close()
            self.egress = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        await self._cgroups.remove(self.workdir.name)
        if self._uids is not None:  # the uid is free again only once no process of it can be left
            self._uids.give(self.uid)
            self._uids = None


class FencedWorker(DirectWorker):
    """A worker started by the exec path (setpriv, unshare, fence.py): our child."""

    overhead = 2  # unshare (our child) and the fence, PID 1 of the worker's namespace

    def __init__(self, process, sandbox: Sandbox) -> None:
        super().__init__(process, sandbox.workdir)
        self.sandbox = sandbox
        self.uid = sandbox.uid

    def stage(self, code_path: str) -> str:
        return self.sandbox.stage(code_path)

    async def egress(self) -> ExecEgress | None:
        return await self.sandbox.egress_counts()

    def census(self, runtime: Runtime, cpu: bool) -> Census:
        return self.sandbox.census(runtime, cpu) or super().census(runtime, cpu)

    def kill_processes(self) -> None:
        # Kill unshare's child, the init of the worker's PID namespace, first: the kernel then
        # kills everything in the namespace, and unshare (our child) reaps it, so nothing is
        # left for the host's init to reap. Then the process group, as for any worker.
        try:
            with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        super().kill_processes()

    async def kill(self) -> None:
        await self.sandbox.unmount()
        await super().kill()
        await self.sandbox.release()


class ProcessBackend(Backend):
    isolation = "process"

    def __init__(self, settings, helper: ForkServer | None = None) -> None:
        super().__init__(settings)
        # An unprivileged runner's privileged helper (privsep.py): the fork server, launched
        # before the drop, which does the root part of a worker's life. None: the runner is root.
        self.helper = helper
        # Root works in here (mounts, chown, locks): it must not be a place another user controls.
        # An unprivileged runner owns it (privsep.py hands it over); its helper works in it by name only.
        self.work_root = (owned_dir(work_root(settings.work_dir), 0, "root") if helper is None
                          else owned_dir(work_root(settings.work_dir), os.geteuid(), "the runner"))
        self.uids = UidPool(settings.process.uid_base, settings.process.uids, self.work_root)
        self.tmp_mb = settings.tmp_mb
        self.seccomp = settings.process.seccomp
        self.cgroups = Cgroups(cgroup_name(os.geteuid() if helper is not None else None))
        self.fork_server: ForkServer | None = None
        self.fork_server_problem: str | None = None  # why workers start by the exec path, if they do
        self.resolver = Resolver(settings.egress_nameserver)
        if helper is None:  # else in prepare(): the helper unmounts
            self.remove_leftovers()
        self.cgroups.remove_leftovers(self.uids)

    def remove_leftovers(self) -> None:
        """Unmount and remove worker directories a crashed runner left behind.

        Only those whose uid nobody holds: another runner on this host may share the directory.
        """
        for mountpoint in worker_mounts(self.work_root):
            uid = _worker_uid(mountpoint.name)
            if uid is None or not self.uids.hold(uid):
                continue
            try:
                unmount(mountpoint)
                shutil.rmtree(mountpoint, ignore_errors=True)
            finally:
                self.uids.give(uid)

    async def remove_leftovers_by_helper(self) -> None:
        """remove_leftovers(), for an unprivileged runner: its helper detaches each tmpfs."""
        assert self.helper is not None
        for mountpoint in worker_mounts(self.work_root):
            uid = _worker_uid(mountpoint.name)
            if uid is None or not self.uids.hold(uid):
                continue
            try:
                await self.helper.unmount(mountpoint.name)
                shutil.rmtree(mountpoint, ignore_errors=True)
            finally:
                self.uids.give(uid)

    async def prepare(self) -> None:
        """Start the fork server (unless switched off). If it cannot start, workers start by
        the exec path, slower but fenced the same: said in the log and by `atrund doctor`.
        An unprivileged runner has no exec path: its helper, the fork server, must be there."""
        if self.helper is not None:
            if self.fork_server is None:
                await self.helper.start()
                self.fork_server = self.helper
                await self.remove_leftovers_by_helper()
            return
        if not self.settings.process.fork_server or self.fork_server is not None:
            return
        server = ForkServer(SYSTEM_PYTHON, programs(load_runtimes(self.settings.runtimes_dir).values(), SYSTEM_PYTHON))
        try:
            await server.start()
        except ExecutorError as e:
            self.fork_server_problem = str(e)
            log.warning("the process backend starts workers by the exec path", why=str(e))
            return
        self.fork_server = server

    async def close(self) -> None:
        self.stop_preparing()
        if self.fork_server is not None:
            await self.fork_server.close()

    async def spawn(self, runtime: Runtime, settings, permissions: ExecPermissions) -> Worker:
        check_program(runtime)
        if self.helper is not None and self.helper.gone:  # started as root: an unprivileged runner cannot start another
            raise ExecutorError(f"the privileged helper (the fork server) is gone ({self.helper.gone}): restart the runner")
        if (dead := self.fork_server) is not None and dead.gone:  # one restart, at the ready() below
            log.warning("the fork server is gone; starting it again", why=dead.gone)
            self.fork_server, self._ready = None, None
            await dead.close()  # reaps it
        await self.ready()
        uid = self.uids.take()
        workdir = Path(tempfile.mkdtemp(prefix=f"w{uid}-", dir=self.work_root))
        sandbox = Sandbox(workdir, uid, self.uids, self.cgroups, self.helper)
        try:
            await sandbox.mount(self.tmp_mb)
        except BaseException:
            self.uids.give(uid)
            os.rmdir(workdir)
            raise
        try:
            spec = self.spec(runtime, settings, permissions, sandbox)
            if permissions.net:
                sandbox.egress = Egress(Grants(permissions.net, permissions.net_private), self.resolver, self.helper)
                await sandbox.egress.start()
            if self._forks(runtime):
                return await self.fork(spec, sandbox, settings)
            if self.helper is not None:
                raise ExecutorError(f"the fork server cannot run runtime {runtime.name}'s command, and an unprivileged "
                                    "runner has no exec path")
            return await self.exec(spec, runtime, sandbox, settings)
        except BaseException:
            await sandbox.unmount()
            await sandbox.release()
            raise

    def _forks(self, runtime: Runtime) -> bool:
        server = self.fork_server
        return server is not None and not server.gone and servable(runtime.command, SYSTEM_PYTHON)

    def spec(self, runtime: Runtime, settings, permissions: ExecPermissions, sandbox: Sandbox) -> dict:
        """What fence.py gets: the same on both paths."""
        return {
            "runtime": runtime.name,  # what the privileged helper of an unprivileged runner builds the rest from
            "uid": sandbox.uid,
            "gid": sandbox.uid,
            "workdir": str(sandbox.workdir),
            "read": SYSTEM_READ,
            "grant_read": list(permissions.read),
            "relocate": runtime_paths(runtime),
            "keep": kept_in_run(),
            "write": SYSTEM_WRITE,
            "grant_write": list(permissions.write),
            "ports": ports_for(permissions.net),
            "rlimits": {
                "DATA": data_limit(settings, runtime),
                "CPU": cpu_limit(settings),
                "FSIZE": 64 * 1024 * 1024,
                "NOFILE": 256,
                "NPROC": settings.max_processes,
                "CORE": 0,
            },
            "env": WORKER_ENV,
            "argv": list(runtime.command),
            "syscalls": seccomp_allowlist(runtime, self.seccomp),
            "cgroups": self.cgroups.create(
                sandbox.workdir.name,
                memory_bytes=(settings.memory_mb + runtime.data_overhead_mb + self.tmp_mb) * 1024 * 1024,
                pids=settings.max_processes,
            ),
        }

    async def fork(self, spec: dict, sandbox: Sandbox, settings) -> Worker:
        assert self.fork_server is not None
        theirs, pipes = await connect_pipes(settings.max_output_bytes + 4096)
        netns = [sandbox.egress.netns_fd] if sandbox.egress is not None else []
        try:
            pid, pidfd, exited = await self.fork_server.spawn(spec, bool(netns), theirs + netns)
        except BaseException:
            for transport in pipes[3]:
                transport.close()
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return ForkedWorker(pid, pidfd, exited, pipes, self.fork_server, sandbox)

    async def exec(self, spec: dict, runtime: Runtime, sandbox: Sandbox, settings) -> Worker:
        unshare = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]
        netns = [sandbox.egress.netns_fd] if sandbox.egress is not None else []
        if not netns:
            unshare.append("--net")
        else:  # the fence joins the egress namespace by this descriptor, inherited through unshare
            spec = {**spec, "netns": netns[0]}
        command = [*([SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []), *unshare, "--",
                   SYSTEM_PYTHON, "-I", "-S", str(FENCE), json.dumps(spec)]
        process = await spawn_process(command, runtime.name, sandbox.workdir, settings, pass_fds=netns)
        return FencedWorker(process, sandbox)


def cgroup_name(uid: int | None) -> str:
    """The parent of the workers' cgroups: ``atrund``, or for a runner that runs as its own user
    ``uid``, ``atrund/u{uid}``, which privsep.py makes and hands over to it (the owner of a
    cgroup v1 directory may make and remove children in it, and write their limits)."""
    return "atrund" if uid is None else f"atrund/u{uid}"


def helper_policy(settings, grant_read: list[str], grant_write: list[str], uid: int, gid: int) -> dict:
    """What the privileged helper lets a runner running as ``uid``:``gid`` ask for
    (forkserver.Policy), fixed while it is still root: the paths and commands are decided here,
    never by a request. Called by privsep.py before the drop."""
    runtimes = load_runtimes(settings.runtimes_dir).values()
    return {
        "work_root": os.path.abspath(work_root(settings.work_dir)),
        "uid_base": settings.process.uid_base, "uids": settings.process.uids,
        "share_gid": gid,
        "cgroups": [str(CGROUP_ROOT / c / cgroup_name(uid)) for c in CGROUP_CONTROLLERS],
        "grant_read": grant_read, "grant_write": grant_write,
        "runtimes": {rt.name: {"argv": list(rt.command), "relocate": runtime_paths(rt),
                               "syscalls": seccomp_allowlist(rt, settings.process.seccomp)} for rt in runtimes},
        "fixed": {"read": SYSTEM_READ, "write": SYSTEM_WRITE, "keep": kept_in_run(), "env": WORKER_ENV},
    }


def privileged_helper(settings, forks: bool, grant_read: list[str], grant_write: list[str], uid: int, gid: int) -> ForkServer:
    """The privileged helper of a runner running as ``uid``:``gid`` (not started yet): a fork
    server with helper_policy's policy, which preloads the runtimes if it ``forks`` workers
    (process) and not if it only makes network namespaces (container)."""
    preload = programs(load_runtimes(settings.runtimes_dir).values(), SYSTEM_PYTHON) if forks else []
    return ForkServer(SYSTEM_PYTHON, preload, helper_policy(settings, grant_read, grant_write, uid, gid))


def kept_in_run() -> list[str]:
    """Files the worker's private /run would hide but name resolution needs (systemd-resolved
    makes /etc/resolv.conf a link into /run)."""
    real = os.path.realpath("/etc/resolv.conf")
    return [real] if real.startswith("/run/") and os.path.isfile(real) else []


def seccomp_allowlist(runtime: Runtime, mode: str) -> list[str] | None:
    """The system calls a worker of ``runtime`` may make (fence.py refuses the rest with EPERM),
    or None for the denylist alone: when ``executor.process.seccomp`` says so, or the runtime's
    directory has no ``syscalls`` file."""
    return list(runtime.syscalls) if mode == "allowlist" and runtime.syscalls is not None else None


def seccomp_mode(runtime: Runtime, mode: str) -> str:
    """What `atrund doctor` says of a runtime's filter."""
    if seccomp_allowlist(runtime, mode) is not None:
        return f"allowlist, {len(runtime.syscalls or ())} calls"
    return "denylist" + (" (no syscalls file)" if mode == "allowlist" else "")


def runtime_paths(runtime: Runtime) -> list[str]:
    """The runtime's directory, and the directory of every program its command names that is
    not a system path (system paths are readable in place)."""
    paths = {str(runtime.dir)}
    for word in runtime.command:
        if word.startswith("/") and os.path.exists(word):
            for candidate in (word, os.path.realpath(word)):
                parent = str(Path(candidate).parent)
                if not any(parent == p or parent.startswith(p + "/") for p in SYSTEM_READ):
                    paths.add(parent)
    return sorted(paths)
