"""The atrund command line: the daemon for operators, and the inner loop for authors.

JSON results go to stdout (pipe them to jq); progress and errors go to stderr.
"""

from __future__ import annotations

import signal
import sys

# Signal handlers before anything else: the imports below take about 100 ms, and a SIGTERM that
# arrives then must stop `serve` cleanly rather than kill it mid-start. What arrives early is
# remembered and acted on as soon as the runner's event loop runs (see serve).
_early_signals: list[int] = []
if sys.argv[1:2] == ["serve"]:
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda signum, frame: _early_signals.append(signum))

import asyncio  # noqa: E402 - after the handlers, on purpose
import functools  # noqa: E402
import json  # noqa: E402
import mimetypes  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402
from rich.console import Console  # noqa: E402

from atrund import __version__  # noqa: E402
from atrund import config as config_mod  # noqa: E402
from atrund.errors import AtrundError, NotFound  # noqa: E402
from atrund.records import BUNDLE, INVOCATION, RESULT, Result, decode_data, now_iso, result_rkey, result_uri  # noqa: E402

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


def plain_errors(fn):
    """Our own errors in a synchronous command become one clear line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
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
    """Run the runner: publish its record, poll for invocations, write results, serve the HTTP gateway."""
    from atrund import log
    from atrund.app import App

    cfg = _load_config(config_path)
    log.setup(log_level, json_logs)

    async def serve_until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(log.asyncio_errors)

        def signalled(signum: int) -> None:
            if stop.is_set():  # the second one: do not wait for running work to drain
                err.print(f"{signal.Signals(signum).name} again: exiting now (running invocations will read as interrupted)")
                os._exit(128 + signum)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled, sig)
        for sig in _early_signals:
            signalled(sig)
        daemon = App(cfg)
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

    run_async(serve_until_signalled)()


@main.group()
def access() -> None:
    """Edit who this runner serves; a running daemon applies changes within a second."""


async def _did_of(who: str, cfg: config_mod.Config) -> str:
    if who.startswith("did:"):
        return who
    from atrund.atproto.identity import resolve_handle

    return await resolve_handle(who, cfg.runner.pds)


def _policy_file(cfg: config_mod.Config):
    from atrund.access import PolicyFile

    return PolicyFile(cfg.access_file)


@access.command("allow")
@click.argument("who", metavar="DID|HANDLE")
@config_option
@run_async
async def access_allow(who: str, config_path: Path) -> None:
    """Serve DID|HANDLE (in every mode; lifts an `access deny` of it)."""
    cfg = _load_config(config_path)
    did = await _did_of(who, cfg)
    _policy_file(cfg).allow(did)
    err.print(f"allowed {did}" + (f" ({who})" if who != did else "") + f" in {cfg.access_file}")
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
    cfg = _load_config(config_path)
    did = await _did_of(who, cfg)
    _policy_file(cfg).deny(did)
    err.print(f"denied {did}" + (f" ({who})" if who != did else "") + f" in {cfg.access_file}")


@access.command("list")
@config_option
@click.option("--members", is_flag=True, help="follows/list mode: also read the follows or the list now and print them.")
@run_async
async def access_list(config_path: Path, members: bool) -> None:
    """Print the access policy: mode, its source, and who is allowed and denied, and where it says so."""
    cfg = _load_config(config_path)
    entries = _policy_file(cfg).read()
    a = cfg.access
    out: dict[str, Any] = {"mode": a.mode, "policyFile": str(cfg.access_file)}
    if a.mode in ("follows", "list"):
        source = a.list_uri if a.mode == "list" else a.operator or await _did_of(cfg.runner.identifier, cfg)
        out["trusted"] = {"of": source, "refreshSeconds": a.refresh_interval}
        if members:
            from atrund import trust
            from atrund.atproto.identity import Identities
            from atrund.atproto.repos import Repos

            repos = Repos(Identities(cfg.identity.plc_url, timeout=cfg.identity.timeout_seconds))
            try:
                found = await (trust.follows(repos, source) if a.mode == "follows" else trust.list_members(repos, source))
            finally:
                await repos.close()
            out["trusted"]["members"] = sorted(found)
    out["allow"] = [{"did": d, "from": "config"} for d in a.allowlist] + \
        [{"did": d, "from": "policy file"} for d in sorted(entries.allow) if d not in a.allowlist]
    out["deny"] = [{"did": d, "from": "config"} for d in a.blocklist] + \
        [{"did": d, "from": "policy file"} for d in sorted(entries.deny) if d not in a.blocklist]
    emit(out)


@main.group()
def quarantine() -> None:
    """Items the runner could not process (a result the PDS refuses even as an error, a firehose
    frame or a listed record that broke processing): look at them, put them back, or drop them.
    Works while the runner runs; it takes a retry within a few seconds (else at its next start)."""


def _quarantine(config_path: Path):
    from atrund.quarantine import Quarantine, QuarantineError

    cfg = _load_config(config_path)
    path = cfg.state.dir / "quarantine.sqlite3"
    if not path.exists():
        raise click.ClickException(f"no quarantine at {path}: this runner has not quarantined anything (state.dir is "
                                   f"{cfg.state.dir})")
    try:
        return Quarantine(path)
    except QuarantineError as e:
        raise click.ClickException(str(e)) from None


def _ids(ids: tuple[int, ...], every: bool) -> list[int] | None:
    if every == bool(ids):
        raise click.UsageError("give the IDs to act on (from `atrund quarantine list`), or --all")
    return None if every else list(ids)


@quarantine.command("list")
@config_option
@click.option("--kind", type=click.Choice(["result", "frame", "record"]), default=None, help="Only items of this kind.")
@click.option("--full", is_flag=True, help="Also print each item as held (a result record, a frame in base64, a record).")
@plain_errors
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
    @plain_errors
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
    from atrund.atproto.identity import Identities
    from atrund.atproto.session import Session

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


def _split(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


secret_option = click.option(
    "--secret", "secrets", multiple=True, metavar="NAME=VALUE",
    help="Seal a secret to the runner's key (repeatable). NAME alone takes the value of your environment variable "
         "NAME, which keeps it out of your shell history.")


def parse_secrets(pairs: tuple[str, ...]) -> dict[str, str]:
    import os

    from atrund.sealed import SecretError, check_name

    out: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        try:
            check_name(name)
        except SecretError as e:
            raise click.BadParameter(str(e), param_hint="--secret") from None
        if not eq:
            if name not in os.environ:
                raise click.BadParameter(f"{name}: no '=VALUE' and no environment variable {name}", param_hint="--secret")
            value = os.environ[name]
        if name in out:
            raise click.BadParameter(f"{name} is given twice", param_hint="--secret")
        out[name] = value
    return out


async def _seal_all(repos, secrets: dict[str, str], runner_did: str, author: str, bundle_uri: str) -> list[dict[str, str]]:
    """Seal ``secrets`` to the key the runner's dev.atrun.runner record publishes."""
    from atrund.records import RUNNER
    from atrund.sealed import RunnerKey, seal

    try:
        _, runner_record = await repos.get_record(runner_did, RUNNER, "self")
    except NotFound:
        raise click.ClickException(f"{runner_did} has no dev.atrun.runner record: is it a runner?") from None
    key = RunnerKey.from_record(runner_record, runner_did)
    return [seal(n, v, key, author=author, runner=runner_did, bundle_uri=bundle_uri) for n, v in secrets.items()]


