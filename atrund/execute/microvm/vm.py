"""What every microVM monitor is given and must do: one VM's spec, and how it is started.

The backend (backend.py) owns the VM's life; a monitor (qemu.py, firecracker.py) only turns a
``VmSpec`` into a running VM whose protocol channel reaches ``channel_path``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

CHANNEL = "channel.sock"


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
