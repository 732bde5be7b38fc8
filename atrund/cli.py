"""The atrund command line: the daemon for operators, and the inner loop for authors.

JSON results go to stdout (pipe them to jq); progress and errors go to stderr.
"""

from __future__ import annotations

import asyncio
import functools
import json
import mimetypes
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from atrund import __version__
from atrund import config as config_mod
from atrund.errors import AtrundError, NotFound
from atrund.records import BUNDLE, INVOCATION, RESULT, Result, decode_data, now_iso, result_rkey, result_uri

err = Console(stderr=True, highlight=False)

CODE_MIME = {".py": "text/x-python", ".ts": "application/typescript", ".js": "text/javascript",
             ".mjs": "text/javascript"}  # mimetypes calls .ts an MPEG stream
EXIT_NOT_SUCCESS = 3  # invoke --wait: the result's status is not success
EXIT_NO_RESULT = 4  # invoke --wait: no result before the wait ran out


def run_async(fn):
    """Run an async click command; our own errors become one clear line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return asyncio.run(fn(*args, **kwargs))
        except AtrundError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def parse_uri(value: str, hint: str) -> tuple[str, str, str]:
    from atrund.bundles import split_uri

    try:
        return split_uri(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=hint) from None


def parse_args_json(value: str) -> dict[str, Any]:
    try:
        args = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="--args") from None
    if not isinstance(args, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"name\": \"ada\"}'", param_hint="--args")
    return args


@click.group()
@click.version_option(__version__, prog_name="atrund")
def main() -> None:
    """Social cloud hosting on the AT Protocol."""
    from atrund import log

    log.setup("warning")  # stdout carries JSON results; logs go to stderr (serve sets its own level)


# -- operator ----------------------------------------------------------------------------

config_option = click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
                             required=True, help="The runner's TOML configuration.")


def _load_config(path: Path) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as e:
        raise click.ClickException(f"{path}: invalid configuration:\n{e}") from None


@main.command("check-config")
@config_option
def check_config(config_path: Path) -> None:
    """Validate a configuration file; errors name the TOML key."""
    cfg = _load_config(config_path)
    err.print(f"[green]ok[/green]: {config_path} (runner {cfg.runner.identifier} on {cfg.runner.pds}, "
              f"access {cfg.access.mode}, isolation {cfg.executor.isolation})")


@main.command()
@config_option
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--json-logs/--console-logs", default=None, help="Log format; JSON when stderr is not a terminal.")
def serve(config_path: Path, log_level: str, json_logs: bool | None) -> None:
    """Run the runner: publish its record, poll for invocations, write results."""
    from atrund import log
    from atrund.daemon import Daemon

    cfg = _load_config(config_path)
    log.setup(log_level, json_logs)

    async def serve_until_signalled() -> None:
        daemon = Daemon(cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await daemon.start()
            await daemon.run(stop)
        finally:
            await daemon.close()

    run_async(serve_until_signalled)()


# -- authors -----------------------------------------------------------------------------

@main.command("exec")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--runtime", required=True, help="python, deno or node (any directory under nix/runtimes/)")
@click.option("--endpoint", required=True, help="The function to call.")
@click.option("--args", "args_json", default="{}", show_default=True, help="JSON object passed to the endpoint.")
@click.option("--timeout", type=int, default=30, show_default=True, help="Seconds before the run is killed.")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Use this runner configuration's executor settings.")
@click.option("--isolation", type=click.Choice(["auto", "none", "process", "container", "firecracker"]), default=None,
              help="Executor backend (default: the config's, else auto).")
@click.option("--allow-net", default="", help="Comma-separated hosts (host or host:port) the bundle may reach.")
@click.option("--allow-read", default="", help="Comma-separated paths the bundle may read.")
@click.option("--allow-write", default="", help="Comma-separated paths the bundle may write.")
@click.option("--allow-env", default="", help="Comma-separated NAMES of environment variables passed through from yours.")
def exec_cmd(file: Path, runtime: str, endpoint: str, args_json: str, timeout: int, config_path: Path | None,
             isolation: str | None, allow_net: str, allow_read: str, allow_write: str, allow_env: str) -> None:
    """Run a bundle file locally, under the same fence a runner would use, and print the ExecResponse."""
    import os

    from atrund.execute import ExecRequest, create_executor
    from atrund.execute.protocol import ExecPermissions

    args = parse_args_json(args_json)
    settings = _load_config(config_path).executor if config_path else config_mod.ExecutorSection(warm=0)
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    permissions = ExecPermissions(net=split(allow_net), read=[str(Path(p).resolve()) for p in split(allow_read)],
                                  write=[str(Path(p).resolve()) for p in split(allow_write)], env=split(allow_env))
    env = {name: os.environ[name] for name in permissions.env if name in os.environ}

    async def once() -> dict[str, Any]:
        executor = create_executor(settings, isolation or settings.isolation)
        try:
            request = ExecRequest(code_path=str(file.resolve()), endpoint=endpoint, args=args, timeout=timeout,
                                  permissions=permissions, env=env)
            response = await executor.execute(request, runtime)
        finally:
            await executor.shutdown()
        return response.model_dump(by_alias=True, exclude_none=True)

    out = run_async(once)()
    emit(out)
    if not out.get("success"):
        sys.exit(EXIT_NOT_SUCCESS)


def author_options(fn):
    """Login options shared by the commands that write to the author's repo."""
    fn = click.option("--plc-url", envvar="ATRUND_PLC_URL", default="https://plc.directory", show_default=True,
                      help="PLC directory used to resolve DIDs [env ATRUND_PLC_URL].")(fn)
    fn = click.option("--password", envvar="ATRUND_PASSWORD", required=True,
                      help="App password [env ATRUND_PASSWORD].")(fn)
    fn = click.option("--identifier", envvar="ATRUND_IDENTIFIER", required=True,
                      help="Your handle or DID [env ATRUND_IDENTIFIER].")(fn)
    fn = click.option("--pds", envvar="ATRUND_PDS", default=None,
                      help="Your PDS URL [env ATRUND_PDS]; found from your DID document when omitted.")(fn)
    return fn


