"""microVM benchmark: how long the microvm backend's VMs take, here (QEMU, TCG) or on a KVM host.

Method (one run, one machine, the real guest that `atrund image build` makes):
- to guest init: QEMU started with the kernel and initramfs only (no disk, no channel); time
  from starting the monitor to the kernel printing "Run /init as init process", i.e. the
  moment it hands over to userspace. This is what Firecracker's published figure measures
  (<= 125 ms from InstanceStart to guest init, on bare metal with its minimal kernel config).
- boot to ready: the backend's spawn() of a python worker until atrun-init's at-run-exec says
  ready (kernel, initramfs loading the virtio and ext4 modules, mount of rootfs.ext4, Python
  start of atrun-init and of at-run-exec).
- warm round trip: execute() of a trivial bundle when a booted VM is waiting (bundle and
  request over the channel, the answer back). The next VM's boot is awaited before each call
  so it does not compete with the measured one.
- cold round trip: execute() with no warm VM: boot to ready plus the round trip.

    .venv/bin/python bench/microvm.py [-n 3] [--accel tcg|kvm]

On a KVM host run the same with `--accel kvm` (or the default auto, which takes KVM when a
guest really boots there). Expect the CPU-bound parts (kernel boot, Python start) to drop by one
to two orders of magnitude; the Debian kernel's general-purpose configuration (ACPI, many
drivers, modules loaded from the initramfs) keeps it well above Firecracker's figure, which
assumes a kernel built for the purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atrund.config import ExecutorSection  # noqa: E402
from atrund.execute import ExecRequest, create_executor  # noqa: E402
from atrund.execute.microvm.backend import MicroVmBackend  # noqa: E402
from atrund.execute.microvm.qemu import TCG_KERNEL_ARGS, accelerator  # noqa: E402
from atrund.execute.protocol import ExecPermissions  # noqa: E402
from atrund.execute.runtimes import load_runtimes  # noqa: E402

FIRECRACKER_PUBLISHED_MS = 125  # "boot to guest init in <= 125 ms", Firecracker's specification (SPECIFICATION.md)


def to_guest_init(settings: ExecutorSection, accel: str) -> float:
    cmd = [settings.microvm.qemu_binary, "-M", "microvm", "-accel", accel, "-m", "256", "-nodefaults", "-no-user-config",
           "-display", "none", "-no-reboot", "-kernel", str(settings.microvm.kernel), "-initrd", str(settings.microvm.initramfs),
           "-append", f"console=ttyS0 panic=-1 {TCG_KERNEL_ARGS if accel == 'tcg' else ''}",
           "-serial", "stdio"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b""
    try:
        while b"Run /init as init process" not in seen:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                raise RuntimeError(f"the guest ended before its init: {seen[-300:]!r}")
            seen += chunk
        return (time.monotonic() - started) * 1000
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


async def boot_to_ready(settings: ExecutorSection) -> float:
    backend = MicroVmBackend(settings)
    runtime = load_runtimes(settings.runtimes_dir)["python"]
    await backend.ready()
    started = time.monotonic()
    worker = await backend.spawn(runtime, settings, ExecPermissions())
    try:
        line = await asyncio.wait_for(worker.stdout.readline(), settings.microvm.boot_timeout)
        assert line.strip() == b'{"ready":true}', line
        return (time.monotonic() - started) * 1000
    finally:
        await worker.kill()
        await backend.close()


async def round_trips(settings: ExecutorSection, bundle: str, n: int, warm: bool) -> list[float]:
    executor = create_executor(settings.model_copy(update={"warm": 1 if warm else 0}))
    out = []
    try:
        if warm:
            await executor.warm(1)
        for _ in range(n):
            while warm and executor.stats().warm["python"] < 1:  # the replacement has booted
                await asyncio.sleep(0.1)
            started = time.monotonic()
            r = await executor.execute(ExecRequest(code_path=bundle, endpoint="main", timeout=60), "python")
            assert r.success, r.error
            out.append((time.monotonic() - started) * 1000)
    finally:
        await executor.shutdown()
    return out


def summary(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values)), "min_ms": round(min(values)), "max_ms": round(max(values)), "n": len(values)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    args = ap.parse_args()
    settings = ExecutorSection(isolation="microvm", microvm={"accelerator": args.accel}, warm_by_runtime={"deno": 0, "node": 0})
    accel, why = accelerator(settings)
    settings = settings.model_copy(update={"microvm": settings.microvm.model_copy(update={"accelerator": accel})})
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "b.py"
        bundle.write_text("def main(args):\n    return {'ok': True}\n")
        results = {
            "to_guest_init": summary([to_guest_init(settings, accel) for _ in range(args.n)]),
            "boot_to_ready": summary([await boot_to_ready(settings) for _ in range(args.n)]),
            "warm_round_trip": summary(await round_trips(settings, str(bundle), args.n, warm=True)),
            "cold_round_trip": summary(await round_trips(settings, str(bundle), args.n, warm=False)),
        }
    report = {"monitor": "qemu -M microvm", "accelerator": accel, "why": why, "cpus": os.cpu_count(),
              "load_average_1m": round(os.getloadavg()[0], 1), "firecracker_published_to_guest_init_ms": FIRECRACKER_PUBLISHED_MS,
              **results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
