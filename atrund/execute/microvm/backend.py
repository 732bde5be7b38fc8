"""The ``microvm`` backend (formerly ``firecracker``, still accepted as an alias): one microVM
per worker, under QEMU ``-M microvm`` or Firecracker.

A worker's life: the runner listens on a Unix socket in the VM's own directory, starts the
monitor (qemu.py or firecracker.py, behind vm.Monitor), which connects that socket to
the guest's protocol channel (a virtio-serial port under QEMU; vsock under Firecracker, which
forwards the guest's connection to ``<uds>_<port>``). The guest kernel boots, atrun-init
(atrund/execute/microvm/guest_init.py) starts the runtime's at-run-exec and relays its stdin, stdout and stderr in
frames; the worker turns those frames back into the three streams the pool reads. Warm means
booted and waiting: at-run-exec has said it is ready. The pool then sends the bundle (a frame
the guest writes to /bundle) and the request; the answer ends the VM's use, and the VM is
killed (never reused, never resumed from a snapshot: that would clone its secrets and random
state into the next invocation).

What the guest is given: the kernel and initramfs, rootfs.ext4 opened READ-ONLY (so no disk copy
per VM and nothing persists between VMs; the guest writes only to its tmpfs), memory (the
bundle's memory_mb plus the runtime's reserve, /tmp and the guest's own overhead), vCPUs, an
entropy device, and NO network device. A network grant is served through the VM's channel:
atrun-init relays the connections the bundle makes to the runner's egress proxy (relay.py).
Read and write grants of host paths give nothing: the host's files are not in the VM at all.

Each VM lives in ``<work_dir>/vms/vm-<runner pid>_<start time>-<runtime>-<random>/`` (channel
socket, the monitor's pid, Firecracker's API socket). On start-up the backend kills the
monitors of runners that are gone and removes their directories; shutdown kills its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import structlog

from atrund.execute.base import ExecutorError
from atrund.execute.egress.dns import Resolver
from atrund.execute.egress.policy import Grants
from atrund.execute.egress.proxy import Egress
from atrund.execute.microvm import helped
from atrund.execute.microvm.firecracker import Firecracker
from atrund.execute.microvm.qemu import TCG_KERNEL_ARGS, Qemu, accelerator, qemu_version
from atrund.execute.microvm.relay import KINDS, Relay
from atrund.execute.microvm.vm import Monitor, VmSpec
from atrund.execute.pool import Backend, Census, Worker, feed_stderr
from atrund.execute.protocol import ExecEgress, ExecPermissions
from atrund.execute.runtimes import Runtime
from atrund.execute.workdir import OWNER, alive, owned_dir, work_root

log = structlog.get_logger("atrund.execute")

HEADER = struct.Struct(">cI")  # the frame header of atrund/execute/microvm/guest_init.py
PID_FILE = "monitor.pid"
CONSOLE_TAIL = 8192  # bytes of the guest console kept for error messages
CONNECT_TIMEOUT = 10.0  # seconds the monitor may take to connect the channel socket
KERNEL_ARGS = "console=ttyS0 quiet panic=-1"


class VmStdin:
    """at-run-exec's stdin, in frames; the bundle the pool staged goes first."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.bundle: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.bundle is not None:
            self._writer.write(HEADER.pack(b"B", len(self.bundle)) + self.bundle)
            self.bundle = None
        self._writer.write(HEADER.pack(b"I", len(data)) + data)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        # Only at-run-exec's stdin ends: the socket stays open for its answer.
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.write(HEADER.pack(b"C", 0))