async def _login(pds: str | None, identifier: str, password: str, plc_url: str):
    from atrund.identity import Identities
    from atrund.session import Session

    if pds is None:
        if not identifier.startswith("did:"):
            raise click.UsageError("give --pds (or ATRUND_PDS), or log in with your DID so the PDS can be looked up")
        identities = Identities(plc_url)
        try:
            pds = await identities.pds(identifier)
        finally:
            await identities.close()
    return await Session.login(pds, identifier, password)


@main.group()
def bundle() -> None:
    """Publish code bundles."""


@bundle.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--runtime", required=True, type=click.Choice(["python", "deno", "node"]))
@click.option("--name", default=None, help="A short name (defaults to the file name).")
@click.option("--description", default=None)
@click.option("--endpoints", default=None, help="Comma-separated endpoint names the bundle offers.")
@author_options
@run_async
async def bundle_publish(file: Path, runtime: str, name: str | None, description: str | None, endpoints: str | None,
                         pds: str | None, identifier: str, password: str, plc_url: str) -> None:
    """Upload FILE as a blob and create a dev.atrun.bundle record; prints its AT URI and CID."""
    session = await _login(pds, identifier, password, plc_url)
    try:
        mime = CODE_MIME.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        blob = await session.upload_blob(file.read_bytes(), mime)
        record: dict[str, Any] = {"runtime": runtime, "code": blob, "name": name or file.name, "createdAt": now_iso()}
        if description:
            record["description"] = description
        if endpoints:
            record["endpoints"] = [e.strip() for e in endpoints.split(",") if e.strip()]
        uri, cid = await session.create_record(BUNDLE, record)
    finally:
        await session.close()
    err.print(f"published [bold]{record['name']}[/bold] ({blob['size']} bytes)")
    emit({"uri": uri, "cid": cid})


