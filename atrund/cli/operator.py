"""Commands for a runner's operator: serve, check-config, access, quarantine, keys, and exec (a
bundle file run locally under the fence a runner would use)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from atrund import __version__
from atrund import config as config_mod
from atrund.cli import early
from atrund.cli.group import (
    EXIT_NOT_SUCCESS,
    config_option,
    emit,
    err,
    executor_settings,
    load_config,
    main,
    parse_args_json,
    run_async,
    split,
    warn,
)
from atrund.errors import QuarantineError, UnknownRuntime
from atrund.execute import ALIASES, NAMES
from atrund.execute.runtimes import declared


@main.command("check-config")
@config_option
def check_config(config_path: Path) -> None:
    """Validate a configuration file; errors name the TOML key. Also warns about what would stop
    or idle a runner started from here: no password to log in with, nobody to serve."""
    from atrund.errors import AtrundError, ConfigError

    cfg = load_config(config_path)
    try:
        cfg.runner.password()
    except ConfigError as e:
        warn(f"{e} (`atrund serve` would stop there)")
    if cfg.runner.user is not None:
        from atrund.errors import DropFailed
        from atrund.privsep import user_ids

        try:
            user_ids(cfg.runner.user)
        except DropFailed as e:
            warn(f"{e} (`atrund serve` would stop there)")
    if cfg.access.mode == "allowlist" and not cfg.access.allowlist:
        edits = _policy(cfg)
        try:
            allowed = edits.read().allow
        except AtrundError:  # unreadable: as good as empty for whom it serves
            allowed = frozenset()
        if not allowed:
            warn(f"access.allowlist is empty and {edits.where} allows no one: this runner serves nobody "
                 "(add DIDs or handles there, or `atrund access allow WHO`)")
    err.print(f"[green]ok[/green]: {config_path} (runner {cfg.runner.identifier} on {cfg.runner.pds}, "
              f"access {cfg.access.mode}, isolation {cfg.executor.isolation})")


@main.command()
@config_option
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--json-logs/--console-logs", default=None, help="Log format; JSON when stderr is not a terminal.")
def serve(config_path: Path, log_level: str, json_logs: bool | None) -> None:
    """Run the runner: publish its record, poll for invocations, write results, serve the HTTP gateway."""
    import structlog

    from atrund import log
    from atrund.app import App

    cfg = load_config(config_path)
    log.setup(log_level, json_logs)
    said = structlog.get_logger("atrund.serve")
    said.info("starting", version=__version__, config=str(config_path), pid=os.getpid())
    dropped = None
    if cfg.runner.user is not None:  # before the event loop: no thread exists yet
        from atrund.privsep import drop_privileges

        dropped = drop_privileges(cfg)

    async def serve_until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(log.asyncio_errors)

        def signalled(signum: int) -> None:
            if stop.is_set():  # the second one: do not wait for running work to drain
                err.print(f"{signal.Signals(signum).name} again: exiting now (running invocations will read as interrupted)")
                os._exit(128 + signum)
            said.info("signal received: stopping", signal=signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled, sig)
        for sig in early.signals:
            signalled(sig)
        daemon = App(cfg, dropped.helper, dropped.password) if dropped else App(cfg)
        # SIGHUP: re-read the configuration now ([access] and [permissions] apply while serving)
        loop.add_signal_handler(signal.SIGHUP, daemon.reload_soon)
        try:
            starting = asyncio.create_task(daemon.start())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not starting.done():  # a signal during start-up: stop without serving
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return
            starting.result()
            await daemon.run(stop)
        finally:
            await daemon.close()
            said.info("stopped")
        if daemon.fatal is not None:  # it stopped by itself: the exit code says why
            raise daemon.fatal

    run_async(serve_until_signalled)()


# -- access --------------------------------------------------------------------------------

@main.group()
def access() -> None:
    """Edit who this runner serves; a running daemon applies changes within a second."""


async def _did_of(who: str, cfg: config_mod.Config) -> str:
    if who.startswith("did:"):
        return who
    from atrund.atproto.identity import resolve_handle

    # The operator's own command, naming a handle they typed: not a request anyone else can aim.
    return await resolve_handle(who, cfg.runner.pds, allow_private_addresses=True)


def _policy(cfg: config_mod.Config):
    """The live edits: the policy file, or with state.url the database every replica reads."""
    from atrund.access import policy_at

    return policy_at(cfg.access_file, cfg.state.url)


async def _edit_policy(who: str, config_path: Path, act: str, done: str) -> tuple[config_mod.Config, str]:
    """`access allow|deny WHO`: resolve WHO, write it into the policy file (or database), say so."""
    cfg = load_config(config_path)
    did = await _did_of(who, cfg)
    edits = _policy(cfg)
    getattr(edits, act)(did)
    err.print(f"{done} {did}" + (f" ({who})" if who != did else "") + f" in {edits.where}")
    return cfg, did


@access.command("allow")
@click.argument("who", metavar="DID|HANDLE")
@config_option
@run_async
async def access_allow(who: str, config_path: Path) -> None:
    """Serve DID|HANDLE (in every mode; lifts an `access deny` of it)."""
    cfg, did = await _edit_policy(who, config_path, "allow", "allowed")
    if did in cfg.access.blocklist:
        err.print(f"[yellow]but {did} is in access.blocklist of {config_path}, which still wins: remove it there[/yellow]")
    elif cfg.access.mode in ("blocklist", "open"):
        err.print(f"(access.mode is {cfg.access.mode}: everyone not denied is served anyway)")


@access.command("deny")
@click.argument("who", metavar="DID|HANDLE")
@config_option
@run_async
async def access_deny(who: str, config_path: Path) -> None:
    """Never serve DID|HANDLE (wins over every allow, follow and list membership)."""
    await _edit_policy(who, config_path, "deny", "denied")


@access.command("list")
@config_option
@click.option("--members", is_flag=True, help="follows/list mode: also read the follows or the list now and print them.")
@run_async
async def access_list(config_path: Path, members: bool) -> None:
    """Print the access policy: mode, its source, and who is allowed and denied, and where it says so."""
    cfg = load_config(config_path)
    entries = _policy(cfg).read()
    a = cfg.access
    # the live edits' home: the policy file, or (replicas) the database; "from" says which
    out: dict[str, Any] = {"mode": a.mode}
    if cfg.state.url is None:
        out["policyFile"], edited = str(cfg.access_file), "policy file"
    else:
        out["policyDatabase"], edited = "state.url", "database"
    if a.mode in ("follows", "list"):
        source = a.list_uri if a.mode == "list" else a.operator or await _did_of(cfg.runner.identifier, cfg)
        out["trusted"] = {"of": source, "refreshSeconds": a.refresh_interval}
        if members:
            from atrund import client, trust

            async with client.reader(cfg.identity.plc_url, timeout=cfg.identity.timeout_seconds) as repos:
                found = await (trust.follows(repos, source) if a.mode == "follows" else trust.list_members(repos, source))
            out["trusted"]["members"] = sorted(found)
    out["allow"] = [{"did": d, "from": "config"} for d in a.allowlist] + \
        [{"did": d, "from": edited} for d in sorted(entries.allow) if d not in a.allowlist]
    out["deny"] = [{"did": d, "from": "config"} for d in a.blocklist] + \
        [{"did": d, "from": edited} for d in sorted(entries.deny) if d not in a.blocklist]
    emit(out)


# -- quarantine ----------------------------------------------------------------------------

@main.group()
def quarantine() -> None:
    """Items the runner could not process (a result the PDS refuses even as an error, a firehose
    frame or a listed record that broke processing): look at them, put them back, or drop them.
    Works while the runner runs; it takes a retry within a few seconds (else at its next start)."""


def _quarantine(config_path: Path):
    from atrund.quarantine import Quarantine

    cfg = load_config(config_path)
    path = cfg.state.dir / "quarantine.sqlite3"
    if not path.exists():
        raise QuarantineError(f"no quarantine at {path}: this runner has not quarantined anything (state.dir is "
                              f"{cfg.state.dir})")
    return Quarantine(path)


def _ids(ids: tuple[int, ...], every: bool) -> list[int] | None:
    if every == bool(ids):
        raise click.UsageError("give the IDs to act on (from `atrund quarantine list`), or --all")
    return None if every else list(ids)


@quarantine.command("list")
@config_option
@click.option("--kind", type=click.Choice(["result", "frame", "record"]), default=None, help="Only items of this kind.")
@click.option("--full", is_flag=True, help="Also print each item as held (a result record, a frame in base64, a record).")
def quarantine_list(config_path: Path, kind: str | None, full: bool) -> None:
    """Print the quarantined items, oldest first: id, kind, what it is about, why, when."""
    q = _quarantine(config_path)
    try:
        emit([{**held.summary(), **({"item": held.item} if full else {})} for held in q.list(kind)])
    finally:
        q.close()


def _quarantine_action(name: str, doc: str, act: str, done: str):
    """`atrund quarantine retry|drop IDS... | --all`: the same command, acting differently."""

    @quarantine.command(name, help=doc)
    @click.argument("ids", type=int, nargs=-1)
    @click.option("--all", "every", is_flag=True, help="Every quarantined item.")
    @config_option
    def command(ids: tuple[int, ...], every: bool, config_path: Path) -> None:
        q = _quarantine(config_path)
        try:
            n = getattr(q, act)(_ids(ids, every))
        finally:
            q.close()
        err.print(done.format(n=n))

    return command


quarantine_retry = _quarantine_action(
    "retry", "Put items back where they came from: a result onto the outbox, a frame or record into ingest.", "ask_retry",
    "{n} item(s) marked for retry; a running runner takes them within a few seconds (else at its next start)")
quarantine_drop = _quarantine_action("drop", "Forget items for good.", "drop", "dropped {n} item(s)")


# -- keys ----------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """The runner's key pair for sealed secrets."""


