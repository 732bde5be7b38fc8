"""The container backend's runtime image, built locally (operators may have no image registry).

``atrund image build``:

1. a Debian rootfs: ``debootstrap --variant=minbase`` of bookworm from the Debian mirror this
   machine's apt sources name (or ``ATRUND_DEBIAN_MIRROR``), with
   python3 and ca-certificates, slimmed (docs, man pages, locales, apt caches) and tarred.
   This is the slow step (about a minute); its tar is cached under the cache directory, keyed
   by suite, mirror and package list, so it is made once per machine;
2. the image tar: that rootfs plus each runtime's own program as the host runs it (deno, node:
   the same versions as the other backends; each runtime.json's ``program`` says which and
   where it goes) and every runtime directory (at-run-exec programs) under
   /opt/atrund/runtimes;
3. ``docker import`` of that tar, tagged ``atrund-runtime:<content hash>`` and ``:latest``.
   The content hash covers everything that went in, so a rerun with the same inputs finds the
   tag and only re-points ``:latest`` (seconds).

The image is labelled with a hash of the runtime directories; the backend refuses an image
whose at-run-exec programs differ from the runner's (run ``atrund image build`` again).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atrund.errors import ExecutorError, ImageError
from atrund.execute.runtimes import Program, load_runtimes

SUITE = "bookworm"
MIRROR_ENV = "ATRUND_DEBIAN_MIRROR"  # overrides the apt sources, e.g. on a host that is not Debian bookworm
APT_SOURCES = Path("/etc/apt")
PACKAGES = ("python3", "ca-certificates")
LAYOUT = 1  # bump when what goes into the image, or where, changes
REPOSITORY = "atrund-runtime"
DEFAULT_IMAGE = f"{REPOSITORY}:latest"
DEFAULT_CACHE = Path("/var/cache/atrund/image")

RUNTIMES_IN_IMAGE = "/opt/atrund/runtimes"
PYTHON_IN_IMAGE = "/usr/bin/python3"  # {python}: Debian's; a runtime's own program is where its runtime.json says
LABEL_IMAGE = "dev.atrun.image"
LABEL_RUNTIMES = "dev.atrun.runtimes"

# Removed from the rootfs: nothing at-run-exec or a bundle needs.
SLIM = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt",
        "var/lib/apt/lists", "var/log", "usr/share/lintian", "usr/share/common-licenses"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Addition:
    """One host file that goes into the image."""

    path: str  # inside the image
    source: Path
    mode: int


def runtimes_hash(runtimes_dir: Path) -> str:
    """A hash of every file of every runtime directory: what the image label is checked against."""
    h = hashlib.sha256()
    for f in _runtime_files(runtimes_dir):
        h.update(str(f.relative_to(runtimes_dir)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _runtime_files(runtimes_dir: Path) -> list[Path]:
    return sorted(f for meta in runtimes_dir.glob("*/runtime.json") for f in meta.parent.rglob("*") if f.is_file())


def programs(runtimes_dir: Path) -> list[Program]:
    """The runtimes' own programs (deno, node: each runtime.json's ``program``), each once."""
    try:
        runtimes = load_runtimes(runtimes_dir)
    except ExecutorError as e:
        raise ImageError(str(e)) from e
    found: dict[str, Program] = {}
    for rt in runtimes.values():
        if rt.program is not None:
            found.setdefault(rt.program.in_image, rt.program)
    return list(found.values())


def additions(runtimes_dir: Path) -> list[Addition]:
    """What goes into the image besides the Debian rootfs: the host's copy of each runtime's
    program (the same versions as the other backends run), then every runtime directory."""
    out = []
    for program in programs(runtimes_dir):
        found = shutil.which(program.find())
        if not found:
            raise ImageError(f"no {program.name} binary on this host to put into the image (install it; see README)")
        out.append(Addition(program.in_image, Path(os.path.realpath(found)), 0o755))
    for f in _runtime_files(runtimes_dir):
        mode = 0o755 if os.access(f, os.X_OK) else 0o644
        out.append(Addition(f"{RUNTIMES_IN_IMAGE}/{f.relative_to(runtimes_dir)}", f, mode))
    return out


def mirror(apt_dir: Path = APT_SOURCES) -> str:
    """The Debian mirror to debootstrap from: ``ATRUND_DEBIAN_MIRROR``, else the first ``deb``
    source for SUITE in this machine's apt configuration (sources.list, and sources.list.d in
    both the one-line ``.list`` and the deb822 ``.sources`` format). Read from the machine, never
    written into the code: operators' mirrors and proxies apply as they do to apt itself."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV].rstrip("/")
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for types, uris, suites in _apt_entries(text, deb822=path.suffix == ".sources"):
            if "deb" in types and SUITE in suites and uris:
                return uris[0].rstrip("/")
    raise ImageError(f"no Debian {SUITE} mirror in {apt_dir}/sources.list or sources.list.d: add one "
                     f"(deb http://<mirror>/debian {SUITE} main), or set {MIRROR_ENV}=http://<mirror>/debian")