@main.command()
@click.argument("bundle_uri")
@click.option("--runner", "runner_did", required=True, help="DID of the runner to ask.")
@click.option("--endpoint", required=True)
@click.option("--args", "args_json", default="{}", show_default=True, help="JSON object passed to the endpoint.")
@click.option("--cid", default=None, help="Pin this bundle version; the current one when omitted.")
@click.option("--timeout", type=int, default=None, help="Seconds the run may take (capped by the runner).")
@click.option("--wait/--no-wait", default=False, help="Wait for the result record and print it.")
@click.option("--wait-seconds", type=float, default=120, show_default=True)
@author_options
@run_async
async def invoke(bundle_uri: str, runner_did: str, endpoint: str, args_json: str, cid: str | None, timeout: int | None,
                 wait: bool, wait_seconds: float, pds: str | None, identifier: str, password: str, plc_url: str) -> None:
    """Create a dev.atrun.invocation of BUNDLE_URI; prints its URI and where the result will be."""
    from atrund.identity import Identities
    from atrund.repos import Repos

    args = parse_args_json(args_json)
    b_did, b_coll, b_rkey = parse_uri(bundle_uri, "BUNDLE_URI")
    repos = Repos(Identities(plc_url))
    try:
        session = await _login(pds, identifier, password, plc_url)
        try:
            if cid is None:
                cid, _ = await repos.get_record(b_did, b_coll, b_rkey)
            record: dict[str, Any] = {"runner": runner_did, "bundle": {"uri": bundle_uri, "cid": cid},
                                      "endpoint": endpoint, "args": args, "createdAt": now_iso()}
            if timeout is not None:
                record["timeout"] = timeout
            uri, inv_cid = await session.create_record(INVOCATION, record)
        finally:
            await session.close()
        out: dict[str, Any] = {"invocation": {"uri": uri, "cid": inv_cid}, "result": result_uri(runner_did, uri)}
        if not wait:
            emit(out)
            return
        err.print(f"invoked {endpoint} → waiting for [bold]{out['result']}[/bold]")
        found = await _wait_for_result(repos, runner_did, uri, wait_seconds)
    finally:
        await repos.close()
    if found is None:
        emit(out)
        err.print(f"[yellow]no result after {wait_seconds:g} s[/yellow]")
        sys.exit(EXIT_NO_RESULT)
    out.update(found)
    emit(out)
    if found["status"] != "success":
        sys.exit(EXIT_NOT_SUCCESS)


async def _wait_for_result(repos, runner_did: str, invocation_uri: str, wait_seconds: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait_seconds
    delay = 0.1
    while time.monotonic() < deadline:
        try:
            cid, value = await repos.get_record(runner_did, RESULT, result_rkey(invocation_uri))
            return _describe_result(cid, value)
        except NotFound:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
    return None


def _describe_result(cid: str, value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"cid": cid, "status": value.get("status"), "record": value}
    if "data" in value:
        out["value"] = decode_data(value["data"])
    return out


@main.group()
def result() -> None:
    """Read result records."""


@result.command("get")
@click.argument("at_uri")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default="https://plc.directory", show_default=True)
@run_async
async def result_get(at_uri: str, plc_url: str) -> None:
    """Print the result record at AT_URI (anyone can; no login)."""
    from atrund.identity import Identities
    from atrund.repos import Repos

    did, coll, rkey = parse_uri(at_uri, "AT_URI")
    repos = Repos(Identities(plc_url))
    try:
        cid, value = await repos.get_record(did, coll, rkey)
    finally:
        await repos.close()
    Result.model_validate(value)  # says clearly if this is not a result record
    emit({"uri": at_uri, **_describe_result(cid, value)})


