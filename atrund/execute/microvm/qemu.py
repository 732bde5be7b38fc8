"""QEMU as the microVM monitor (``-M microvm``), and which accelerator it gets here.

KVM only when a guest really boots under it (``kvm_boots``): /dev/kvm can exist and still run
no stock guest kernel. Otherwise TCG, software emulation: it works, slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from atrund.execute.base import ExecutorError
from atrund.execute.microvm.vm import Monitor, VmSpec

# Under TCG the guest's TSC calibration hangs about half the boots without these (measured here);
# with them, every boot. Harmless under KVM, where the values are not used for calibration.
TCG_KERNEL_ARGS = "tsc_early_khz=2000000 lpj=4000000"
KVM_PROBE_SILENCE = 3.0  # a KVM guest that has printed nothing by now will not boot
KVM_PROBE_TIMEOUT = 15.0


class Qemu(Monitor):
    """QEMU ``-M microvm``: no PCI, no firmware, virtio-mmio devices, the kernel entered directly
    (PVH). The monitor runs under its own seccomp filter (``-sandbox``) and, started as root,
    drops to nobody once the VM is set up (``-runas``)."""

    name = "qemu"

    def __init__(self, binary: str, accelerator: str, channel_fd: int | None = None) -> None:
        self.binary = binary
        self.accelerator = accelerator
        # The channel as a descriptor QEMU inherits (the privileged helper's socketpair), not a
        # path it connects to: a monitor that is nobody could not reach the runner's directory.
        self.channel_fd = channel_fd

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
            "-chardev", f"socket,id=channel,fd={self.channel_fd}" if self.channel_fd is not None
            else f"socket,id=channel,path={self.channel_path(spec.dir)}",
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
    if settings.microvm.accelerator != "auto":
        return settings.microvm.accelerator, "set in the configuration"
    key = _probe_key(settings.microvm.qemu_binary, settings.microvm.kernel, settings.microvm.initramfs)
    if key in _accelerators:
        return _accelerators[key]
    record = Path(os.path.realpath(settings.microvm.kernel)).parent / "kvm-probe.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(record.read_text())
        if saved["key"] == key:
            _accelerators[key] = (saved["accelerator"], saved["why"] + " (probed earlier since the host booted)")
            return _accelerators[key]
    ok, why = kvm_boots(settings.microvm.qemu_binary, settings.microvm.kernel, settings.microvm.initramfs)
    _accelerators[key] = ("kvm", why) if ok else ("tcg", why)
    with contextlib.suppress(OSError):
        partial = record.with_name(f".kvm-probe.{os.getpid()}")
        partial.write_text(json.dumps({"key": key, "accelerator": _accelerators[key][0], "why": why}))
        partial.rename(record)
    return _accelerators[key]


def qemu_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "unknown version"


__all__ = ["Qemu", "TCG_KERNEL_ARGS", "accelerator", "kvm_boots", "qemu_version"]
