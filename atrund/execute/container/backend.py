"""The ``container`` backend: each worker is an OCI container on a Docker Engine (or Podman's
Docker-compatible API), optionally under gVisor (``executor.container.runtime = "runsc"``).

A worker's life: create the container (hardened, see ``_create_args``), attach to its stdin,
stdout and stderr, start it. at-run-exec is the container's program (under the engine's tiny
init, so a bundle that kills itself is reported the way it died), so a warm worker is a running
container whose at-run-exec has announced it is ready and waits for its request on the
attached stream: a warm invocation costs no ``docker run`` and no ``docker exec``, only the
bytes of the request and the answer. One request per container; the container is removed
after (off the caller's path: the pool tears workers down in the background).

The bundle reaches the container through a directory of the runner's, bind-mounted read-only
at /bundle; the pool copies the verified bundle there after taking a warm worker. Granted read
and write paths are bind-mounted at the same paths (read-only or not); only existing paths.

Every call into the Docker SDK (which blocks) runs on a thread, and every exception it raises
becomes an ExecutorError in one place: ``Engine.call``.

Containers carry labels naming the runner process that made them; on start-up the backend
removes those whose runner is gone (a crashed runner's leftovers) and leaves a live runner's
alone, so two runners can share an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import struct
from pathlib import Path

import structlog

from atrund.execute.base import ExecutorError
from atrund.execute.container.seccomp import profile as seccomp_profile
from atrund.execute.egress.dns import Resolver
from atrund.execute.egress.policy import Grants
from atrund.execute.egress.proxy import Egress
from atrund.execute.pool import Backend, Worker, cpu_limit, feed_stderr
from atrund.execute.protocol import ExecEgress, ExecPermissions
from atrund.execute.runtimes import Runtime, expand
from atrund.execute.workdir import OWNER, alive, owned_dir, work_root

log = structlog.get_logger("atrund.execute")

LABEL_WORKER = "dev.atrun.worker"  # value: the runtime's name
LABEL_OWNER = "dev.atrun.owner"  # value: "<pid>:<start time>" of the runner process
BUNDLE_DIR_IN_CONTAINER = "/bundle"
# Under gVisor the container's pids limit also counts the sandbox's own threads (its kernel,
# and on the ptrace platform one host thread per bundle thread): node and deno do not start
# under gVisor below about 96. Measured here; the bundle's share stays max_processes.
RUNSC_PIDS_OVERHEAD = 128
STATUS_TIMEOUT = 5  # seconds to learn how a container ended (exit code, OOM) after its stream closed
REMOVE_TIMEOUT = 30  # seconds a remove may take before we give up on it (the sweep retries later)


def _close_socket_on_failed_connect() -> None:
    """docker 7's UnixHTTPConnection.connect() leaves its new socket open when connect() fails,
    which it does on every call while the engine is down: a runner retrying then leaks a
    descriptor per attempt until the garbage collector finds it. Close it instead."""
    import socket

    from docker.transport import unixconn

    if getattr(unixconn.UnixHTTPConnection.connect, "_atrund", False):
        return

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_socket)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    connect._atrund = True
    unixconn.UnixHTTPConnection.connect = connect


class Engine:
    """The Docker SDK behind one seam: every call runs on a thread, every failure is an ExecutorError."""

    def __init__(self, url: str | None) -> None:
        self.url = url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.client = None
        _close_socket_on_failed_connect()

    async def connect(self):
        import docker

        # version="auto" asks the engine which API version it speaks (Debian's 20.10 is older
        # than the SDK's default, Podman's differs again).
        client = await self.call("connect", docker.DockerClient, base_url=self.url, version="auto", timeout=60)
        self.close()  # a client of an earlier, failed attempt
        self.client = client
        return client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    async def call(self, what: str, fn, *args, **kwargs):
        import docker.errors
        import requests.exceptions

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.ImageNotFound as e:
            raise ExecutorError(f"the container engine has no such image ({what}): {e.explanation}; build it with `atrund image build`") from e
        except docker.errors.APIError as e:
            raise ExecutorError(f"the container engine refused to {what}: {e.explanation or e}") from e
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as e:
            raise ExecutorError(f"the container engine at {self.url} did not answer ({what}): {e}") from e

    async def remove(self, container_id: str) -> None:
        """Kill and remove a container; one already gone is fine."""
        import docker.errors

        def remove():
            try:
                self.client.api.remove_container(container_id, force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code != 409 or "already in progress" not in str(e):  # another remove got there first
                    raise

        try:
            await asyncio.wait_for(self.call(f"remove container {container_id[:12]}", remove), REMOVE_TIMEOUT)
        except asyncio.TimeoutError:
            raise ExecutorError(f"the container engine did not remove container {container_id[:12]} within {REMOVE_TIMEOUT} s") from None


class _Stdin:
    """The container's stdin on the attached socket. close() half-closes it (the container sees
    end-of-file) while its output keeps coming on the same socket."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self._writer.can_write_eof():
                self._writer.write_eof()