def _apt_entries(text: str, deb822: bool) -> list[tuple[list[str], list[str], list[str]]]:
    """(types, URIs, suites) of each enabled entry of an apt sources file."""
    # A comment line is dropped, not blanked: in deb822 a blank line would end the stanza.
    lines = [line.split("#", 1)[0].rstrip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    if not deb822:  # deb [options] URI suite component...
        entries = []
        for line in lines:
            words = line.split()
            if words and words[0] in ("deb", "deb-src"):
                rest = words[1:]
                if rest and rest[0].startswith("["):  # [arch=amd64 signed-by=...]
                    while rest and not rest[0].endswith("]"):
                        rest = rest[1:]
                    rest = rest[1:]
                if len(rest) >= 2:
                    entries.append(([words[0]], [rest[0]], [rest[1]]))
        return entries
    entries, fields = [], {}
    for line in [*lines, ""]:
        if not line.strip():  # a blank line ends a stanza
            if fields and fields.get("enabled", "yes").lower() != "no":
                entries.append((fields.get("types", "").split(), fields.get("uris", "").split(), fields.get("suites", "").split()))
            fields = {}
        elif ":" in line and not line[0].isspace():
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
    return entries


def base_key(source: str | None = None) -> str:
    """The rootfs tar's cache key: layout, suite, mirror (``source``, else read now) and packages."""
    return _sha(f"{LAYOUT}\0{SUITE}\0{source or mirror()}\0{','.join(PACKAGES)}".encode())[:16]


def content_hash(adds: list[Addition]) -> str:
    h = hashlib.sha256(base_key().encode())
    for a in adds:
        h.update(f"\0{a.path}\0{a.mode:o}\0".encode() + _file_sha(a.source).encode())
    return h.hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- step 1: the Debian rootfs ---------------------------------------------------------------

def reuse(path: Path, what: str, progress: Progress) -> bool:
    """Whether an artifact built from the same inputs (its name carries their hash) is there."""
    if path.exists():
        progress(f"{what}: already built ({path.name})")
        return True
    return False


def require(tool: str, package: str) -> None:
    """A build step's tool, or an ImageError naming the Debian package that has it."""
    if not shutil.which(tool):
        raise ImageError(f"{tool} is not installed (Debian/Ubuntu: apt-get install {package})")


def base_tar(cache_dir: Path, progress: Progress) -> Path:
    """The slimmed debootstrap rootfs as a tar, made once and cached."""
    source = mirror()  # the apt sources, read once for this build
    tar_path = cache_dir / f"base-{SUITE}-{base_key(source)}.tar"
    if reuse(tar_path, f"Debian {SUITE} rootfs", progress):
        return tar_path
    require("debootstrap", "debootstrap")
    if os.geteuid() != 0:
        raise ImageError("building the rootfs needs root (debootstrap creates device nodes and chroots)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        progress(f"Debian {SUITE} rootfs: debootstrap --variant=minbase from {source} (about a minute)")
        command = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), source]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        assert proc.stdout
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            if line.startswith(("I: Retrieving", "I: Extracting", "I: Installing", "I: Configuring")):
                progress("  " + line[3:])
        if proc.wait() != 0:
            raise ImageError(f"debootstrap failed (exit {proc.returncode}):\n" + "\n".join(tail))
        for rel in SLIM:
            shutil.rmtree(root / rel, ignore_errors=True)
        (root / "var/log").mkdir(exist_ok=True)
        progress("Debian rootfs: packing")
        partial = tar_path.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(tar_path)
    progress(f"Debian rootfs: {tar_path.stat().st_size >> 20} MiB in {time.monotonic() - started:.0f} s")
    return tar_path


