"""Commands about the host a runner runs on: doctor (what works here), image build (the
container image and the microVM guest), schema (the at-run-exec protocol), and completion (the
shell's, for every command)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from atrund.cli.group import emit, err, executor_settings, load_config, main, print_json
from atrund.errors import ExecutorError


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Probe with this configuration's executor settings.")
def doctor(config_path: Path | None) -> None:
    """Probe this host: which executor backends really work, why not, and which auto picks."""
    import ctypes.util
    import os
    import shutil
    import subprocess

    from rich.table import Table

    from atrund.execute.microvm.backend import host_support
    from atrund.execute.probe import landlock_abi, probe_sync
    from atrund.execute.process.backend import Cgroups, seccomp_mode
    from atrund.execute.runtimes import load_runtimes

    settings = executor_settings(config_path, warm=0)
    out = Console(highlight=False)
    abi = landlock_abi()
    out.print(f"Landlock ABI: {abi if abi > 0 else 'not available'}")
    for tool in ("unshare", "setpriv"):
        out.print(f"{tool}: {shutil.which(tool) or 'missing'}")
    seccomp = ctypes.util.find_library("seccomp")
    out.print(f"libseccomp: {seccomp or 'missing (the process backend then runs without its syscall filter)'}")
    if seccomp:
        out.print(f"seccomp (process): {settings.process.seccomp} (executor.process.seccomp; "
                  + ("each runtime's syscalls file, the rest EPERM)" if settings.process.seccomp == "allowlist"
                     else "all but the dangerous few)"))
    out.print(f"seccomp (container): {settings.container.seccomp} (executor.container.seccomp; "
              + ("the process backend's allowlist as the container's profile)" if settings.container.seccomp == "allowlist"
                 else "the engine's default profile)") + (", not applied under runsc (gVisor's own kernel)"
                                                          if settings.container.runtime == "runsc" else ""))
    out.print("cgroups (v1 memory, pids): " + ("per-worker limits" if Cgroups().available
                                               else "not writable (the process backend then limits each process only)"))
    out.print("runner user: " + _user_summary(config_path))
    out.print("process fork server: " + _fork_server_summary(settings))
    out.print("network egress: " + _egress_summary())
    out.print("Docker engine: " + _engine_summary(settings))
    vm = host_support(settings)
    out.print(f"microVM monitor: {vm.monitor or 'none'}; accelerator: {vm.accelerator or 'none'} ({vm.detail})")
    runtimes = Table(title="runtimes")
    for col in ("runtime", "program", "version", "seccomp (process)"):
        runtimes.add_column(col)
    for name, rt in load_runtimes(settings.runtimes_dir).items():
        # The runtime's own binary: the last executable the command names outside the runtime directory.
        program = next((w for w in reversed(rt.command) if os.path.isabs(w) and os.access(w, os.X_OK)
                        and not w.startswith(str(rt.dir))), rt.command[0])
        try:
            version = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired) as e:
            version = f"[red]not runnable: {e}[/red]"
        runtimes.add_row(name, program, version, seccomp_mode(rt, settings.process.seccomp) if seccomp else "none (no libseccomp)")
    out.print(runtimes)
    probes = probe_sync(settings)
    chosen = next((p.backend for p in probes if p.ok and p.auto), None)
    table = Table(title="executor backends (strongest first)")
    for col in ("backend", "works", "ms", "detail"):
        table.add_column(col)
    for p in probes:
        mark = "[green]yes[/green]" if p.ok else "[red]no[/red]"
        table.add_row(p.backend + (" ← auto" if p.backend == chosen else ""), mark, str(p.ms or ""), p.detail)
    out.print(table)
    if chosen == "none":
        out.print("[yellow]auto would run bundles WITHOUT a sandbox (none)[/yellow]")
    elif chosen is None:
        raise ExecutorError("no executor backend works on this host")


def _user_summary(config_path: Path | None) -> str:
    """One line for doctor: the uid `atrund serve` runs as ([runner] user, privsep.py)."""
    import os

    from atrund.privsep import user_ids

    user = load_config(config_path).runner.user if config_path else None
    if user is None:
        return f"uid {os.geteuid()} (runner.user unset: serve keeps the uid it is started with)"
    try:
        uid, gid = user_ids(user)
    except Exception as e:  # noqa: BLE001 - doctor reports every failure, whatever it is
        return f"[red]{e}[/red]"
    return f"{user} = {uid}:{gid} (serve starts as root, starts its privileged helper, and drops to it)"


def _fork_server_summary(settings) -> str:
    """One line for doctor: whether the process backend's workers come from its fork server."""
    import asyncio

    from atrund.execute.process.forked import start_check

    if not settings.process.fork_server:
        return "off (executor.process.fork_server = false): each worker execs a fresh sandbox and interpreter"
    problem = asyncio.run(start_check(settings))
    return "starts (fast cold starts)" if problem is None else f"[yellow]{problem}: workers start by the exec path (slower)[/yellow]"