@result.command("uri")
@click.argument("invocation_uri")
@click.option("--runner", "runner_did", required=True)
def result_uri_cmd(invocation_uri: str, runner_did: str) -> None:
    """Print where the result of INVOCATION_URI will appear (computable before it exists)."""
    click.echo(result_uri(runner_did, invocation_uri))


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Probe with this configuration's executor settings.")
def doctor(config_path: Path | None) -> None:
    """Probe this host: which executor backends really work, why not, and which auto picks."""
    import os
    import shutil
    import subprocess

    from rich.table import Table

    from atrund.execute.probe import landlock_abi, probe_sync
    from atrund.execute.runtimes import load_runtimes

    settings = _load_config(config_path).executor if config_path else config_mod.ExecutorSection(warm=0)
    out = Console(highlight=False)
    abi = landlock_abi()
    out.print(f"Landlock ABI: {abi if abi > 0 else 'not available'}")
    for tool in ("unshare", "setpriv"):
        out.print(f"{tool}: {shutil.which(tool) or 'missing'}")
    import ctypes.util

    seccomp = ctypes.util.find_library("seccomp")
    out.print(f"libseccomp: {seccomp or 'missing (the process backend then runs without its syscall filter)'}")
    from atrund.execute.process import Cgroups

    out.print("cgroups (v1 memory, pids): " + ("per-worker limits" if Cgroups().available
                                               else "not writable (the process backend then limits each process only)"))
    out.print("Docker engine: " + _engine_summary(settings))
    from atrund.execute.microvm import host_support

    vm = host_support(settings)
    out.print(f"microVM monitor: {vm.monitor or 'none'}; accelerator: {vm.accelerator or 'none'} ({vm.detail})")
    runtimes = Table(title="runtimes")
    for col in ("runtime", "program", "version"):
        runtimes.add_column(col)
    for name, rt in load_runtimes(settings.runtimes_dir).items():
        # The runtime's own binary: the last executable the command names outside the runtime directory.
        program = next((w for w in reversed(rt.command) if os.path.isabs(w) and os.access(w, os.X_OK)
                        and not w.startswith(str(rt.dir))), rt.command[0])
        try:
            version = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired) as e:
            version = f"[red]not runnable: {e}[/red]"
        runtimes.add_row(name, program, version)
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
        raise click.ClickException("no executor backend works on this host")


@main.group()
def image() -> None:
    """The runtime images: the container backend's, and the microVM guest (kernel, initramfs, rootfs.ext4)."""


@image.command("build")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Take executor.docker_host, executor.image and executor.runtimes_dir from this configuration.")
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
    from atrund import image as image_mod

    settings = _load_config(config_path).executor if config_path else config_mod.ExecutorSection()
    out: dict = {}
    if vm:
        from atrund import vmimage

        try:
            out["vm"] = vmimage.build(settings.runtimes_dir, vm_dir or vmimage.DEFAULT_DIR, cache_dir or image_mod.DEFAULT_CACHE,
                                      progress=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True))
        except AtrundError as e:
            raise click.ClickException(str(e)) from None
    if not container:
        emit(out)
        return
    try:
        client = image_mod.connect(settings.docker_host)
        tag = image_mod.build(client, settings.runtimes_dir, cache_dir or image_mod.DEFAULT_CACHE,
                              progress=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True))
        tags = [tag, image_mod.DEFAULT_IMAGE]
        if settings.image not in tags:  # the configuration names its own tag: point it here too
            from docker.utils import parse_repository_tag

            repository, version = parse_repository_tag(settings.image)
            client.images.get(tag).tag(repository, version or "latest")
            tags.append(settings.image)
    except AtrundError as e:
        raise click.ClickException(str(e)) from None
    emit({"image": tag, "tags": tags, **out})


def _engine_summary(settings) -> str:
    """One line for doctor: the engine, its OCI runtimes, and whether the runtime image is there."""
    from atrund import image as image_mod

    try:
        client = image_mod.connect(settings.docker_host)
        info = client.info()
        labels = image_mod.describe(client, settings.image)
    except Exception as e:  # noqa: BLE001 - doctor reports every failure, whatever it is
        return f"not available ({str(e)[:200]})"
    if labels is None:
        img = f"image {settings.image} missing (atrund image build)"
    elif labels.get(image_mod.LABEL_RUNTIMES) != image_mod.runtimes_hash(settings.runtimes_dir):
        img = f"image {settings.image} is stale (atrund image build)"
    else:
        img = f"image {settings.image} current"
    return f"{info.get('ServerVersion')}, runtimes {', '.join(info.get('Runtimes') or {})}; {img}"


@main.command()
def schema() -> None:
    """Print the JSON Schema of the at-run-exec protocol (ExecRequest, ExecResponse)."""
    from atrund.execute.protocol import schema as exec_schema

    emit(exec_schema())


if __name__ == "__main__":
    main()