# -- step 2: the image tar -------------------------------------------------------------------

def image_tar(base: Path, adds: list[Addition], out: Path) -> None:
    """The rootfs with the runtimes added (missing parent directories created, owned by root)."""
    shutil.copyfile(base, out)
    with tarfile.open(out, "a") as tar:
        # The engine refuses a tar that names a path twice: only directories the rootfs lacks.
        have = {m.name.removeprefix("./").rstrip("/") for m in tar.getmembers()}
        for a in adds:
            parts = a.path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in have:
                    have.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(a.path.strip("/"))
            info.size, info.mode = a.source.stat().st_size, a.mode
            with open(a.source, "rb") as f:
                tar.addfile(info, f)


# -- step 3: docker import --------------------------------------------------------------------

def connect(docker_host: str | None):
    """A Docker SDK client for the engine at ``docker_host`` (default $DOCKER_HOST, then the
    local socket), speaking the engine's API version."""
    import docker

    url = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        return docker.DockerClient(base_url=url, version="auto", timeout=600)
    except docker.errors.DockerException as e:
        raise ImageError(f"no Docker engine answers at {url}: {e} (start one; without systemd: bash scripts/dockerd)") from e


def build(client, runtimes_dir: Path, cache_dir: Path = DEFAULT_CACHE, progress: Progress = print) -> str:
    """Build (or find) the runtime image; returns its content-hash tag."""
    import docker.errors

    started = time.monotonic()
    adds = additions(runtimes_dir)
    digest = content_hash(adds)
    tag = f"{REPOSITORY}:{digest[:16]}"
    try:
        existing = client.images.get(tag)
    except docker.errors.ImageNotFound:
        existing = None
    except docker.errors.DockerException as e:
        raise ImageError(f"the Docker engine did not answer: {e}") from e
    if existing is None:
        base = base_tar(cache_dir, progress)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="image-") as tmp:
            out = Path(tmp) / "image.tar"
            names = [p.name for p in programs(runtimes_dir)]
            progress(f"image: adding {', '.join(names + [f'{len(adds) - len(names)} runtime files'])}")
            image_tar(base, adds, out)
            progress(f"image: docker import ({out.stat().st_size >> 20} MiB)")
            changes = [
                f"LABEL {LABEL_IMAGE}={digest}",
                f"LABEL {LABEL_RUNTIMES}={runtimes_hash(runtimes_dir)}",
                "ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8",
                "USER 65534:65534",
                "WORKDIR /tmp",
            ]
            try:
                with open(out, "rb") as f:
                    # The SDK streams the open file; import_image_from_file would read it whole into memory.
                    client.api.import_image_from_data(f, repository=REPOSITORY, tag=digest[:16], changes=changes)
            except docker.errors.DockerException as e:
                raise ImageError(f"docker import failed: {e}") from e
    else:
        progress(f"image {tag}: already built from these inputs")
    client.images.get(tag).tag(REPOSITORY, "latest")
    progress(f"image {tag} (also {DEFAULT_IMAGE}) ready in {time.monotonic() - started:.1f} s")
    return tag


def describe(client, image: str) -> dict[str, str] | None:
    """The image's atrund labels, or None if the engine has no such image."""
    import docker.errors

    try:
        return client.images.get(image).labels or {}
    except docker.errors.ImageNotFound:
        return None


__all__ = ["build", "describe", "runtimes_hash", "ImageError", "DEFAULT_IMAGE"]