def new_tid() -> str:
    """A fresh record key (TID): microseconds since the epoch and a random clock id, base32-sortable."""
    import random

    n = (int(time.time() * 1_000_000) << 10) | random.getrandbits(10)
    alphabet = "234567abcdefghijklmnopqrstuvwxyz"
    return "".join(alphabet[(n >> (5 * i)) & 31] for i in reversed(range(13)))


@bundle.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--runtime", required=True, type=click.Choice(["python", "deno", "node"]))
@click.option("--name", default=None, help="A short name (defaults to the file name).")
@click.option("--description", default=None)
@click.option("--endpoints", default=None, help="Comma-separated endpoint names the bundle offers.")
@click.option("--allow-env", default="", help="Comma-separated environment variable names the bundle asks for "
              "(every --secret name is added).")
@click.option("--allow-net", default="", help="Comma-separated hosts (host or host:port) the bundle asks to reach.")
@secret_option
@click.option("--runner", "runner_did", default=None, help="DID of the runner the --secret values are sealed to.")
@author_options
@run_async
async def bundle_publish(file: Path, runtime: str, name: str | None, description: str | None, endpoints: str | None,
                         allow_env: str, allow_net: str, secrets: tuple[str, ...], runner_did: str | None,
                         pds: str | None, identifier: str, password: str, plc_url: str) -> None:
    """Upload FILE as a blob and create a dev.atrun.bundle record; prints its AT URI and CID.

    With --secret, the values are sealed to the runner named by --runner, bound to you and to
    this bundle, and every invocation of the bundle on that runner gets them.
    """
    from atrund.atproto.identity import Identities
    from atrund.atproto.repos import Repos

    opened = parse_secrets(secrets)
    if opened and runner_did is None:
        raise click.UsageError("--secret needs --runner: a secret is sealed to one runner's key")
    session = await _login(pds, identifier, password, plc_url)
    repos = Repos(Identities(plc_url))
    try:
        mime = CODE_MIME.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        blob = await session.upload_blob(file.read_bytes(), mime)
        record: dict[str, Any] = {"runtime": runtime, "code": blob, "name": name or file.name, "createdAt": now_iso()}
        if description:
            record["description"] = description
        if endpoints:
            record["endpoints"] = _split(endpoints)
        env_names = list(dict.fromkeys(_split(allow_env) + list(opened)))
        permissions = {k: v for k, v in (("env", env_names), ("net", _split(allow_net))) if v}
        if permissions:
            record["permissions"] = permissions
        # The secrets are bound to the bundle's AT URI, so its record key is chosen before it exists.
        rkey = new_tid()
        if opened:
            record["secrets"] = await _seal_all(repos, opened, runner_did, session.did, f"at://{session.did}/{BUNDLE}/{rkey}")
        uri, cid = await session.put_record(BUNDLE, rkey, record)
    finally:
        await session.close()
        await repos.close()
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
@secret_option
@author_options
@run_async
async def invoke(bundle_uri: str, runner_did: str, endpoint: str, args_json: str, cid: str | None, timeout: int | None,
                 wait: bool, wait_seconds: float, secrets: tuple[str, ...], pds: str | None, identifier: str, password: str,
                 plc_url: str) -> None:
    """Create a dev.atrun.invocation of BUNDLE_URI; prints its URI and where the result will be.

    --secret values are sealed to the runner's key (read from its dev.atrun.runner record),
    bound to you, the runner and this bundle; the bundle's permissions.env must list each name.
    """
    from atrund.atproto.identity import Identities
    from atrund.atproto.repos import Repos

    args = parse_args_json(args_json)
    opened = parse_secrets(secrets)
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
            if opened:
                record["secrets"] = await _seal_all(repos, opened, runner_did, session.did, bundle_uri)
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
def secret() -> None:
    """Seal secrets to a runner's key."""