def _egress_summary() -> str:
    """One line for doctor: how each backend lets a worker granted network out."""
    from atrund.execute.egress.netns import check

    problem = check()
    if problem is not None:
        return f"[red]{problem}: a process or container worker granted network cannot start[/red]"
    return ("proxy (process and container: a network namespace per worker granted network, whose only "
            "way out is the runner's egress proxy); microvm: the same proxy, through the guest's relay")


def _engine_summary(settings) -> str:
    """One line for doctor: the engine, its OCI runtimes, and whether the runtime image is there."""
    from atrund.execute.container import image as image_mod

    try:
        client = image_mod.connect(settings.container.docker_host)
        try:
            info = client.info()
            labels = image_mod.describe(client, settings.container.image)
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - doctor reports every failure, whatever it is
        return f"not available ({str(e)[:200]})"
    if labels is None:
        img = f"image {settings.container.image} missing (atrund image build)"
    elif labels.get(image_mod.LABEL_RUNTIMES) != image_mod.runtimes_hash(settings.runtimes_dir):
        img = f"image {settings.container.image} is stale (atrund image build)"
    else:
        img = f"image {settings.container.image} current"
    return f"{info.get('ServerVersion')}, runtimes {', '.join(info.get('Runtimes') or {})}; {img}"


@main.group()
def image() -> None:
    """The runtime images: the container backend's, and the microVM guest (kernel, initramfs, rootfs.ext4)."""


@image.command("build")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Take executor.container.docker_host, executor.container.image and executor.runtimes_dir from this "
                   "configuration.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the Debian rootfs tar is cached between builds  [default: /var/cache/atrund/image]")
@click.option("--container/--no-container", default=True, show_default=True,
              help="Build the container image (needs a Docker engine).")
@click.option("--vm/--no-vm", default=True, show_default=True,
              help="Build the microVM guest: vmlinux, initramfs.img and rootfs.ext4 from the same rootfs.")
@click.option("--vm-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the microVM guest goes  [default: /var/cache/atrund/vm]")
def image_build(config_path: Path | None, cache_dir: Path | None, container: bool, vm: bool, vm_dir: Path | None) -> None:
    """Build the runtime image: a Debian rootfs (debootstrap) with python3, deno, node and the
    at-run-exec programs, imported into the Docker engine and tagged with a hash of its inputs;
    and from the same rootfs the microVM guest (rootfs.ext4, with the guest kernel and initramfs).
    Reruns with the same inputs take seconds. Prints the image's tags and the guest's paths as JSON."""
    from atrund.execute.container import image as image_mod

    settings = executor_settings(config_path)
    progress = lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    out: dict = {}
    if vm:
        from atrund.execute.microvm import guest as vmimage

        out["vm"] = vmimage.build(settings.runtimes_dir, vm_dir or vmimage.DEFAULT_DIR, cache_dir or image_mod.DEFAULT_CACHE,
                                  progress=progress)
    if not container:
        emit(out)
        return
    client = image_mod.connect(settings.container.docker_host)
    try:
        tag = image_mod.build(client, settings.runtimes_dir, cache_dir or image_mod.DEFAULT_CACHE, progress=progress)
        tags = [tag, image_mod.DEFAULT_IMAGE]
        if settings.container.image not in tags:  # the configuration names its own tag: point it here too
            from docker.utils import parse_repository_tag

            repository, version = parse_repository_tag(settings.container.image)
            client.images.get(tag).tag(repository, version or "latest")
            tags.append(settings.container.image)
    finally:
        client.close()
    emit({"image": tag, "tags": tags, **out})


@main.command()
def schema() -> None:
    """Print the JSON Schema of the at-run-exec protocol (ExecRequest, ExecResponse)."""
    from atrund.execute.protocol import schema as exec_schema

    print_json(exec_schema())


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL; e.g. `eval "$(atrund completion bash)"` in ~/.bashrc,
    or `atrund completion fish > ~/.config/fish/completions/atrund.fish`."""
    from click.shell_completion import get_completion_class

    click.echo(get_completion_class(shell)(main, {}, "atrund", "_ATRUND_COMPLETE").source())
