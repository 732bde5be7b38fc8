"""The ``firecracker`` backend: one microVM per worker, under QEMU ``-M microvm`` or Firecracker.

A worker's life: the runner listens on a Unix socket in the VM's own directory, starts the
monitor (see ``Qemu`` here and atrund/execute/microvm/firecracker.py), which connects that socket to
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
entropy device, and NO network device. Invocations granted network are refused here: saying so
is better than a grant that silently does nothing. Read and write grants of host paths give
nothing either: the host's files are not in the VM at all.

Each VM lives in ``<work_dir>/vms/vm-<runner pid>_<start time>-<runtime>-<random>/`` (channel
socket, the monitor's pid, Firecracker's API socket). On start-up the backend kills the
monitors of runners that are gone and removes their directories; shutdown kills its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from atrund.execute.base import ExecutorError
from atrund.execute.container.backend import OWNER, _alive
from atrund.execute.pool import STDERR_TAIL, Backend, Worker
from atrund.execute.protocol import ExecPermissions
from atrund.execute.runtimes import Runtime

log = structlog.get_logger("atrund.execute")

HEADER = struct.Struct(">cI")  # the frame header of atrund/execute/microvm/guest_init.py
DEFAULT_WORK_DIR = "/run/atrund-work"
CHANNEL = "channel.sock"
PID_FILE = "monitor.pid"
CONSOLE_TAIL = 8192  # bytes of the guest console kept for error messages
CONNECT_TIMEOUT = 10.0  # seconds the monitor may take to connect the channel socket
# Under TCG the guest's TSC calibration hangs about half the boots without these (measured here);
# with them, every boot. Harmless under KVM, where the values are not used for calibration.
TCG_KERNEL_ARGS = "tsc_early_khz=2000000 lpj=4000000"
KERNEL_ARGS = "console=ttyS0 quiet panic=-1"
KVM_PROBE_SILENCE = 3.0  # a KVM guest that has printed nothing by now will not boot
KVM_PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class VmSpec:
    """One VM, as every monitor needs it."""

    dir: Path
    kernel: Path
    initramfs: Path | None
    rootfs: Path
    memory_mb: int
    vcpus: int
    cmdline: str


class Monitor:
    """How one kind of virtual machine monitor starts a VM (the rest is the same for all)."""

    name: str
    accelerator: str
    vsock_port: int | None = None  # the guest dials the host over vsock on this port (else virtio-serial)

    def channel_path(self, vm_dir: Path) -> Path:
        return vm_dir / CHANNEL

    async def launch(self, spec: VmSpec) -> asyncio.subprocess.Process:
        raise NotImplementedError


class Qemu(Monitor):
    """QEMU ``-M microvm``: no PCI, no firmware, virtio-mmio devices, the kernel entered directly
    (PVH). The monitor runs under its own seccomp filter (``-sandbox``) and, started as root,
    drops to nobody once the VM is set up (``-runas``)."""

    name = "qemu"

    def __init__(self, binary: str, accelerator: str) -> None:
        self.binary = binary
        self.accelerator = accelerator

    def command(self, spec: VmSpec) -> list[str]:
        cmd = [
            self.binary, "-M", "microvm,rtc=on", "-accel", self.accelerator,
            "-m", str(spec.memory_mb), "-smp", str(spec.vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(spec.kernel),
            "-append", spec.cmdline,
            "-serial", "stdio",
            "-drive", f"id=root,file={spec.rootfs},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=channel,path={self.channel_path(spec.dir)}",
            "-device", "virtserialport,chardev=channel,name=atrun",
            "-device", "virtio-rng-device",
        ]
        if spec.initramfs is not None:
            cmd += ["-initrd", str(spec.initramfs)]
        # -runas drops root with setuid() after set-up, so the filter must let that one through;
        # as nobody there is nothing left to elevate to.
        root = os.geteuid() == 0
        cmd += ["-sandbox", f"on,obsolete=deny,elevateprivileges={'allow' if root else 'deny'},spawn=deny,resourcecontrol=deny"]
        if root:
            cmd += ["-runas", "nobody"]
        return cmd

    async def launch(self, spec: VmSpec) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *self.command(spec), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
        except OSError as e:
            raise ExecutorError(f"cannot start {self.binary}: {e.strerror or e}") from e


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
    def __init__(self, backend: "MicroVmBackend", vm_dir: Path, process: asyncio.subprocess.Process, limit: int) -> None:
        self.backend = backend
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
                elif kind == b"E" and len(self.stderr._buffer) < 4 * STDERR_TAIL + (1 << 16):  # noqa: SLF001
                    self.stderr.feed_data(payload)
                elif kind == b"M":
                    self._oom = int(payload or b"0")
                elif kind == b"X":
                    self._exit = int(payload)
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
        for task in self._tasks:
            task.cancel()
        # Ended for whoever reads them, even if the demultiplexer never got to run.
        self.stdout.feed_eof()
        self.stderr.feed_eof()
        self._ended.set()
        if self._writer is not None:
            self._writer.close()
        await self.backend.monitor_gone(self.dir)
        self.backend.live.discard(self)


@dataclass(frozen=True)
class HostSupport:
    """What doctor and auto report: which monitor and accelerator, or why there is none."""

    monitor: str | None
    accelerator: str | None
    detail: str


_accelerators: dict[str, tuple[str, str]] = {}  # per process: _probe_key -> (accelerator, why)


def kvm_boots(binary: str, kernel: Path, initramfs: Path | None) -> tuple[bool, str]:
    """Whether a guest really boots under KVM here: /dev/kvm can exist and still run no stock
    guest kernel (e.g. a paravirtual nested KVM); such a guest prints nothing at all."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror}"
    cmd = [binary, "-M", "microvm", "-accel", "kvm", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
           "-no-reboot", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 rdinit=/nonexistent", "-serial", "stdio"]
    if initramfs is not None:
        cmd += ["-initrd", str(initramfs)]
    started = time.monotonic()
    seen = b""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            elapsed = time.monotonic() - started
            if b"Run /nonexistent" in seen or b"Kernel panic" in seen or b"No working init" in seen:
                return True, f"a KVM guest reached its init in {elapsed:.1f} s"
            if proc.poll() is not None:
                return False, f"qemu with KVM exited with code {proc.returncode}: {seen.decode(errors='replace').strip()[-200:]}"
            # The kernel's first line comes within milliseconds under KVM; a guest that has not
            # printed it by now never will (QEMU's own warnings do not count).
            printed = b"Linux version" in seen
            if (not printed and elapsed > KVM_PROBE_SILENCE) or elapsed > KVM_PROBE_TIMEOUT:
                why = "printed nothing" if not printed else "did not reach its init"
                return False, f"/dev/kvm is there but a KVM guest {why} within {elapsed:.0f} s"
            time.sleep(0.05)
            with contextlib.suppress(BlockingIOError, TypeError):
                seen += proc.stdout.read() or b""
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _probe_key(binary: str, kernel: Path, initramfs: Path | None) -> str:
    """What a KVM verdict depends on: this boot of the host, the QEMU binary and the guest files."""
    parts = [os.uname().release]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    for path in (shutil.which(binary) or binary, kernel, initramfs):
        if path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                parts.append(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def accelerator(settings) -> tuple[str, str]:
    """The QEMU accelerator to use and why: KVM when it really boots a guest, else TCG.

    The verdict of the trial boot is kept per process and, beside the kernel, per host boot
    (``kvm-probe.json``), so that a command-line run with ``auto`` does not pay it every time."""
    if settings.vm_accelerator != "auto":
        return settings.vm_accelerator, "set in the configuration"
    key = _probe_key(settings.qemu_binary, settings.vm_kernel, settings.vm_initramfs)
    if key in _accelerators:
        return _accelerators[key]
    record = Path(os.path.realpath(settings.vm_kernel)).parent / "kvm-probe.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(record.read_text())
        if saved["key"] == key:
            _accelerators[key] = (saved["accelerator"], saved["why"] + " (probed earlier since the host booted)")
            return _accelerators[key]
    ok, why = kvm_boots(settings.qemu_binary, settings.vm_kernel, settings.vm_initramfs)
    _accelerators[key] = ("kvm", why) if ok else ("tcg", why)
    with contextlib.suppress(OSError):
        partial = record.with_name(f".kvm-probe.{os.getpid()}")
        partial.write_text(json.dumps({"key": key, "accelerator": _accelerators[key][0], "why": why}))
        partial.rename(record)
    return _accelerators[key]


def _qemu_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "unknown version"


def guest_missing(settings) -> str | None:
    for key in ("vm_kernel", "vm_initramfs", "vm_rootfs"):
        path = getattr(settings, key)
        if path is not None and not os.path.exists(path):
            return f"executor.{key} {path} does not exist (build it: atrund image build --vm)"
    return None


def monitor_name(settings) -> str:
    if settings.vm_monitor != "auto":
        return settings.vm_monitor
    return "firecracker" if shutil.which(settings.firecracker_binary) and os.path.exists("/dev/kvm") else "qemu"


def host_support(settings) -> HostSupport:
    """Which monitor and accelerator this host offers (booting a KVM guest to find out)."""
    name = monitor_name(settings)
    if name == "firecracker":
        found = shutil.which(settings.firecracker_binary)
        if not found:
            return HostSupport(None, None, f"no firecracker binary ({settings.firecracker_binary})")
        return HostSupport("firecracker", "kvm", f"firecracker at {found}")
    found = shutil.which(settings.qemu_binary)
    if not found:
        return HostSupport(None, None, f"{settings.qemu_binary} is not installed (Debian: apt-get install qemu-system-x86)")
    version = _qemu_version(found)
    if missing := guest_missing(settings):
        return HostSupport("qemu", None, f"QEMU {version}; {missing}")
    accel, why = accelerator(settings)
    return HostSupport("qemu", accel, f"QEMU {version} at {found}, accelerator {accel} ({why})")


class MicroVmBackend(Backend):
    isolation = "firecracker"

    def __init__(self, settings) -> None:
        self.settings = settings
        self.work_root = Path(settings.work_dir or DEFAULT_WORK_DIR) / "vms"
        self.work_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        st = os.lstat(self.work_root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ExecutorError(f"{self.work_root} must be a directory owned by the runner and not writable by others")
        self.ready_timeout = settings.vm_boot_timeout
        self.monitor: Monitor | None = None
        self._ready: asyncio.Task | None = None
        # Every VM this backend started and has not killed yet, booting ones included: close()
        # kills them, so a shutdown during a warm-up leaves no monitor running.
        self.live: set[VmWorker] = set()
        self.closed = False

    async def _prepare(self) -> None:
        """Once per backend: the guest files exist and match our runtimes, a monitor is chosen,
        and what a crashed runner left behind is gone."""
        from atrund.execute.container import image
        from atrund.execute.microvm import guest as vmimage

        s = self.settings
        if missing := guest_missing(s):
            raise ExecutorError(missing)
        built_with = vmimage.runtimes_of(s.vm_rootfs)
        if built_with is not None and built_with != image.runtimes_hash(s.runtimes_dir):
            raise ExecutorError(f"{s.vm_rootfs} holds other at-run-exec programs than {s.runtimes_dir}: "
                                "rebuild it with `atrund image build --vm`")
        name = monitor_name(s)
        if name == "firecracker":
            from atrund.execute.microvm.firecracker import Firecracker

            self.monitor = Firecracker(s)
        else:
            if not shutil.which(s.qemu_binary):
                raise ExecutorError(f"{s.qemu_binary} is not installed (Debian: apt-get install qemu-system-x86)")
            accel, why = await asyncio.to_thread(accelerator, s)
            log.info("microVM monitor", monitor="qemu", accelerator=accel, why=why)
            self.monitor = Qemu(s.qemu_binary, accel)
        await asyncio.to_thread(self.sweep)

    async def ready(self) -> None:
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._prepare())
        try:
            await asyncio.shield(self._ready)
        except ExecutorError:
            self._ready = None
            raise

    def sweep(self) -> None:
        """Kill the monitors of runner processes that are gone and remove their VM directories."""
        removed = 0
        for d in self.work_root.iterdir():
            parts = d.name.split("-", 3)
            if len(parts) < 3 or parts[0] != "vm" or _alive(parts[1].replace("_", ":")):
                continue
            kill_monitor(d)
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
        if removed:
            log.info("removed microVMs a stopped runner left behind", count=removed)

    def _memory_mb(self, runtime: Runtime) -> int:
        s = self.settings
        return s.memory_mb + runtime.data_overhead_mb + s.tmp_mb + s.vm_overhead_mb

    def _cmdline(self, runtime: Runtime) -> str:
        s = self.settings
        args = [KERNEL_ARGS, s.vm_kernel_args]
        if getattr(self.monitor, "accelerator", "kvm") == "tcg":
            args.append(TCG_KERNEL_ARGS)
        args += [f"atrun.runtime={runtime.dir.name}", f"atrun.data_mb={s.memory_mb + runtime.data_overhead_mb}",
                 f"atrun.nproc={s.max_processes}", f"atrun.tmp_mb={s.tmp_mb}"]
        if self.monitor.vsock_port is not None:
            args.append(f"atrun.vsock={self.monitor.vsock_port}")
        return " ".join(a for a in args if a)

    async def spawn(self, runtime: Runtime, settings, permissions: ExecPermissions) -> Worker:
        if permissions.net:
            raise ExecutorError("network grants are not available with isolation firecracker: its VMs have no network "
                                "device (run bundles that need the network on another backend)")
        await self.ready()
        if self.closed:
            raise ExecutorError("the microVM backend is shut down")
        vm_dir = self.work_root / f"vm-{(OWNER or '0').replace(':', '_')}-{runtime.name}-{secrets.token_hex(4)}"
        vm_dir.mkdir(mode=0o700)
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
            spec = VmSpec(vm_dir, settings.vm_kernel, settings.vm_initramfs, settings.vm_rootfs,
                          self._memory_mb(runtime), settings.vm_vcpus, self._cmdline(runtime))
            process = await self.monitor.launch(spec)
            (vm_dir / PID_FILE).write_text(str(process.pid))
            worker = VmWorker(self, vm_dir, process, settings.max_output_bytes + 4096)
            self.live.add(worker)
            # The monitor connects the channel as it starts (QEMU) or when the guest dials (Firecracker).
            accept = asyncio.ensure_future(asyncio.get_running_loop().sock_accept(listener))
            exited = asyncio.ensure_future(process.wait())
            done, _ = await asyncio.wait({accept, exited}, timeout=CONNECT_TIMEOUT if self.monitor.vsock_port is None
                                         else settings.vm_boot_timeout, return_when=asyncio.FIRST_COMPLETED)
            exited.cancel()
            if accept not in done:
                accept.cancel()
                await asyncio.sleep(0.1)  # its last words on the console
                raise ExecutorError(f"the {self.monitor.name} monitor did not connect the VM's channel: "
                                    f"{worker.console_tail(6) or 'no output'}")
            conn, _ = accept.result()
            reader, writer = await asyncio.open_connection(sock=conn, limit=1 << 20)
            worker.attach(reader, writer)
            if self.closed:  # shut down while this one started
                raise ExecutorError("the microVM backend is shut down")
            return worker
        except BaseException:
            if worker is not None:
                await worker.kill()
            else:
                await self.monitor_gone(vm_dir)
            raise
        finally:
            listener.close()

    async def monitor_gone(self, vm_dir: Path) -> None:
        """A VM's directory goes once its monitor is dead (nothing of it stays behind)."""
        await asyncio.to_thread(kill_monitor, vm_dir)
        shutil.rmtree(vm_dir, ignore_errors=True)

    async def close(self) -> None:
        self.closed = True
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        await asyncio.gather(*(w.kill() for w in list(self.live)), return_exceptions=True)


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


__all__ = ["MicroVmBackend", "Qemu", "host_support", "kvm_boots"]
