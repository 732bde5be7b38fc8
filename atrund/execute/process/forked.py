"""The runner's side of the fork server (forkserver.py): starting it, asking it for workers,
and the worker it makes, which is the fork server's child rather than ours.

One fork server per ProcessBackend, reached over a socketpair (no path on any file system). A
spawn sends the spec (the same as the exec path's) and the worker's ends of three pipes made
here; the answer is the pid of the worker's init (PID 1 of its namespace) with a pidfd on it.
Killing that init kills the whole namespace. Its exit status comes later on the same socket:
the fork server reaps its children. If the fork server dies, its workers die with it
(PR_SET_PDEATHSIG) and every worker still running reports itself lost.

For a runner that runs as its own user (``[runner] user``), the fork server is also its
privileged helper: started before the drop (``launch``) with a policy, it mounts and detaches
worker directories, makes egress namespaces, starts microVM monitors and kills workers and
monitors for the runner (``mount``, ``unmount``, ``netns``, ``monitor``, ``kill``), which can no
longer do any of that itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

from atrund.execute.base import ExecutorError
from atrund.execute.direct import PIPE_GRACE, SAFE_PATH
from atrund.execute.egress import anyip
from atrund.execute.pool import Census, Worker
from atrund.execute.protocol import ExecEgress
from atrund.execute.runtimes import Runtime, load_runtimes

FORKSERVER = Path(__file__).with_name("forkserver.py")
FENCE = Path(__file__).with_name("fence.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # the fence's and the fork server's interpreter (and every at-run-exec's)
START_TIMEOUT = 10.0  # seconds the fork server may take to import and compile what it preloads
REPLY_TIMEOUT = 10.0  # seconds it may take to fork one worker
MAX_MESSAGE = 1 << 16
MAX_FDS = 80  # a namespace, a listener per port (at most 64) and a DNS socket per nameserver (at most 8)


def servable(command: tuple[str, ...] | list[str], python: str) -> bool:
    """Whether the fork server can run this runtime command: ``python -I -S program ...`` with
    the fork server's own interpreter (every runtime's at-run-exec is such a program)."""
    return len(command) >= 4 and command[0] == python and list(command[1:3]) == ["-I", "-S"]


class ForkServer:
    def __init__(self, python: str, programs: list[str], policy: dict | None = None) -> None:
        self.python = python
        self.programs = programs
        self.policy = policy  # what an unprivileged runner may ask for (forkserver.Policy); None: the runner is root
        self.process: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.gone: str | None = None  # why it is not serving any more
        self.lost = asyncio.Event()  # set when it is gone (the runner's watch of its privileged helper)
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future] = {}
        self._calls: set[int] = set()  # request ids of mount, unmount and netns (the rest are spawns)
        self._exits: dict[int, asyncio.Future] = {}
        self.live: dict[int, int] = {}  # pid -> pidfd of every worker not killed yet
        self._ready: asyncio.Future | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def launch(self) -> None:
        """Start the process and send it its settings; ``start`` waits for it to be ready. Apart
        so that an unprivileged runner can launch it while it is still root (privsep.py)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Its program on stdin and its settings on the socket: a worker's /proc/self/cmdline
            # (the fork server's) says nothing more than "python3 -I -S - 3". A clean environment:
            # every worker's /proc/self/environ shows the one this starts with.
            self.process = subprocess.Popen(
                [self.python, "-I", "-S", "-", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                env={"PATH": SAFE_PATH, "LANG": "C.UTF-8"}, cwd="/", start_new_session=True,
            )
            assert self.process.stdin is not None
            with self.process.stdin:
                self.process.stdin.write(FORKSERVER.read_bytes())
            ours.send(json.dumps({"runner": os.getpid(), "fence": str(FENCE), "anyip": anyip.__file__,
                                  "programs": self.programs, "policy": self.policy}).encode())
        except OSError as e:
            ours.close()
            if self.process is not None:
                self.process.kill()
                self.process.wait()
            raise ExecutorError(f"cannot start the fork server: {e.strerror}") from e
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours

    async def start(self) -> None:
        """Launch it (unless launched already) and wait until it is ready."""
        if self.sock is None and self.process is None:
            self.launch()
        if self._ready is not None:  # started already
            return await asyncio.shield(self._ready)
        if self.sock is None:
            raise ExecutorError(f"the fork server is not running: {self.gone or 'not started'}")
        loop = asyncio.get_running_loop()
        ours = self.sock
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except (asyncio.TimeoutError, ExecutorError) as e:
            why = self.gone or f"no answer in {START_TIMEOUT:.0f} s"
            self.stop()
            raise ExecutorError(f"the fork server did not start: {why}") from e
        except asyncio.CancelledError:  # the backend was closed while this started
            self.stop()
            raise

    async def spawn(self, spec: dict, network: bool, fds: list[int]) -> tuple[int, int, asyncio.Future]:
        """A fenced worker on ``fds`` (stdin, stdout, stderr): its init's pid, a pidfd on it, and
        a future of its exit code (None if the fork server died first)."""
        pid, pidfd, exited, _ = await self._ask({"spec": spec, "network": network}, fds, "fork a worker")
        return pid, pidfd, exited

    async def monitor(self, runtime: str, ports: list[int]) -> tuple[int, int, asyncio.Future, list[int]]:
        """A microVM's monitor started by the privileged helper, from the command its policy
        holds for ``runtime`` (microvm/backend.monitor_policy): its init's pid, a pidfd on it, a
        future of its exit code, and two descriptors: the VM's channel and its console."""
        return await self._ask({"monitor": {"runtime": runtime, "ports": ports}}, [], "start a monitor")

    async def call(self, request: dict) -> tuple[dict, list[int]]:
        """One of the helper's requests (mount, unmount, netns): its answer and descriptors."""
        return await self._ask(request, [], "answer", call=True)

    async def _ask(self, request: dict, fds: list[int], doing: str, call: bool = False):
        if self.gone or self.sock is None:
            raise ExecutorError(f"the fork server is not running: {self.gone or 'not started'}")
        rid = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        self._replies[rid] = reply
        if call:
            self._calls.add(rid)
        message = json.dumps({"id": rid, **request}).encode()
        try:
            if fds:
                socket.send_fds(self.sock, [message], fds)
            else:
                self.sock.send(message)
            return await asyncio.wait_for(reply, REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            raise ExecutorError(f"the fork server did not {doing} in {REPLY_TIMEOUT:.0f} s") from None
        except OSError as e:
            raise ExecutorError(f"cannot reach the fork server: {e.strerror}") from e
        finally:
            self._replies.pop(rid, None)
            self._calls.discard(rid)

    async def mount(self, name: str, size_mb: int) -> None:
        """A tmpfs of ``size_mb`` on the worker directory ``name`` (in the policy's work root)."""
        await self.call({"mount": name, "size_mb": size_mb})

    async def unmount(self, name: str) -> None:
        """Detach the worker directory ``name``'s tmpfs (nothing if it is not mounted)."""
        await self.call({"unmount": name})

    async def netns(self, ports: list[int], servers: list[str] | None, container: tuple[str, int] | None = None) -> anyip.Namespace:
        """A worker's egress namespace made by the helper: a new one with DNS sockets on
        ``servers``, or ``container``'s (its id and init's pid; the helper reads its nameservers)."""
        ask: dict = {"ports": ports}
        if container is not None:
            ask.update(container=container[0], pid=container[1])
        else:
            ask["servers"] = servers
        msg, fds = await self.call({"netns": ask})
        listeners, dns = fds[1:1 + msg["listeners"]], fds[1 + msg["listeners"]:]
        return anyip.Namespace(fds[0], [socket.socket(fileno=fd) for fd in listeners], [socket.socket(fileno=fd) for fd in dns])

    def kill(self, pid: int, pidfd: int) -> None:
        """SIGKILL to a worker's init: through its pidfd, or, for a runner that may not signal
        the worker's uid (an unprivileged one), by asking the fork server, its parent."""
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            if self.sock is not None:
                try:
                    self.sock.send(json.dumps({"kill": pid}).encode())
                except OSError:
                    pass  # it is gone: so is the worker (its parent-death signal)

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)  # never inherited by what the runner starts
            except BlockingIOError:
                return
            except OSError as e:
                self._lost(f"its socket failed: {e.strerror}")
                return
            if not data:
                self._lost(self._exit_reason())
                return
            self._dispatch(json.loads(data), fds)

    def _dispatch(self, msg: dict, fds: list[int]) -> None:
        if "exit" in msg:
            if (done := self._exits.pop(msg["exit"], None)) and not done.done():
                done.set_result(msg["code"])
            return
        if msg.get("ready"):
            if self._ready and not self._ready.done():
                self._ready.set_result(None)
            return
        rid = msg.get("id")
        reply = self._replies.get(rid)
        if rid in self._calls:
            if reply is None or reply.done():  # its caller gave up waiting
                for fd in fds:
                    os.close(fd)
            elif "error" in msg:
                reply.set_exception(ExecutorError(f"the fork server (the privileged helper) refused: {msg['error']}"))
            else:
                reply.set_result((msg, fds))
            return
        if reply is None or reply.done():  # its spawn gave up waiting: do not leave the worker running
            if "pid" in msg and fds:
                self.kill(msg["pid"], fds[0])
            for fd in fds:
                os.close(fd)
            return
        if "error" in msg:
            reply.set_exception(ExecutorError(f"the fork server could not start a worker: {msg['error']}"))
            return
        exited = asyncio.get_running_loop().create_future()
        self._exits[msg["pid"]] = exited  # registered now: its exit may be the very next message
        self.live[msg["pid"]] = fds[0]
        reply.set_result((msg["pid"], fds[0], exited, fds[1:]))  # a monitor's channel and console follow its pidfd

    def _exit_reason(self) -> str:
        code = self.process.poll() if self.process else None
        if code is None:
            return "it closed its socket"
        return f"it exited with code {code}" if code >= 0 else f"it was killed by {signal.Signals(-code).name}"

    def _lost(self, why: str) -> None:
        """The fork server is gone: so are its workers (PR_SET_PDEATHSIG). Nothing waits forever."""
        self.gone = why
        self.lost.set()
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        error = ExecutorError(f"the fork server is not running: {why}")
        for future in [*self._replies.values(), *([self._ready] if self._ready else [])]:
            if not future.done():
                future.set_exception(error)
        for future in self._exits.values():
            if not future.done():
                future.set_result(None)
        self._exits.clear()
        for pidfd in self.live.values():  # they die with it anyway (parent-death signal): make sure
            _kill_pidfd(pidfd)

    async def close(self) -> None:
        if self.sock is not None:
            self._lost("the backend is closed")
        if self.process is not None:
            try:  # it exits when its socket closes; its workers die with it
                await asyncio.get_running_loop().run_in_executor(None, self.process.wait, PIPE_GRACE * 4)
            except subprocess.TimeoutExpired:
                self.stop()

    def stop(self) -> None:
        """Stop it now (SIGKILL): its workers die with it."""
        if self.sock is not None:
            self._lost("it was stopped")
        if self.process is not None:
            try:
                self.process.kill()
            except PermissionError:
                pass  # an unprivileged runner's helper is root's: it exits by itself, its socket just closed
            self.process.wait()


async def start_check(settings) -> str | None:
    """Start a fork server and stop it: None if it started, else why not (for `atrund doctor`)."""
    server = ForkServer(SYSTEM_PYTHON, programs(load_runtimes(settings.runtimes_dir).values(), SYSTEM_PYTHON))
    try:
        await server.start()
    except ExecutorError as e:
        return str(e)
    await server.close()
    return None


def programs(runtimes, python: str) -> list[str]:
    """The at-run-exec programs a fork server preloads: those of the runtimes it can serve."""
    return sorted({rt.command[3] for rt in runtimes if servable(rt.command, python)})


def _kill_pidfd(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # PermissionError: an unprivileged runner's worker, which dies with the fork server anyway


class ForkedProcess:
    """The worker's init as a process handle (``pid``, ``returncode``), as callers know a worker's."""

    def __init__(self, pid: int, exited: asyncio.Future) -> None:
        self.pid = pid
        self._exited = exited

    @property
    def returncode(self) -> int | None:
        if not self._exited.done():
            return None
        code = self._exited.result()
        return -signal.SIGKILL if code is None else code  # None: killed with the fork server


class ForkedWorker(Worker):
    """A worker made by the fork server, to the pool exactly what FencedWorker is: the process
    is reached through a pidfd and its exit status through the fork server. ``sandbox`` is what
    it holds on the host (backend.Sandbox: its /tmp, cgroup and uid)."""

    def __init__(self, pid: int, pidfd: int, exited: asyncio.Future, pipes, server: ForkServer, sandbox) -> None:
        self.process = ForkedProcess(pid, exited)
        self._pidfd, self._exited, self._server = pidfd, exited, server
        self.stdin, self.stdout, self.stderr, self._transports = pipes
        self.sandbox = sandbox
        self._killed = False

    overhead = 1  # the init, PID 1 of the worker's namespace (the fork server's child)

    def stage(self, code_path: str) -> str:
        return self.sandbox.stage(code_path)

    async def egress(self) -> ExecEgress | None:
        return await self.sandbox.egress_counts()

    def exited(self) -> int | None:
        return self.process.returncode

    def root_pid(self) -> int | None:
        return self.process.pid

    def census(self, runtime: Runtime, cpu: bool) -> Census:
        return self.sandbox.census(runtime, cpu) or super().census(runtime, cpu)

    def lost(self) -> str | None:
        if self._exited.done() and self._exited.result() is None:
            return f"the fork server is not running ({self._server.gone})"
        return None

    async def wait_exit(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except asyncio.TimeoutError:
            pass

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        await self.sandbox.unmount()  # detached: the tmpfs goes once the namespace's last user is gone
        self._server.kill(self.process.pid, self._pidfd)  # the namespace's init: the kernel kills everything in the namespace
        await self.wait_exit(PIPE_GRACE * 4)
        self._server.live.pop(self.process.pid, None)
        os.close(self._pidfd)
        for transport in self._transports:  # a reader still waiting gets its EOF
            transport.close()
        await self.sandbox.release()


async def connect_pipes(limit: int):
    """Three pipes for a worker: our ends as asyncio streams, and the worker's ends to send."""
    loop = asyncio.get_running_loop()
    made = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
    theirs = [made[0][0], made[1][1], made[2][1]]
    try:
        w_transport, w_protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(made[0][1], "wb", buffering=0))
        stdin = asyncio.StreamWriter(w_transport, w_protocol, None, loop)
        readers, transports = [], [w_transport]
        for fd in (made[1][0], made[2][0]):
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            transport, _ = await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r, loop=loop),
                                                        os.fdopen(fd, "rb", buffering=0))
            readers.append(reader)
            transports.append(transport)
    except BaseException:
        for fd in (*theirs, made[0][1], made[1][0], made[2][0]):
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    return theirs, (stdin, readers[0], readers[1], transports)
