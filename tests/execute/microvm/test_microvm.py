"""What only the microVM backend promises, on real QEMU with the real guest (TCG here): one VM per
invocation with nothing carried over, a read-only root, no network device (a grant's connections
are relayed over the VM's channel: tests/execute/test_egress.py), and nothing left behind by a
runner that crashed. The shared contract is in test_executor.py and test_hostile.py."""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import execute_once, gone

from atrund.config import ExecutorSection
from atrund.execute import create_executor

ROOT = Path(__file__).resolve().parents[3]


def bundle(tmp_path: Path, source: str, name: str = "bundle.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


async def test_nothing_carries_over_and_the_root_is_read_only(vm_guest, tmp_path):
    """The first bundle writes where it can and tries the root file system; the next invocation
    (a new VM) sees none of it: the image is opened read-only and every VM starts from it."""
    writer = bundle(tmp_path, """
        import os
        def main(args):
            open("/tmp/left-behind", "w").write("x")
            try:
                open("/etc/left-behind", "w").write("x")
                root = "written"
            except OSError as e:
                root = type(e).__name__
            return {"root": root}
    """, "writer.py")
    reader = bundle(tmp_path, """
        import os
        def main(args):
            return {"tmp": os.path.exists("/tmp/left-behind"), "etc": os.path.exists("/etc/left-behind"),
                    "interfaces": sorted(os.listdir("/sys/class/net"))}
    """, "reader.py")
    first = await execute_once("python", writer, isolation="microvm", timeout=30)
    assert first.success and first.data["root"] in ("PermissionError", "OSError"), first  # EACCES or EROFS: not written
    second = await execute_once("python", reader, isolation="microvm", timeout=30)
    # No network device at all: not even loopback is configured (lo exists but is down).
    assert second.success and second.data == {"tmp": False, "etc": False, "interfaces": ["lo"]}, second


async def test_the_bundle_is_nobody_and_reaches_no_device(vm_guest, tmp_path):
    """Inside the VM the bundle runs as nobody, with no_new_privs, on a nosuid root (Debian's
    setuid programs are there), and cannot open the disk or the channel atrun-init speaks on."""
    probe = bundle(tmp_path, """
        import os
        def attempt(path, mode):
            try:
                os.close(os.open(path, mode))
                return "opened"
            except OSError as e:
                return type(e).__name__
        def main(args):
            ports = os.listdir("/sys/class/virtio-ports")
            root = next(line.split()[3] for line in open("/proc/mounts") if line.split()[1] == "/")
            nnp = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("NoNewPrivs"))
            return {"uid": os.getuid(), "nnp": nnp, "root": sorted(set(root.split(",")) & {"ro", "nosuid", "nodev"}),
                    "disk": attempt("/dev/vda", os.O_RDONLY), "channel": [attempt("/dev/" + p, os.O_RDWR) for p in ports],
                    "setuid": os.stat("/usr/bin/passwd").st_mode & 0o4000 != 0}
    """)
    r = await execute_once("python", probe, isolation="microvm", timeout=30)
    assert r.success, r.error
    assert r.data == {"uid": 65534, "nnp": "1", "root": ["nodev", "nosuid", "ro"], "disk": "PermissionError",
                      "channel": ["PermissionError"], "setuid": True}, r.data


async def test_shutdown_during_a_warm_up_leaves_no_vm(vm_guest, tmp_path):
    """shutdown() while a warm VM is still booting: its monitor is killed and its directory goes,
    at once, not when the boot would have finished."""
    executor = create_executor(ExecutorSection(isolation="microvm", warm=1, warm_by_runtime={"deno": 0, "node": 0}))
    warming = asyncio.ensure_future(executor.warm(1))
    backend = executor.backend
    for _ in range(200):
        if backend.live:
            break
        await asyncio.sleep(0.05)
    (worker,) = backend.live
    assert worker.exited() is None, "the VM should still be booting"
    await executor.shutdown()
    assert gone(worker.process.pid) and not worker.dir.exists() and not backend.live
    await asyncio.wait_for(warming, 30)  # the warm-up ends (its worker failed to start), leaving nothing
    assert executor.stats().warm["python"] == 0 and not backend.live


async def test_a_crashed_runners_vms_are_swept_on_start(vm_guest, request):
    """A runner killed with SIGKILL leaves its QEMU running (it has a session of its own); the
    next runner's backend kills it and removes its directory (socket, pid file)."""
    work = Path(tempfile.mkdtemp(prefix="atrund-vm-", dir="/tmp"))  # Unix socket paths: at most 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    script = textwrap.dedent(f"""
        import asyncio, sys
        from atrund.config import ExecutorSection
        from atrund.execute.microvm.backend import MicroVmBackend
        from atrund.execute.protocol import ExecPermissions
        from atrund.execute.runtimes import load_runtimes
        async def main():
            s = ExecutorSection(isolation="microvm", microvm={{"accelerator": "tcg"}}, work_dir={str(work)!r})
            w = await MicroVmBackend(s).spawn(load_runtimes(s.runtimes_dir)["python"], s, ExecPermissions())
            print("VM", w.process.pid, w.dir, flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
    """)
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = ""
        while not line.startswith("VM "):  # past the runner's own log lines
            line = runner.stdout.readline()
            assert line, "the runner ended before starting its VM"
        pid, vm_dir = line.split()[1:]
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        runner.stdout.close()
    pid = int(pid)
    assert not gone(pid) and Path(vm_dir).exists(), "the crashed runner's VM should still be there"
    from atrund.execute.microvm.backend import MicroVmBackend

    backend = MicroVmBackend(ExecutorSection(isolation="microvm", microvm={"accelerator": "tcg"}, work_dir=work))
    await backend.ready()
    for _ in range(50):
        if gone(pid):
            break
        await asyncio.sleep(0.1)
    assert gone(pid), "the crashed runner's QEMU outlived the sweep"
    assert not Path(vm_dir).exists()
    await backend.close()


def test_initramfs_loads_each_module_after_what_it_needs(vm_guest):
    """The guest's drivers are modules in Debian's kernel; the initramfs loads them in an order
    the kernel accepts (a dependency first), read from the modules themselves."""
    data = gzip.decompress(Path(vm_guest["initramfs"]).read_bytes())
    names, at = {}, 0
    while True:
        head = data[at:at + 110]
        namesize, filesize = int(head[94:102], 16), int(head[54:62], 16)
        name = data[at + 110:at + 110 + namesize - 1].decode()
        start = at + 110 + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            break
        names[name] = data[start:start + filesize]
        at = start + filesize + (-filesize % 4)
    order = names["modules/order"].decode().split()
    for before, after in [("virtio_ring", "virtio"), ("virtio", "virtio_mmio"), ("virtio", "virtio_blk"),
                          ("jbd2", "ext4"), ("mbcache", "ext4"), ("crc16", "ext4"), ("crc32c_generic", "ext4")]:
        assert order.index(before) < order.index(after), order
    assert all(f"modules/{m}.ko" in names for m in order)
    assert names["init"].startswith(b"#!/bin/busybox sh") and "bin/busybox" in names


def test_vmlinux_comes_out_of_the_bzimage_as_elf(vm_guest):
    with open(vm_guest["kernel"], "rb") as f:
        assert f.read(4) == b"\x7fELF"
    from atrund.execute.container.image import ImageError
    from atrund.execute.microvm.guest import vmlinux_from_bzimage

    with pytest.raises(ImageError, match="not a bzImage"):
        vmlinux_from_bzimage(b"\0" * 4096)


def test_rootfs_is_refused_when_built_from_other_runtimes(vm_guest):
    """The backend compares the runtime directories the rootfs was built with to the runner's."""
    from atrund.execute.container import image
    from atrund.execute.microvm import guest as vmimage

    assert vmimage.runtimes_of(Path(vm_guest["rootfs"])) == image.runtimes_hash(ROOT / "nix" / "runtimes")
    assert os.path.realpath(vm_guest["rootfs"]).endswith(".ext4")


async def test_a_runner_serves_an_invocation_from_a_vm_end_to_end(vm_guest, author, make_runner, reader):
    """On the local PDS: an invocation record in, a result record out, the bundle run in a VM."""
    from conftest import wait_result

    from atrund.records import RUNNER, Result

    runner = await make_runner(access={"allowlist": [author.account.did]},
                               executor={"isolation": "microvm", "warm_by_runtime": {"python": 1, "deno": 0, "node": 0}})
    _, declared = await reader.get_record(runner.did, RUNNER, "self")  # the record states the monitor too
    assert declared["isolation"] == "microvm" and declared["monitor"] == "qemu"
    bundle_ref = await author.publish("import platform\ndef main(args):\n    return {'hi': args['name'], 'kernel': platform.release()}\n")
    uri = await author.invoke(bundle_ref, runner.did, "main", {"name": "ada"})
    result = Result.model_validate(await wait_result(reader, runner.did, uri, timeout=120))
    assert result.status == "success", result.error
    assert result.data["hi"] == "ada" and result.metrics.isolation == "microvm"
    assert result.data["kernel"] != os.uname().release  # it ran on the guest's kernel, not the host's