@keys.command("init")
@config_option
@click.option("--force", is_flag=True, help="Replace an existing key (what was sealed to it stops opening).")
def keys_init(config_path: Path, force: bool) -> None:
    """Create the runner's X25519 key (secrets.key_file, mode 0600); prints its id and public key.

    The runner publishes the public key in its dev.atrun.runner record at the next start.
    """
    from atrund.sealed import RunnerKey, generate_key_file, key_id, load_key_file

    cfg = load_config(config_path)
    generate_key_file(cfg.key_file, force=force)
    private = load_key_file(cfg.key_file)
    key = RunnerKey(key_id(private.public_key()), private.public_key())
    err.print(f"wrote {cfg.key_file} (mode 0600); restart the runner to publish it")
    emit({"keyFile": str(cfg.key_file), **key.to_record()})


# -- exec ----------------------------------------------------------------------------------

@main.command("exec")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--runtime", required=True,
              help=f"One of {', '.join(declared(config_mod.RUNTIMES_DIR))} (a directory under executor.runtimes_dir).")
@click.option("--endpoint", required=True, help="The function to call.")
@click.option("--args", "args_json", default="{}", show_default=True, help="JSON object passed to the endpoint.")
@click.option("--timeout", type=click.IntRange(min=1), default=30, show_default=True, help="Seconds before the run is killed.")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Use this runner configuration's executor settings.")
@click.option("--isolation", type=click.Choice(NAMES), default=None,
              help="Executor backend (default: the config's, else auto); firecracker is the old name of microvm.")
