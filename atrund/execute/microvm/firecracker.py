"""Firecracker as the microVM monitor: its REST API over a Unix socket, optionally under the jailer.

NOT EXERCISED HERE: no firecracker binary can be installed on the machines this was built on.
Every request body this driver sends is validated in tests against Firecracker's own OpenAPI
description (tests/execute/microvm/test_firecracker.py with tests/firecracker/firecracker-api.yaml, a copy of Firecracker's own), and the
host side of the channel (vsock forwarded to ``<uds>_<port>``) is the one the QEMU path uses.

A VM is configured in this order, each a PUT that must answer 2xx (else the fault message is
the ExecutorError): machine-config (vCPUs, memory, no SMT), boot-source (kernel, initramfs,
command line), drives/rootfs (rootfs.ext4, read-only, not the root device: the initramfs
mounts it), vsock (guest CID 3; the guest dials the host's port 1024, which Firecracker
forwards to ``<uds_path>_1024`` where the runner listens), entropy, then actions InstanceStart.
No network interface is ever configured.

With ``executor.microvm.jailer_binary`` set, Firecracker starts under the jailer (its own chroot, uid,
cgroups, namespaces). The jailer's chroot is ``<vm dir>/jail/firecracker/<id>/root``; the
kernel, initramfs and rootfs are hard-linked into it (so they must live on the same file system
as work_dir: a link, never a copy of the disk), and API paths are then relative to that chroot.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

from atrund.execute.base import ExecutorError
from atrund.execute.microvm.vm import Monitor, VmSpec

API_SOCKET = "api.sock"
VSOCK_SOCKET = "vsock.sock"
VSOCK_PORT = 1024
GUEST_CID = 3
API_TIMEOUT = 10.0  # seconds for the API socket to appear and for each request
# Firecracker's guests reset through the keyboard controller; there is no PCI bus.
KERNEL_ARGS = "reboot=k pci=off"


def vm_id(spec: VmSpec) -> str:
    """The jailer's --id: alphanumerics and hyphens, at most 64 characters."""
    return spec.dir.name[-64:]


def requests(spec: VmSpec, root: str = "") -> list[tuple[str, str, dict]]:
    """The API calls that configure and start one VM, in order. ``root`` prefixes host paths
    (empty: absolute host paths; under the jailer: paths inside its chroot)."""

    def host(path: Path | str) -> str:
        return str(Path(root) / Path(path).name) if root else str(path)

    boot = {"kernel_image_path": host(spec.kernel), "boot_args": f"{spec.cmdline} {KERNEL_ARGS}"}
    if spec.initramfs is not None:
        boot["initrd_path"] = host(spec.initramfs)
    vsock = host(VSOCK_SOCKET) if root else str(spec.dir / VSOCK_SOCKET)
    return [
        ("PUT", "/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mb, "smt": False}),
        ("PUT", "/boot-source", boot),
        ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": host(spec.rootfs), "is_root_device": False,
                                   "is_read_only": True}),
        ("PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": vsock}),
        ("PUT", "/entropy", {}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ]


async def call(api_socket: Path, method: str, path: str, body: dict) -> tuple[int, bytes]:
    """One HTTP/1.1 request on Firecracker's API socket; (status, response body)."""
    reader, writer = await asyncio.open_unix_connection(str(api_socket))
    try:
        data = json.dumps(body).encode()
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     f"Accept: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        return status, await reader.readexactly(length) if length else b""
    finally:
        writer.close()


class Firecracker(Monitor):
    name = "firecracker"
    accelerator = "kvm"
    vsock_port = VSOCK_PORT

    def __init__(self, settings) -> None:
        self.binary = settings.microvm.firecracker_binary
        self.jailer = settings.microvm.jailer_binary
        self.uid = settings.microvm.jailer_uid

    def chroot(self, vm_dir: Path) -> Path:
        return vm_dir / "jail" / "firecracker" / vm_dir.name[-64:] / "root"

    def channel_path(self, vm_dir: Path) -> Path:
        base = self.chroot(vm_dir) if self.jailer else vm_dir
        if self.jailer:
            base.mkdir(parents=True, exist_ok=True)
        return base / f"{VSOCK_SOCKET}_{VSOCK_PORT}"

    def command(self, spec: VmSpec) -> list[str]:
        if self.jailer:
            return [self.jailer, "--id", vm_id(spec), "--exec-file", self.binary, "--uid", str(self.uid), "--gid", str(self.uid),
                    "--chroot-base-dir", str(spec.dir / "jail"), "--", "--api-sock", f"/{API_SOCKET}"]
        return [self.binary, "--api-sock", str(spec.dir / API_SOCKET), "--id", vm_id(spec)]

    def _link_into_chroot(self, spec: VmSpec) -> None:
        root = self.chroot(spec.dir)
        root.mkdir(parents=True, exist_ok=True)
        for path in (spec.kernel, spec.initramfs, spec.rootfs):
            if path is None:
                continue
            try:
                os.link(os.path.realpath(path), root / Path(path).name)
            except OSError as e:
                raise ExecutorError(f"cannot link {path} into the jailer's chroot {root} ({e.strerror}): keep the VM "
                                    "files on the same file system as executor.work_dir") from e
        os.chown(self.channel_path(spec.dir), self.uid, self.uid)  # Firecracker, as the jailer's uid, connects to it

    async def launch(self, spec: VmSpec) -> asyncio.subprocess.Process:
        if self.jailer:
            self._link_into_chroot(spec)
        api = (self.chroot(spec.dir) if self.jailer else spec.dir) / API_SOCKET
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command(spec), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
        except OSError as e:
            raise ExecutorError(f"cannot start {self.jailer or self.binary}: {e.strerror or e}") from e
        try:
            await self._configure(process, api, spec)
        except BaseException:
            process.kill()
            await process.wait()
            raise
        return process

    async def _configure(self, process: asyncio.subprocess.Process, api: Path, spec: VmSpec) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + API_TIMEOUT
        while not api.exists():
            if process.returncode is not None or loop.time() > deadline:
                out = (await process.stdout.read(2000)).decode(errors="replace") if process.returncode is not None else ""
                raise ExecutorError(f"firecracker did not open its API socket {api}: {out.strip() or 'no output'}")
            await asyncio.sleep(0.01)
        for method, path, body in requests(spec, "/" if self.jailer else ""):
            try:
                status, answer = await asyncio.wait_for(call(api, method, path, body), API_TIMEOUT)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                raise ExecutorError(f"firecracker's API did not answer {method} {path}: {e or type(e).__name__}") from e
            if not 200 <= status < 300:
                try:
                    fault = json.loads(answer).get("fault_message", answer.decode(errors="replace"))
                except ValueError:
                    fault = answer.decode(errors="replace")
                raise ExecutorError(f"firecracker refused {method} {path} ({status}): {fault}")


__all__ = ["Firecracker", "requests", "call"]