class VmWorker(Worker):
    def __init__(self, backend: "MicroVmBackend", vm_dir: Path, process: "asyncio.subprocess.Process | helped.HelpedMonitor", limit: int,
                 egress: Egress | None = None) -> None:
        self.backend = backend
        self.egress_proxy = egress  # a worker granted network: the proxy its guest's streams go to
        self.relay: Relay | None = None
        self.dir = vm_dir
        self.process = process
        self.stdout = asyncio.StreamReader(limit=limit)
        self.stderr = asyncio.StreamReader()
        self.stdin: VmStdin | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._exit: int | None = None
        self._oom = 0
        self._ended = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.console = bytearray()
        self._killed = False
        self._left = ""  # what atrun-init found running after the last answer (an L frame)
        self._tasks.append(asyncio.ensure_future(self._read_console()))

    async def _read_console(self) -> None:
        """The guest's serial console (kernel messages, init's complaints), kept for error messages."""
        assert self.process.stdout
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await self.process.stdout.read(4096):
                self.console += chunk
                del self.console[:-CONSOLE_TAIL]

    def diagnostics(self) -> str:
        tail = self.console_tail()
        return f"the guest console said:\n{tail}" if tail else "the guest console was silent"

    def console_tail(self, lines: int = 12) -> str:
        text = self.console.decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.strip().splitlines()[-lines:])

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.stdin = VmStdin(writer)
        if self.egress_proxy is not None:
            self.relay = Relay(self.egress_proxy, writer)
        self._tasks.append(asyncio.ensure_future(self._demux(reader)))

    async def _demux(self, reader: asyncio.StreamReader) -> None:
        """Frames from atrun-init into stdout and stderr; the exit status and OOM count kept.
        Past the tail the pool keeps, stderr is dropped here rather than buffered."""
        try:
            while True:
                kind, size = HEADER.unpack(await reader.readexactly(HEADER.size))
                payload = await reader.readexactly(size)
                if kind == b"O":
                    self.stdout.feed_data(payload)
                elif kind == b"E":
                    feed_stderr(self.stderr, payload)
                elif kind == b"L":
                    self._left = payload.decode("utf-8", "replace")[:200]
                elif kind == b"M":
                    self._oom = int(payload or b"0")
                elif kind == b"X":
                    self._exit = int(payload)
                elif kind in KINDS and self.relay is not None:
                    self.relay.frame(kind, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
            pass
        finally:
            self.stdout.feed_eof()
            self.stderr.feed_eof()
            self._ended.set()

    def stage(self, code_path: str) -> str:
        """The verified bundle travels in the first frame after boot; the guest writes it to /bundle."""
        name = "bundle" + Path(code_path).suffix
        with open(code_path, "rb") as f:
            content = f.read()
        assert self.stdin is not None
        self.stdin.bundle = name.encode() + b"\0" + content
        return f"/bundle/{name}"

    def exited(self) -> int | None:
        if self._exit is not None:
            return self._exit
        if self._ended.is_set() or self.process.returncode is not None:
            return 255  # the channel or the VM ended without atrun-init reporting: gone all the same
        return None

    def out_of_memory(self) -> bool:
        return self._oom > 0

    async def egress(self) -> ExecEgress | None:
        if self.egress_proxy is None:
            return None
        await self.egress_proxy.settled()
        return self.egress_proxy.counts.snapshot()

    def census(self, runtime, cpu: bool) -> Census:
        """atrun-init, the guest's PID 1, looks at what runs when an answer line ends (the runner
        cannot see into the VM). No per-process CPU limit in the guest: the VM's vCPUs and the
        deadline bound it; the VM's memory is its own limit."""
        return Census(left=self._left or None, cpu=0.0, memory=None)

    def lost(self) -> str | None:
        """The monitor failed (not the guest powering off after its program ended)."""
        code = self.process.returncode
        if self._exit is None and code not in (None, 0):
            return f"the {self.backend.monitor.name} monitor exited with code {code}: {self.console_tail(4)}"
        return None

    async def wait_exit(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.process.wait(), 10)
        if isinstance(self.process, helped.HelpedMonitor):
            self.process.release()
        for task in self._tasks:
            task.cancel()
        # Ended for whoever reads them, even if the demultiplexer never got to run.
        self.stdout.feed_eof()
        self.stderr.feed_eof()
        self._ended.set()
        if self._writer is not None:
            self._writer.close()
        if self.relay is not None:
            await self.relay.close()
        elif self.egress_proxy is not None:
            await self.egress_proxy.close()
        await self.backend.monitor_gone(self.dir)
        self.backend.live.discard(self)


@dataclass(frozen=True)
class HostSupport:
    """What doctor and auto report: which monitor and accelerator, or why there is none."""

    monitor: str | None
    accelerator: str | None
    detail: str


def guest_missing(settings) -> str | None:
    for key in ("kernel", "initramfs", "rootfs"):
        path = getattr(settings.microvm, key)
        if path is not None and not os.path.exists(path):
            return f"executor.microvm.{key} {path} does not exist (build it: atrund image build --vm)"
    return None


def monitor_name(settings) -> str:
    if settings.microvm.monitor != "auto":
        return settings.microvm.monitor
    return "firecracker" if shutil.which(settings.microvm.firecracker_binary) and os.path.exists("/dev/kvm") else "qemu"


def host_support(settings) -> HostSupport:
    """Which monitor and accelerator this host offers (booting a KVM guest to find out)."""
    name = monitor_name(settings)
    if name == "firecracker":
        found = shutil.which(settings.microvm.firecracker_binary)
        if not found:
            return HostSupport(None, None, f"no firecracker binary ({settings.microvm.firecracker_binary})")
        return HostSupport("firecracker", "kvm", f"firecracker at {found}")
    found = shutil.which(settings.microvm.qemu_binary)
    if not found:
        return HostSupport(None, None, f"{settings.microvm.qemu_binary} is not installed (Debian: apt-get install qemu-system-x86)")
    version = qemu_version(found)
    if missing := guest_missing(settings):
        return HostSupport("qemu", None, f"QEMU {version}; {missing}")
    accel, why = accelerator(settings)
    return HostSupport("qemu", accel, f"QEMU {version} at {found}, accelerator {accel} ({why})")


class MicroVmBackend(Backend):
    isolation = "microvm"

    def __init__(self, settings, helper=None) -> None:
        super().__init__(settings)
        # An unprivileged runner's privileged helper (privsep.py), which starts every monitor
        # from the command its policy holds (helped.py); None: the runner starts them itself.
        self.helper = helper
        self.work_root = owned_dir(work_root(settings.work_dir) / "vms", os.geteuid(), "the runner")
        self.ready_timeout = settings.microvm.boot_timeout
        self.monitor_name = monitor_name(settings)  # chosen now (cheap), so the runner record can state it
        self.monitor: Monitor | None = None
        # Every VM this backend started and has not killed yet, booting ones included: close()
        # kills them, so a shutdown during a warm-up leaves no monitor running.
        self.live: set[VmWorker] = set()
        self.closed = False
        self.resolver = Resolver(settings.egress_nameserver)

    async def prepare(self) -> None:
        """Once per backend: the guest files exist and match our runtimes, a monitor is chosen,
        and what a crashed runner left behind is gone."""
        from atrund.execute.container import image
        from atrund.execute.microvm import guest as vmimage

        s = self.settings
        if missing := guest_missing(s):
            raise ExecutorError(missing)
        built_with = vmimage.runtimes_of(s.microvm.rootfs)
        if built_with is not None and built_with != image.runtimes_hash(s.runtimes_dir):
            raise ExecutorError(f"{s.microvm.rootfs} holds other at-run-exec programs than {s.runtimes_dir}: "
                                "rebuild it with `atrund image build --vm`")
        if self.helper is not None:
            accel, why = await asyncio.to_thread(accelerator, s)  # probed as root before the drop (privsep.py)
            log.info("microVM monitor", monitor="qemu", accelerator=accel, why=why, started_by="the privileged helper")
            self.monitor = Qemu(s.microvm.qemu_binary, accel, helped.CHANNEL_FD)
            await self.helper.start()
        elif self.monitor_name == "firecracker":
            self.monitor = Firecracker(s)
        else:
            if not shutil.which(s.microvm.qemu_binary):
                raise ExecutorError(f"{s.microvm.qemu_binary} is not installed (Debian: apt-get install qemu-system-x86)")
            accel, why = await asyncio.to_thread(accelerator, s)
            log.info("microVM monitor", monitor="qemu", accelerator=accel, why=why)
            self.monitor = Qemu(s.microvm.qemu_binary, accel)
        await asyncio.to_thread(self.sweep)

    def sweep(self) -> None:
        """Kill the monitors of runner processes that are gone and remove their VM directories."""
        removed = 0
        for d in self.work_root.iterdir():
            parts = d.name.split("-", 3)
            if len(parts) < 3 or parts[0] != "vm" or alive(parts[1].replace("_", ":")):
                continue
            kill_monitor(d)
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
        if removed:
            log.info("removed microVMs a stopped runner left behind", count=removed)

    def _cmdline(self, runtime: Runtime, ports: list[int] = ()) -> str:
        return kernel_cmdline(self.settings, runtime, getattr(self.monitor, "accelerator", "kvm"),
                              self.monitor.vsock_port, ports)

    async def spawn(self, runtime: Runtime, settings, permissions: ExecPermissions) -> Worker:
        await self.ready()
        if self.closed:
            raise ExecutorError("the microVM backend is shut down")
        vm_dir = self.work_root / f"vm-{(OWNER or '0').replace(':', '_')}-{runtime.name}-{secrets.token_hex(4)}"
        vm_dir.mkdir(mode=0o700)
        if self.helper is not None:
            return await self._spawn_helped(runtime, settings, permissions, vm_dir)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = None
        try:
            path = self.monitor.channel_path(vm_dir)
            try:
                listener.bind(str(path))
            except OSError as e:
                raise ExecutorError(f"cannot listen on {path}: {e.strerror or e} (a Unix socket path has at most 107 bytes: "
                                    "choose a shorter executor.work_dir)") from e
            listener.listen(1)
            listener.setblocking(False)
            grants = Grants(permissions.net, permissions.net_private) if permissions.net else None
            spec = VmSpec(vm_dir, settings.microvm.kernel, settings.microvm.initramfs, settings.microvm.rootfs,
                          memory_mb(self.settings, runtime), settings.microvm.vcpus,
                          self._cmdline(runtime, grants.ports if grants else []))
            process = await self.monitor.launch(spec)
            (vm_dir / PID_FILE).write_text(str(process.pid))
            worker = VmWorker(self, vm_dir, process, settings.max_output_bytes + 4096,
                              Egress(grants, self.resolver) if grants else None)
            self.live.add(worker)
            # The monitor connects the channel as it starts (QEMU) or when the guest dials (Firecracker).
            accept = asyncio.ensure_future(asyncio.get_running_loop().sock_accept(listener))
            exited = asyncio.ensure_future(process.wait())
            done, _ = await asyncio.wait({accept, exited}, timeout=CONNECT_TIMEOUT if self.monitor.vsock_port is None
                                         else settings.microvm.boot_timeout, return_when=asyncio.FIRST_COMPLETED)
            exited.cancel()
            if accept not in done:
                accept.cancel()
                await asyncio.sleep(0.1)  # its last words on the console
                raise ExecutorError(f"the {self.monitor.name} monitor did not connect the VM's channel: "
                                    f"{worker.console_tail(6) or 'no output'}")
            conn, _ = accept.result()
            return self._attached(worker, *await asyncio.open_connection(sock=conn, limit=1 << 20))
        except BaseException:
            await self._abandon(worker, vm_dir)
            raise
        finally:
            listener.close()

    async def _spawn_helped(self, runtime: Runtime, settings, permissions: ExecPermissions, vm_dir: Path) -> Worker:
        """spawn(), for an unprivileged runner: the privileged helper starts the monitor from
        its policy's command for ``runtime`` and hands over the VM's channel, already connected,
        and its console. The request names only the runtime and a network grant's ports."""
        grants = Grants(permissions.net, permissions.net_private) if permissions.net else None
        worker = None
        try:
            pid, pidfd, exited, (channel, console) = await self.helper.monitor(runtime.name, grants.ports if grants else [])
            process = helped.HelpedMonitor(self.helper, pid, pidfd, exited, console)
            worker = VmWorker(self, vm_dir, process, settings.max_output_bytes + 4096,
                              Egress(grants, self.resolver) if grants else None)
            self.live.add(worker)
            await process.connect()
            return self._attached(worker, *await asyncio.open_connection(sock=socket.socket(fileno=channel), limit=1 << 20))
        except BaseException:
            await self._abandon(worker, vm_dir)
            raise

    def _attached(self, worker: VmWorker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> VmWorker:
        """The worker, its channel connected."""
        worker.attach(reader, writer)
        if self.closed:  # shut down while this one started
            raise ExecutorError("the microVM backend is shut down")
        return worker

    async def _abandon(self, worker: VmWorker | None, vm_dir: Path) -> None:
        """A spawn that failed leaves nothing: its VM killed, or its directory removed."""
        if worker is not None:
            await worker.kill()
        else:
            await self.monitor_gone(vm_dir)

    async def monitor_gone(self, vm_dir: Path) -> None:
        """A VM's directory goes once its monitor is dead (nothing of it stays behind)."""
        await asyncio.to_thread(kill_monitor, vm_dir)
        shutil.rmtree(vm_dir, ignore_errors=True)

    async def close(self) -> None:
        self.closed = True
        self.stop_preparing()
        await asyncio.gather(*(w.kill() for w in list(self.live)), return_exceptions=True)
        if self.helper is not None:
            await self.helper.close()


def memory_mb(settings, runtime: Runtime) -> int:
    """A VM's memory: the bundle's, the runtime's reserve, its /tmp and the guest's own."""
    return settings.memory_mb + runtime.data_overhead_mb + settings.tmp_mb + settings.microvm.overhead_mb


def kernel_cmdline(settings, runtime: Runtime, accel: str, vsock_port: int | None, ports: list[int] = ()) -> str:
    """The guest kernel's command line: what atrun-init reads (runtime, limits, the vsock port
    and a network grant's ports), after the console and the operator's own arguments."""
    s = settings
    args = [KERNEL_ARGS, s.microvm.kernel_args]
    if accel == "tcg":
        args.append(TCG_KERNEL_ARGS)
    args += [f"atrun.runtime={runtime.dir.name}", f"atrun.data_mb={s.memory_mb + runtime.data_overhead_mb}",
             f"atrun.nproc={s.max_processes}", f"atrun.tmp_mb={s.tmp_mb}"]
    if vsock_port is not None:
        args.append(f"atrun.vsock={vsock_port}")
    if ports:  # a network grant: the guest listens on these ports and relays to the proxy
        args.append("atrun.net=" + ",".join(map(str, ports)))
    return " ".join(a for a in args if a)


def monitor_policy(settings) -> dict:
    """What the privileged helper of an unprivileged runner may start (helped.policy): QEMU's
    command per runtime and how many at once, fixed now, while the runner is root (privsep.py)."""
    return helped.policy(settings, lambda rt: memory_mb(settings, rt), lambda rt, accel: kernel_cmdline(settings, rt, accel, None))


def kill_monitor(vm_dir: Path) -> None:
    """Kill the monitor whose pid file is in ``vm_dir``, if that process still is our monitor
    (its command line names this directory: a recycled pid is left alone)."""
    try:
        pid = int((vm_dir / PID_FILE).read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if str(vm_dir).encode() not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        return


__all__ = ["MicroVmBackend", "host_support", "monitor_policy"]