@secret.command("seal")
@click.argument("pairs", nargs=-1, required=True, metavar="NAME=VALUE...")
@click.option("--runner", "runner_did", required=True, help="DID of the runner whose key seals them.")
@click.option("--bundle", "bundle_uri", required=True, help="AT URI of the bundle the secrets are for.")
@click.option("--author", default=None, help="DID of whoever writes the record that will carry them "
              "(default: the bundle's author, right for the bundle's own record and for invoking your own bundle).")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default="https://plc.directory", show_default=True)
@run_async
async def secret_seal(pairs: tuple[str, ...], runner_did: str, bundle_uri: str, author: str | None, plc_url: str) -> None:
    """Print the sealed objects (a JSON list) for a record's "secrets" field. No login needed.

    NAME alone takes the value of your environment variable NAME.
    """
    from atrund.atproto.identity import Identities
    from atrund.atproto.repos import Repos

    b_did, _, _ = parse_uri(bundle_uri, "--bundle")
    if author is not None and not author.startswith("did:"):
        raise click.BadParameter(f"{author!r} is not a DID", param_hint="--author")
    opened = parse_secrets(pairs)
    repos = Repos(Identities(plc_url))
    try:
        emit(await _seal_all(repos, opened, runner_did, author or b_did, bundle_uri))
    finally:
        await repos.close()


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
    from atrund.sealed import KeyFileError, RunnerKey, generate_key_file, key_id, load_key_file

    cfg = _load_config(config_path)
    try:
        generate_key_file(cfg.key_file, force=force)
        private = load_key_file(cfg.key_file)
    except KeyFileError as e:
        raise click.ClickException(str(e)) from None
    key = RunnerKey(key_id(private.public_key()), private.public_key())
    err.print(f"wrote {cfg.key_file} (mode 0600); restart the runner to publish it")
    emit({"keyFile": str(cfg.key_file), **key.to_record()})


@main.group()
def result() -> None:
    """Read result records."""