class ContainerWorker(Worker):
    overhead = 1  # the engine's init (init=True), PID 1 of the container

    def __init__(self, backend: "ContainerBackend", container_id: str, bundle_dir: Path, sock, limit: int) -> None:
        self.backend = backend
        self.id = container_id
        self.bundle_dir = bundle_dir
        self._sock = sock  # keeps the SDK's hijacked HTTP response (and its socket) alive
        self.stdout = asyncio.StreamReader(limit=limit)
        self.stderr = asyncio.StreamReader()
        self.stdin: _Stdin | None = None
        self._exit: int | None = None
        self._lost: str | None = None
        self._oom = False
        self._ended = asyncio.Event()
        self._status: asyncio.Task | None = None
        self._pump: asyncio.Task | None = None
        self._killed = False
        self._pid: int | None = None  # the container's init, as this host sees it (see root_pid)
        self.proxy: Egress | None = None  # granted network: the runner's proxy is its only way out

    async def attach(self) -> None:
        raw = getattr(self._sock, "_sock", self._sock)  # the socket under the SDK's SocketIO
        raw.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=raw)
        self._writer = writer
        self.stdin = _Stdin(writer)
        self._pump = asyncio.ensure_future(self._demux(reader))

    async def _demux(self, reader: asyncio.StreamReader) -> None:
        """Split the engine's multiplexed stream (8-byte header: stream, 0, 0, 0, length) into
        stdout and stderr. Past the tail the pool keeps, stderr is dropped here rather than buffered."""
        try:
            while True:
                header = await reader.readexactly(8)
                kind, size = header[0], struct.unpack(">I", header[4:])[0]
                payload = await reader.readexactly(size)
                if kind == 1:
                    self.stdout.feed_data(payload)
                elif kind == 2:
                    feed_stderr(self.stderr, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.stdout.feed_eof()
            self.stderr.feed_eof()
            self._ended.set()
            if not self._killed:
                self._status = asyncio.ensure_future(self._read_status())

    async def _read_status(self) -> None:
        """Why the stream ended: the container's exit code, or the engine being gone."""
        try:
            result = await asyncio.wait_for(
                self.backend.engine.call("read a container's exit status", self.backend.engine.client.api.wait, self.id, timeout=10),
                12,
            )
            self._exit = int(result.get("StatusCode", -1))
            state = (await self.backend.engine.call("inspect a container", self.backend.engine.client.api.inspect_container, self.id))["State"]
            # Under gVisor RLIMIT_DATA is not enforced: a runaway allocation meets the cgroup's OOM killer.
            self._oom = bool(state.get("OOMKilled"))
        except (ExecutorError, asyncio.TimeoutError) as e:
            self._lost = str(e) if isinstance(e, ExecutorError) else "the container engine did not report the container's exit"

    def stage(self, code_path: str) -> str:
        """Copy the verified bundle into the worker's read-only bundle directory."""
        name = "bundle" + Path(code_path).suffix
        shutil.copyfile(code_path, self.bundle_dir / name)
        os.chmod(self.bundle_dir / name, 0o444)
        return f"{BUNDLE_DIR_IN_CONTAINER}/{name}"

    async def find_pid(self) -> None:
        """Where the runner can see the container's processes (a local engine, not gVisor, whose
        sandbox hides them): its init's pid here, so reuse can check what a request left behind
        and what CPU it spent. Otherwise the worker serves one request only."""
        if self.backend.settings.container.runtime == "runsc":
            return
        state = (await self.backend.engine.call("inspect a container", self.backend.engine.client.api.inspect_container, self.id))["State"]
        pid = int(state.get("Pid") or 0)
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                if pid > 0 and self.id in f.read():
                    self._pid = pid
        except OSError:
            pass  # an engine on another host, or in another PID namespace

    def root_pid(self) -> int | None:
        return self._pid

    async def open_egress(self, grants: Grants, resolver: Resolver) -> None:
        """Give the container (started with ``--network none``: loopback only) the egress path a
        process worker has: its network namespace, set up from here, whose only way out is the
        runner's proxy. Needs the engine on this host, as the bind mounts do. An unprivileged
        runner cannot enter the container's namespace: its privileged helper sets it up, told
        only the container's id and its init's pid, which it checks (forkserver.container_netns)."""
        state = (await self.backend.engine.call("inspect a container", self.backend.engine.client.api.inspect_container, self.id))["State"]
        pid = int(state.get("Pid") or 0)
        if self.backend.helper is not None:
            self.proxy = Egress(grants, resolver, self.backend.helper)
            await self.proxy.start(container=(self.id, pid))
            return
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ExecutorError(f"cannot reach the container's network namespace (is the engine on this host?): {e.strerror}") from e
        try:
            self.proxy = Egress(grants, resolver)
            await self.proxy.start(existing=fd, resolv_conf=f"/proc/{pid}/root/etc/resolv.conf")
        finally:
            os.close(fd)

    async def egress(self) -> ExecEgress | None:
        if self.proxy is None:
            return None
        await self.proxy.settled()
        return self.proxy.counts.snapshot()

    def exited(self) -> int | None:
        if self._exit is not None:
            return self._exit
        # The stream ended but the exit code is not in yet (or never will be): gone all the same.
        return 255 if self._ended.is_set() else None

    def out_of_memory(self) -> bool:
        return self._oom

    def lost(self) -> str | None:
        """Set when the worker ended because the engine, not the program, went away."""
        return self._lost

    async def wait_exit(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)
            if self._status is not None:
                # Asking the engine how it ended is a round trip or two, slower than a process
                # wait on a busy host: give it longer than the pool's grace, or the crash would be
                # described as a bare exit code.
                await asyncio.wait_for(asyncio.shield(self._status), max(timeout, STATUS_TIMEOUT))

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        try:
            await self.backend.engine.remove(self.id)
        except ExecutorError as e:
            self.backend.unremoved.add(self.id)  # retried before the next container starts
            log.warning("could not remove a container worker", container=self.id[:12], error=str(e))
        finally:
            if self._pump is not None:
                self._pump.cancel()
            self._close_stream()
            shutil.rmtree(self.bundle_dir, ignore_errors=True)
            if self.proxy is not None:
                await self.proxy.close()

    def _close_stream(self) -> None:
        # Closed now, not when asyncio gets round to it: the loop may be gone by then.
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.close()
        for sock in (getattr(self._sock, "_sock", None), self._sock):
            with contextlib.suppress(OSError, AttributeError):
                sock.close()


class ContainerBackend(Backend):
    isolation = "container"

    def __init__(self, settings, helper=None) -> None:
        super().__init__(settings)
        # An unprivileged runner's privileged helper (process/forked.ForkServer, privsep.py): it
        # sets up the network namespace of a container granted network. None: the runner is root.
        self.helper = helper
        self.engine = Engine(settings.container.docker_host)
        self.work_root = owned_dir(work_root(settings.work_dir) / "containers", os.geteuid(), "the runner")
        self.unremoved: set[str] = set()
        self.resolver = Resolver(settings.egress_nameserver)

    async def prepare(self) -> None:
        """Once per backend: the engine answers, has the image, knows the runtime; leftovers go."""
        from atrund.execute.container import image

        if self.helper is not None:
            await self.helper.start()
        client = await self.engine.connect()
        labels = await self.engine.call(f"find image {self.settings.container.image}", image.describe, client, self.settings.container.image)
        if labels is None:
            raise ExecutorError(f"the container engine has no image {self.settings.container.image}: build it with `atrund image build`")
        want = image.runtimes_hash(self.settings.runtimes_dir)
        if labels.get(image.LABEL_RUNTIMES) != want:
            raise ExecutorError(
                f"image {self.settings.container.image} holds other at-run-exec programs than {self.settings.runtimes_dir}: "
                "rebuild it with `atrund image build`"
            )
        if self.settings.container.runtime != "runc":
            info = await self.engine.call("describe itself", client.api.info)
            if self.settings.container.runtime not in (info.get("Runtimes") or {}):
                raise ExecutorError(
                    f"the container engine has no runtime {self.settings.container.runtime!r} (it has: {', '.join(info.get('Runtimes') or {})}); "
                    "register it in /etc/docker/daemon.json, see README"
                )
        await self.sweep()

    async def sweep(self) -> None:
        """Remove containers of runner processes that are gone (crashed, killed), and their directories."""
        client = self.engine.client
        found = await self.engine.call("list containers", client.api.containers, all=True, filters={"label": LABEL_OWNER})
        left = [c["Id"] for c in found if not alive(c["Labels"].get(LABEL_OWNER, ""))]
        left += [cid for cid in self.unremoved if cid not in left]
        for cid in left:
            await self.engine.remove(cid)
            self.unremoved.discard(cid)
        if left:
            log.info("removed container workers a stopped runner left behind", count=len(left))
        for d in self.work_root.iterdir():
            owner = d.name.split("-", 2)
            if len(owner) == 3 and not alive(owner[1].replace("_", ":")):
                shutil.rmtree(d, ignore_errors=True)

    def _seccomp(self, runtime: Runtime) -> list[str]:
        """The seccomp option of ``runtime``'s containers: the process backend's allowlist as a
        profile (seccomp.py), unless executor.container.seccomp is "engine" or the runtime has no
        syscalls file (then the engine's default profile)."""
        if self.settings.container.seccomp != "allowlist" or runtime.syscalls is None:
            return []
        return [f"seccomp={seccomp_profile(runtime.syscalls)}"]

    def _create_args(self, runtime: Runtime, permissions: ExecPermissions, name: str, bundle_dir: Path) -> dict:
        from docker.types import Mount, Ulimit

        from atrund.execute.container import image

        s = self.settings
        in_image = {"{python}": image.PYTHON_IN_IMAGE, "{dir}": f"{image.RUNTIMES_IN_IMAGE}/{runtime.dir.name}"}
        if runtime.program is not None:
            in_image[runtime.program.placeholder] = runtime.program.in_image
        command = expand(runtime.template, in_image)
        memory = (s.memory_mb + runtime.data_overhead_mb + s.tmp_mb) << 20
        data = (s.memory_mb + runtime.data_overhead_mb) << 20
        mounts = [Mount(BUNDLE_DIR_IN_CONTAINER, str(bundle_dir), type="bind", read_only=True)]
        grants = {p: True for p in permissions.read} | {p: False for p in permissions.write}  # write wins
        for path, read_only in grants.items():
            if os.path.exists(path):  # a grant of a path the host does not have gives nothing
                mounts.append(Mount(path, path, type="bind", read_only=read_only))
        host_config = self.engine.client.api.create_host_config(
            network_mode="none",  # with a net grant, open_egress gives it a way out: the runner's proxy
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={s.tmp_mb}m,mode=1777"},
            mounts=mounts,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges", *self._seccomp(runtime)],
            mem_limit=memory,
            memswap_limit=memory,  # no escape into swap
            nano_cpus=int(s.container.cpus * 1e9),
            pids_limit=s.max_processes + (RUNSC_PIDS_OVERHEAD if s.container.runtime == "runsc" else 0),
            ulimits=[
                # As for the other backends: a runaway allocation is a MemoryError, not an OOM kill.
                Ulimit(name="data", soft=data, hard=data),
                Ulimit(name="cpu", soft=cpu_limit(s), hard=cpu_limit(s)),
                Ulimit(name="fsize", soft=64 << 20, hard=64 << 20),
                Ulimit(name="nofile", soft=256, hard=256),
                Ulimit(name="core", soft=0, hard=0),
            ],
            init=True,  # a bundle's SIGKILL to itself is reported as such; orphans are reaped
            runtime=s.container.runtime,
            log_config={"type": "none"},  # the attached stream is the only copy of the output
            ipc_mode="private",
        )
        return dict(
            image=s.container.image,
            command=list(command),
            name=name,
            user=f"{s.container.uid}:{s.container.uid}",
            environment={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"},
            working_dir="/tmp",
            labels={LABEL_WORKER: runtime.name, LABEL_OWNER: OWNER or ""},
            stdin_open=True,  # with detach=False the SDK also sets StdinOnce: stdin ends when we half-close
            tty=False,
            network_disabled=not permissions.net,
            host_config=host_config,
        )

    async def spawn(self, runtime: Runtime, settings, permissions: ExecPermissions) -> Worker:
        await self.ready()
        if self.unremoved:
            await self.sweep()
        if permissions.net and settings.container.runtime == "runsc":
            raise ExecutorError("network grants are not available with runtime runsc here (gVisor runs with --network=none)")
        name = f"atrund-{(OWNER or '0').replace(':', '_')}-{runtime.name}-{secrets.token_hex(4)}"
        bundle_dir = self.work_root / name
        bundle_dir.mkdir(mode=0o755)
        api = self.engine.client.api
        container_id = worker = None
        try:
            created = await self.engine.call("create a container", api.create_container, **self._create_args(runtime, permissions, name, bundle_dir))
            container_id = created["Id"]
            # Attach before start, as `docker run` does: nothing the worker prints is missed.
            sock = await self.engine.call("attach to a container", api.attach_socket, container_id,
                                          params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            worker = ContainerWorker(self, container_id, bundle_dir, sock, settings.max_output_bytes + 4096)
            await worker.attach()
            await self.engine.call("start a container", api.start, container_id)
            if permissions.net:  # before the pool sends a request: no bundle code runs before this
                await worker.open_egress(Grants(permissions.net, permissions.net_private), self.resolver)
            if settings.reuse == "bundle":
                await worker.find_pid()
            return worker
        except BaseException:
            if worker is not None:
                await worker.kill()  # removes the container, closes the stream
            elif container_id is not None:
                with contextlib.suppress(ExecutorError):
                    await self.engine.remove(container_id)
            shutil.rmtree(bundle_dir, ignore_errors=True)
            raise

    async def close(self) -> None:
        self.stop_preparing()
        if self.unremoved and self.engine.client is not None:
            with contextlib.suppress(ExecutorError):
                await self.sweep()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.engine.close)
        if self.helper is not None:
            await self.helper.close()


__all__ = ["ContainerBackend", "Engine"]
