"""A microVM monitor started by the privileged helper, for a runner that runs as its own user
(``[runner] user``, atrund/privsep.py).

The runner cannot start QEMU itself once it dropped: QEMU opens /dev/kvm and drops to nobody
(``-runas``), which takes root. So the helper (the process backend's fork server, under the
policy the runner sent while it was root) starts it, from a command fixed in that policy
(``policy``), and hands the runner the VM's channel and console; the runner reads and writes
them exactly as it does a monitor it started itself. ``HelpedMonitor`` is that monitor as
backend.VmWorker knows a monitor process: ``pid``, ``returncode``, ``stdout``, ``wait()``,
``kill()``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

from atrund.execute.base import ExecutorError
from atrund.execute.microvm.qemu import Qemu, accelerator
from atrund.execute.microvm.vm import VmSpec
from atrund.execute.process.forked import ForkServer
from atrund.execute.runtimes import load_runtimes

CHANNEL_FD = 3  # where the helper puts the VM's channel in the monitor (forkserver.monitor_init)


def policy(settings, memory_mb, cmdline) -> dict:
    """The helper's policy for monitors: the command for each runtime (``monitors``), built now (as root, before the drop) from the
    operator's configuration alone: the QEMU binary (resolved), the accelerator (probed now, as
    root), kernel, initramfs, rootfs, memory and vCPUs. The helper appends only a network
    grant's port numbers to the kernel command line (forkserver.Policy.monitor). QEMU only:
    privsep refuses Firecracker before this is built. ``memory_mb(runtime)`` and
    ``cmdline(runtime, accelerator)`` are the backend's own. And how many may run at once (``monitor_limit``): twice what the
    pool keeps at most (busy, hot and warm workers), room for VMs being killed while their
    successors start; a compromised runner can hold no more host memory in VMs than that."""
    s = settings
    binary = shutil.which(s.microvm.qemu_binary)
    if binary is None:
        raise ExecutorError(f"{s.microvm.qemu_binary} is not installed (Debian: apt-get install qemu-system-x86)")
    accel, _ = accelerator(s)  # kept for the process: the backend's own call after the drop gets this verdict
    qemu = Qemu(os.path.realpath(binary), accel, CHANNEL_FD)
    commands = {}
    runtimes = load_runtimes(s.runtimes_dir)
    for rt in runtimes.values():
        spec = VmSpec(Path("/"), Path(s.microvm.kernel).absolute(),
                      Path(s.microvm.initramfs).absolute() if s.microvm.initramfs else None,
                      Path(s.microvm.rootfs).absolute(), memory_mb(rt), s.microvm.vcpus, cmdline(rt, accel))
        commands[rt.name] = qemu.command(spec)
    warm = sum(s.warm_by_runtime.get(name, s.warm) for name in runtimes)
    return {"monitors": commands, "monitor_limit": 2 * (s.concurrency + s.hot_max + warm)}


class HelpedMonitor:
    """The monitor's init (PID 1 of the monitor's PID namespace, the helper's child) as a
    monitor process: killing it kills the monitor; its exit status is the monitor's."""

    def __init__(self, helper: ForkServer, pid: int, pidfd: int, exited: asyncio.Future, console: int) -> None:
        self.helper = helper
        self.pid = pid
        self._pidfd = pidfd
        self._exited = exited
        self._console = console
        self._transport: asyncio.ReadTransport | None = None
        self.stdout = asyncio.StreamReader()

    async def connect(self) -> None:
        """The console's pipe as ``stdout`` (a stream, as asyncio's subprocesses have)."""
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.stdout, loop=loop),
                                                          os.fdopen(self._console, "rb", buffering=0))

    @property
    def returncode(self) -> int | None:
        if not self._exited.done():
            return None
        code = self._exited.result()
        return -signal.SIGKILL if code is None else code  # None: the helper died, and the monitor with it

    async def wait(self) -> int | None:
        await asyncio.shield(self._exited)
        return self.returncode

    def kill(self) -> None:
        self.helper.kill(self.pid, self._pidfd)  # the runner may not signal it: the helper does

    def release(self) -> None:
        """Once it is dead: the descriptors the runner held on it."""
        self.helper.live.pop(self.pid, None)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self._transport is not None:
            self._transport.close()
        elif self._console >= 0:
            os.close(self._console)
        self._console = -1


__all__ = ["CHANNEL_FD", "HelpedMonitor", "policy"]