@result.command("get")
@click.argument("at_uri")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default="https://plc.directory", show_default=True)
@run_async
async def result_get(at_uri: str, plc_url: str) -> None:
    """Print the result record at AT_URI (anyone can; no login)."""
    from atrund.atproto.identity import Identities
    from atrund.atproto.repos import Repos

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
    from atrund.execute.process.backend import Cgroups

    out.print("cgroups (v1 memory, pids): " + ("per-worker limits" if Cgroups().available
                                               else "not writable (the process backend then limits each process only)"))
    out.print("Docker engine: " + _engine_summary(settings))
    from atrund.execute.microvm.backend import host_support

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
    from atrund.execute.container import image as image_mod

    settings = _load_config(config_path).executor if config_path else config_mod.ExecutorSection()
    out: dict = {}
    if vm:
        from atrund.execute.microvm import guest as vmimage

        try:
            out["vm"] = vmimage.build(settings.runtimes_dir, vm_dir or vmimage.DEFAULT_DIR, cache_dir or image_mod.DEFAULT_CACHE,
                                      progress=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True))
        except AtrundError as e:
            raise click.ClickException(str(e)) from None
    if not container:
        emit(out)
        return
    client = None
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
    finally:
        if client is not None:
            client.close()
    emit({"image": tag, "tags": tags, **out})


def _engine_summary(settings) -> str:
    """One line for doctor: the engine, its OCI runtimes, and whether the runtime image is there."""
    from atrund.execute.container import image as image_mod

    try:
        client = image_mod.connect(settings.docker_host)
        try:
            info = client.info()
            labels = image_mod.describe(client, settings.image)
        finally:
            client.close()
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



@main.command()
@click.argument("bundle_uri")
@click.option("--runner", "runner_did", required=True, help="DID of the runner to call.")
@click.option("--endpoint", required=True)
@click.option("--args", "args_json", default="{}", show_default=True, help="JSON object passed to the endpoint.")
@click.option("--cid", default=None, help="Pin this bundle version; the current one when omitted.")
@click.option("--timeout", type=int, default=None, help="Seconds the run may take (capped by the runner).")
@click.option("--write-result", is_flag=True, help="Also have the runner keep the answer as a result record.")
@click.option("--gateway", "gateway_url", default=None, help="The runner's gateway URL; read from its runner record when omitted.")
@author_options
@run_async
async def call(bundle_uri: str, runner_did: str, endpoint: str, args_json: str, cid: str | None, timeout: int | None,
               write_result: bool, gateway_url: str | None, pds: str | None, identifier: str, password: str,
               plc_url: str) -> None:
    """Run BUNDLE_URI's endpoint on a runner now (XRPC dev.atrun.invoke) and print the answer.

    Authenticates with a single-use service-auth token from your own PDS; no record is written
    in your repo. Exits 3 when the status is not success.
    """
    import aiohttp

    from atrund.atproto.identity import Identities
    from atrund.records import RUNNER
    from atrund.atproto.repos import Repos

    args = parse_args_json(args_json)
    b_did, b_coll, b_rkey = parse_uri(bundle_uri, "BUNDLE_URI")
    repos = Repos(Identities(plc_url))
    try:
        if cid is None:
            cid, _ = await repos.get_record(b_did, b_coll, b_rkey)
        if gateway_url is None:
            _, declared = await repos.get_record(runner_did, RUNNER, "self")
            gateway_url = declared.get("gatewayUrl")
            if not gateway_url:
                raise click.ClickException(f"runner {runner_did} publishes no gatewayUrl: it does not serve XRPC invoke")
    finally:
        await repos.close()
    session = await _login(pds, identifier, password, plc_url)
    try:
        token = await session.service_token(runner_did, "dev.atrun.invoke")
    finally:
        await session.close()
    body: dict[str, Any] = {"bundle": {"uri": bundle_uri, "cid": cid}, "endpoint": endpoint, "args": args}
    if timeout is not None:
        body["timeout"] = timeout
    if write_result:
        body["writeResult"] = True
    url = gateway_url.rstrip("/") + "/xrpc/dev.atrun.invoke"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
                status, text = resp.status, await resp.text()
    except aiohttp.ClientError as e:
        raise click.ClickException(f"{url}: {type(e).__name__}: {e}") from None
    try:
        out = json.loads(text)
    except ValueError:
        raise click.ClickException(f"{url} answered HTTP {status} with something that is not JSON: {text[:200]!r}") from None
    if status != 200:
        raise click.ClickException(f"{url}: HTTP {status} {out.get('error')}: {out.get('message')}")
    if "data" in out:
        out["value"] = decode_data(out["data"])
    emit(out)
    if out.get("status") != "success":
        sys.exit(EXIT_NOT_SUCCESS)


if __name__ == "__main__":
    main()
