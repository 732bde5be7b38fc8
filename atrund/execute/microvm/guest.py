"""The microVM backend's guest: kernel, initramfs and rootfs.ext4, built locally.

``atrund image build --vm`` (part of ``atrund image build``; see atrund/execute/container/image.py for the rootfs):

1. the kernel: Debian's ``linux-image-amd64`` package (``apt-get download``, not installed),
   its bzImage unpacked to the uncompressed ELF ``vmlinux`` that QEMU ``-M microvm`` and
   Firecracker boot directly (PVH entry, no bootloader, no real-mode setup code);
2. the initramfs: static busybox and the few modules Debian builds as modules but the guest
   needs before its root exists (virtio-mmio, virtio-blk, virtio-console, virtio-rng, ext4 and
   the vsock transport for Firecracker). Its /init loads them, mounts the root read-only and
   switch_roots to /sbin/atrun-init (atrund/execute/microvm/guest_init.py);
3. rootfs.ext4: the container image's root filesystem, exactly (the same debootstrap rootfs
   with deno, node and the runtime directories: ``image.image_tar``), plus /sbin/atrun-init
   and the egress namespace's set-up it loads (/usr/lib/atrun/anyip.py),
   made with ``mkfs.ext4 -d``, no journal. Every VM opens it read-only (no per-VM disk copy,
   nothing to leak between invocations); the guest writes only to its tmpfs /tmp.

Each output is named by a hash of its inputs under the cache directory (default
/var/cache/atrund/vm) and the stable names ``vmlinux``, ``initramfs.img`` and ``rootfs.ext4``
are symlinks to the current ones, which is what the executor settings default to. A rerun with
the same inputs only re-points the links. ``rootfs-<hash>.json`` beside the image records the
hash of the runtime directories that went in; the backend refuses a rootfs built from other
at-run-exec programs than the runner's.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from atrund.execute.container import image
from atrund.execute.container.image import ImageError, Progress

DEFAULT_DIR = Path("/var/cache/atrund/vm")
KERNEL_PACKAGE = "linux-image-amd64"
VM_LAYOUT = 3  # bump when what goes into the initramfs or rootfs, or where, changes
INIT_IN_ROOTFS = "/sbin/atrun-init"
ANYIP_IN_ROOTFS = "/usr/lib/atrun/anyip.py"  # what atrun-init loads to set up the guest's network (egress/anyip.py)
# What the guest needs before its root exists; their dependencies come along (read from each
# module's depends= field) and load first. The vsock ones only where the command line asks.
# crc32c_generic: ext4 asks the crypto API for crc32c at mount time, and there is no modprobe yet.
MODULES = ["virtio_mmio", "virtio_blk", "virtio_console", "virtio-rng", "crc32c_generic", "ext4"]
VSOCK_MODULES = ["vmw_vsock_virtio_transport"]

INIT_SCRIPT = """#!/bin/busybox sh
# atrund microVM initramfs: load the drivers, mount the root read-only, hand over to atrun-init.
B=/bin/busybox
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
fail() { echo "atrun-initramfs: $*" > /dev/console; $B reboot -f; }
for m in $($B cat /modules/order); do $B insmod /modules/$m.ko || fail "insmod $m failed"; done
if $B grep -q atrun.vsock= /proc/cmdline; then
    for m in $($B cat /modules/vsock); do $B insmod /modules/$m.ko || fail "insmod $m failed"; done
fi
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1)); [ $n -gt 500 ] && fail "no root disk /dev/vda"
    $B usleep 10000
done
# nosuid: Debian's setuid programs (mount, passwd, ...) are in the image; they elevate nobody.
$B mount -t ext4 -o ro,nodev,nosuid /dev/vda /newroot || fail "cannot mount /dev/vda"
$B umount /proc
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /usr/bin/python3 -I -S /sbin/atrun-init
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- 1. the kernel ------------------------------------------------------------------------------