@click.option("--allow-net", default="", help="Comma-separated hosts (host or host:port) the bundle may reach.")
@click.option("--allow-private", default="", help="Comma-separated CIDR ranges of private or loopback addresses "
              "--allow-net may reach (as [permissions] net_private; process and container refuse them otherwise).")
@click.option("--allow-read", default="", help="Comma-separated paths the bundle may read.")
@click.option("--allow-write", default="", help="Comma-separated paths the bundle may write.")
@click.option("--allow-env", default="", help="Comma-separated NAMES of environment variables passed through from yours.")
def exec_cmd(file: Path, runtime: str, endpoint: str, args_json: str, timeout: int, config_path: Path | None,
             isolation: str | None, allow_net: str, allow_private: str, allow_read: str, allow_write: str,
             allow_env: str) -> None:
    """Run a bundle file locally, under the same fence a runner would use, and print the ExecResponse.

    What the bundle printed (its last executor.output_bytes) is echoed on stderr first."""
    from atrund.execute import ExecRequest, create_executor
    from atrund.execute.protocol import ExecPermissions

    args = parse_args_json(args_json)
    if isolation in ALIASES:
        warn(f"--isolation {isolation} is the old name of {ALIASES[isolation]}; it still works")
    settings = executor_settings(config_path, warm=0)
    for cidr in split(allow_private):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise click.BadParameter(f"{cidr!r} is not an address or CIDR range (e.g. 127.0.0.1/32)",
                                     param_hint="--allow-private") from None
    permissions = ExecPermissions(net=split(allow_net), read=[str(Path(p).resolve()) for p in split(allow_read)],
                                  write=[str(Path(p).resolve()) for p in split(allow_write)], env=split(allow_env),
                                  net_private=split(allow_private))
    env = {name: os.environ[name] for name in permissions.env if name in os.environ}

    async def once() -> dict[str, Any]:
        executor = create_executor(settings, isolation or settings.isolation)
        try:
            if runtime not in executor.runtimes:  # a typo here is the author's mistake, not the bundle's failure
                raise UnknownRuntime(f"runtime {runtime!r} is not offered here (offered: {', '.join(executor.runtimes)})")
            request = ExecRequest(code_path=str(file.resolve()), endpoint=endpoint, args=args, timeout=timeout,
                                  permissions=permissions, env=env)
            response = await executor.execute(request, runtime)
        finally:
            await executor.shutdown()
        return response.model_dump(by_alias=True, exclude_none=True)

    out = run_async(once)()
    if printed := out.pop("output", None):  # what the bundle printed goes where a program's prints go
        click.echo(printed, err=True)
    emit(out)
    if not out.get("success"):
        sys.exit(EXIT_NOT_SUCCESS)