def kernel_deb(cache_dir: Path, progress: Progress) -> Path:
    """Debian's current kernel package, downloaded (not installed) into the cache."""
    if not shutil.which("apt-get"):
        raise ImageError("the guest kernel comes from Debian's linux-image-amd64 package: apt-get is needed "
                         "(or set executor.microvm.kernel and executor.microvm.initramfs to a kernel of your own)")
    try:
        deps = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ImageError(f"apt-cache does not know {KERNEL_PACKAGE} (apt-get update?): {e}") from e
    package = next((line.split()[-1] for line in deps.splitlines() if line.strip().startswith("Depends: linux-image-")), None)
    if package is None:
        raise ImageError(f"{KERNEL_PACKAGE} depends on no linux-image package here: {deps.strip()[:200]}")
    found = sorted(cache_dir.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    progress(f"kernel: apt-get download {package}")
    proc = subprocess.run(["apt-get", "download", "-q", package], cwd=cache_dir, capture_output=True, text=True)
    found = sorted(cache_dir.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not found:
        raise ImageError(f"apt-get download {package} failed: {proc.stderr.strip()[-500:]}")
    return found[-1]


def vmlinux_from_bzimage(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage: its payload, decompressed (xz or gzip, as Debian builds)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage (no HdrS boot header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)  # payload_offset, payload_length
    payload = bzimage[(setup_sects + 1) * 512 + offset:][:length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    else:
        raise ImageError(f"the bzImage payload is compressed in a way this build cannot undo (starts {payload[:6].hex()})")
    if not elf.startswith(b"\x7fELF"):
        raise ImageError("the bzImage payload is not an ELF kernel")
    return elf


def unpack_kernel(deb: Path, work: Path) -> tuple[str, bytes, dict[str, Path]]:
    """(kernel version, vmlinux, module name -> .ko) from a linux-image .deb."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work)], check=True)
    vmlinuz = sorted((work / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise ImageError(f"{deb.name} holds no /boot/vmlinuz-*")
    version = vmlinuz[-1].name.removeprefix("vmlinuz-")
    modules = {p.name.removesuffix(".ko"): p for p in (work / "lib/modules" / version).rglob("*.ko")}
    return version, vmlinux_from_bzimage(vmlinuz[-1].read_bytes()), modules


# -- 2. the initramfs ---------------------------------------------------------------------------

def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One newc cpio record (what the kernel's initramfs unpacker reads)."""
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    pad = lambda n: b"\0" * (-n % 4)  # noqa: E731
    return head + namez + pad(len(head) + len(namez)) + data + pad(len(data))


def load_order(wanted: list[str], modules: dict[str, Path], skip: tuple[str, ...] = ()) -> list[str]:
    """``wanted`` with their dependencies, each after what it depends on (what modprobe would do)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name in skip:
            return
        path = modules.get(name) or modules.get(name.replace("_", "-"))
        if path is None:
            raise ImageError(f"the kernel package lacks the module {name}, which the guest needs")
        info = path.read_bytes()
        at = info.find(b"\0depends=")
        deps = info[at + 9:info.index(b"\0", at + 1)].decode() if at >= 0 else ""
        for dep in filter(None, deps.split(",")):
            visit(dep)
        order.append(path.name.removesuffix(".ko"))

    for name in wanted:
        visit(name)
    return order


def initramfs(modules: dict[str, Path], busybox: Path) -> bytes:
    base = load_order(MODULES, modules)
    vsock = load_order(VSOCK_MODULES, modules, skip=tuple(base))
    entries = [("dev", 0o40755), ("proc", 0o40755), ("sys", 0o40755), ("newroot", 0o40755), ("bin", 0o40755),
               ("modules", 0o40755)]
    out = [_cpio_entry(name, mode, ino=i + 1) for i, (name, mode) in enumerate(entries)]
    out.append(_cpio_entry("dev/console", 0o20600, rdev=(5, 1), ino=50))
    files = [("init", 0o100755, INIT_SCRIPT.encode()), ("bin/busybox", 0o100755, busybox.read_bytes()),
             ("modules/order", 0o100644, "\n".join(base).encode() + b"\n"),
             ("modules/vsock", 0o100644, "\n".join(vsock).encode() + b"\n")]
    files += [(f"modules/{m}.ko", 0o100644, modules[m].read_bytes()) for m in base + vsock]
    out += [_cpio_entry(name, mode, data, ino=100 + i) for i, (name, mode, data) in enumerate(files)]
    out.append(_cpio_entry("TRAILER!!!", 0))
    return gzip.compress(b"".join(out), compresslevel=6, mtime=0)


def busybox_static() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(candidate)
        if p.exists() and b"ld-linux" not in p.read_bytes()[:4096 * 4]:
            return p
    raise ImageError("no static busybox for the initramfs (Debian: apt-get install busybox-static)")


def kernel_and_initramfs(out_dir: Path, progress: Progress) -> tuple[Path, Path]:
    deb = kernel_deb(out_dir, progress)
    busybox = busybox_static()
    key = _sha(f"{VM_LAYOUT}\0{deb.name}\0{INIT_SCRIPT}\0".encode() + _sha(busybox.read_bytes()).encode())[:16]
    vmlinux_path = out_dir / f"vmlinux-{deb.name.split('_')[1]}"
    initrd_path = out_dir / f"initramfs-{key}.img"
    if vmlinux_path.exists() and initrd_path.exists():
        progress(f"kernel and initramfs: already built ({vmlinux_path.name}, {initrd_path.name})")
        return vmlinux_path, initrd_path
    with tempfile.TemporaryDirectory(dir=out_dir, prefix="kernel-") as tmp:
        version, elf, modules = unpack_kernel(deb, Path(tmp))
        progress(f"kernel: {version} unpacked to an ELF vmlinux ({len(elf) >> 20} MiB)")
        _write(vmlinux_path, elf)
        _write(initrd_path, initramfs(modules, busybox))
    return vmlinux_path, initrd_path


# -- 3. rootfs.ext4 -----------------------------------------------------------------------------

def rootfs(out_dir: Path, runtimes_dir: Path, image_cache: Path, progress: Progress) -> Path:
    adds = image.additions(runtimes_dir)
    init_source = Path(__file__).with_name("guest_init.py").read_bytes()
    anyip_source = (Path(__file__).parents[1] / "egress" / "anyip.py").read_bytes()
    key = _sha(f"{VM_LAYOUT}\0{image.content_hash(adds)}\0".encode() + init_source + b"\0" + anyip_source)[:16]
    path = out_dir / f"rootfs-{key}.ext4"
    if image.reuse(path, "rootfs", progress):
        return path
    image.require("mkfs.ext4", "e2fsprogs")
    base = image.base_tar(image_cache, progress)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix="rootfs-") as tmp:
        tar = Path(tmp) / "image.tar"
        image.image_tar(base, adds, tar)
        tree = Path(tmp) / "tree"
        tree.mkdir()
        subprocess.run(["tar", "--numeric-owner", "-C", str(tree), "-xf", str(tar)], check=True)
        tar.unlink()
        (tree / INIT_IN_ROOTFS.lstrip("/")).write_bytes(init_source)
        os.chmod(tree / INIT_IN_ROOTFS.lstrip("/"), 0o755)
        (tree / ANYIP_IN_ROOTFS.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tree / ANYIP_IN_ROOTFS.lstrip("/")).write_bytes(anyip_source)
        for d in ("bundle", "tmp", "run", "proc", "sys", "dev"):
            (tree / d).mkdir(exist_ok=True)
        used = int(subprocess.run(["du", "-sxm", str(tree)], capture_output=True, text=True, check=True).stdout.split()[0])
        size_mb = used + used // 5 + 32
        progress(f"rootfs: mkfs.ext4 -d ({used} MiB of files, {size_mb} MiB image)")
        partial = path.with_suffix(".partial")
        proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "atrun-root", "-d", str(tree),
                               str(partial), f"{size_mb}M"], capture_output=True, text=True)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ImageError(f"mkfs.ext4 failed: {proc.stderr.strip()[-500:]}")
        partial.rename(path)
    path.with_suffix(".json").write_text(json.dumps({"runtimes": image.runtimes_hash(runtimes_dir)}))
    return path


def runtimes_of(rootfs_path: Path) -> str | None:
    """The runtime-directory hash a rootfs was built with (None if it was not built here)."""
    try:
        return json.loads(Path(os.path.realpath(rootfs_path)).with_suffix(".json").read_text())["runtimes"]
    except (OSError, ValueError, KeyError):
        return None


def _write(path: Path, data: bytes) -> None:
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(path)


def _link(name: Path, target: Path) -> None:
    tmp = name.with_name(name.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    tmp.rename(name)


def _prune(out_dir: Path, keep: set[str]) -> None:
    """Earlier builds go (a rootfs is hundreds of MiB). A running VM keeps its open image alive
    until it ends: unlinking a file does not take it from a process that has it open."""
    for pattern in ("vmlinux-*", "initramfs-*.img", "rootfs-*.ext4", "rootfs-*.json", "linux-image-*.deb"):
        for old in out_dir.glob(pattern):
            if old.name not in keep:
                old.unlink(missing_ok=True)


def build(runtimes_dir: Path, out_dir: Path = DEFAULT_DIR, image_cache: Path = image.DEFAULT_CACHE,
          progress: Progress = print) -> dict[str, str]:
    """Build (or find) the kernel, initramfs and rootfs.ext4; returns their stable paths."""
    if os.geteuid() != 0:
        raise ImageError("building the VM root filesystem needs root (its files belong to root and other users)")
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    vmlinux, initrd = kernel_and_initramfs(out_dir, progress)
    root = rootfs(out_dir, runtimes_dir, image_cache, progress)
    paths = {"kernel": out_dir / "vmlinux", "initramfs": out_dir / "initramfs.img", "rootfs": out_dir / "rootfs.ext4"}
    for name, target in zip(paths.values(), (vmlinux, initrd, root), strict=True):
        _link(name, target)
    _prune(out_dir, keep={vmlinux.name, initrd.name, root.name, root.with_suffix(".json").name, kernel_deb(out_dir, progress).name})
    progress(f"VM guest ready in {time.monotonic() - started:.1f} s: {root}")
    return {k: str(v) for k, v in paths.items()}


__all__ = ["build", "runtimes_of", "vmlinux_from_bzimage", "DEFAULT_DIR"]
