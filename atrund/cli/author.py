"""Commands for a bundle's author: bundle publish, invoke, call, result get|uri, secret seal.

Each is a thin shell over atrund.client (which builds the records): options in, JSON out.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from atrund.cli.group import (
    EXIT_NO_RESULT,
    EXIT_NOT_SUCCESS,
    Output,
    emit,
    emit_line,
    err,
    fail_line,
    main,
    parse_args_json,
    parse_uri,
    print_json,
    run_async,
    show,
    split,
    warn,
)
from atrund.config import PLC_DIRECTORY, RUNTIMES_DIR
from atrund.execute.runtimes import declared
from atrund.records import INVOCATION, result_uri

RUNTIMES = list(declared(RUNTIMES_DIR))
RATE_NOTE_AFTER = 2.0  # seconds invoke --wait waits before it looks whether the runner's rate holds it back  # the choices: the runtime directories this install has


def author_options(fn):
    """Login options shared by the commands that write to the author's repo. Without a password,
    the session `atrund login` kept is used."""
    fn = click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True,
                      help="PLC directory used to resolve DIDs [env ATRUND_PLC_URL].")(fn)
    fn = click.option("--password", envvar="ATRUND_PASSWORD", default=None,
                      help="App password [env ATRUND_PASSWORD]; default: the session `atrund login` kept.")(fn)
    fn = click.option("--identifier", envvar="ATRUND_IDENTIFIER", default=None,
                      help="Your handle or DID [env ATRUND_IDENTIFIER]; default: the session `atrund login` kept.")(fn)
    fn = click.option("--pds", envvar="ATRUND_PDS", default=None,
                      help="Your PDS URL [env ATRUND_PDS]; found from your DID document when omitted.")(fn)
    return fn


async def _login(repos, pds: str | None, identifier: str | None, password: str | None):
    """A session: with a password, a fresh login; without, the one `atrund login` kept."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    if password is None:
        return await client.resume(identifier)
    if identifier is None:
        raise click.UsageError("--password needs --identifier (or ATRUND_IDENTIFIER)")
    if pds is None and not identifier.startswith("did:"):
        identifier = await client.did_of(repos, identifier)  # the PDS is then read from the DID document
    return await client.login(repos, identifier, password, pds)


@main.command()
@click.option("--identifier", envvar="ATRUND_IDENTIFIER", prompt="Handle or DID", help="Your handle or DID.")
@click.option("--password", envvar="ATRUND_PASSWORD", prompt="App password", hide_input=True,
              help="An app password (asked for when not given; better not typed on the command line).")
@click.option("--pds", envvar="ATRUND_PDS", default=None, help="Your PDS URL; found from your DID document when omitted.")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True)
@run_async
async def login(identifier: str, password: str, pds: str | None, plc_url: str) -> None:
    """Log in once and keep the session (mode 0600), so later commands need no password.

    Kept in $ATRUND_SESSION_FILE, else ~/.config/atrund/session.json; its tokens are refreshed
    as they expire. `atrund logout` forgets it.
    """
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            path = client.keep_session(session)
        finally:
            await session.close()
    err.print(f"logged in as [bold]{session.handle}[/bold] ({session.did}) on {session.pds}; session kept in {path}")
    emit({"did": session.did, "handle": session.handle, "pds": session.pds, "sessionFile": str(path)})


@main.command()
def logout() -> None:
    """Forget the session `atrund login` kept."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    path = client.session_file()
    try:
        path.unlink()
    except FileNotFoundError:
        err.print(f"no session kept in {path}")
        return
    err.print(f"forgot the session kept in {path}")


secret_option = click.option(
    "--secret", "secrets", multiple=True, metavar="NAME=VALUE",
    help="Seal a secret to the runner's key (repeatable). NAME alone takes the value of your environment variable "
         "NAME, which keeps it out of your shell history.")


def parse_secrets(pairs: tuple[str, ...]) -> dict[str, str]:
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


@main.group()
def bundle() -> None:
    """Publish code bundles."""


@bundle.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--runtime", required=True, type=click.Choice(RUNTIMES) if RUNTIMES else str,
              help="The runtime that runs it: one the runner lists in its dev.atrun.runner record.")
@click.option("--name", default=None, help="A short name (defaults to the file name).")
@click.option("--description", default=None)
@click.option("--endpoints", default=None, help="Comma-separated endpoint names the bundle offers; default: the "
              "functions the file defines (top-level, or exported).")
@click.option("--no-check", is_flag=True, help="Skip the checks before upload (extension, syntax by the runtime's own "
              "checker, endpoints defined); the endpoints are then only those given.")
@click.option("--allow-env", default="", help="Comma-separated environment variable names the bundle asks for "
              "(every --secret name is added).")
@click.option("--allow-net", default="", help="Comma-separated hosts (host or host:port) the bundle asks to reach.")
@secret_option
@click.option("--runner", "runner_did", default=None, help="DID or handle of the runner the --secret values are sealed to.")
@author_options
@run_async
async def bundle_publish(file: Path, runtime: str, name: str | None, description: str | None, endpoints: str | None,
                         no_check: bool, allow_env: str, allow_net: str, secrets: tuple[str, ...],
                         runner_did: str | None, pds: str | None, identifier: str | None, password: str | None, plc_url: str) -> None:
    """Upload FILE as a blob and create a dev.atrun.bundle record; prints its AT URI and CID.

    With --secret, the values are sealed to the runner named by --runner, bound to you and to
    this bundle, and every invocation of the bundle on that runner gets them.
    """
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    opened = parse_secrets(secrets)
    if opened and runner_did is None:
        raise click.UsageError("--secret needs --runner: a secret is sealed to one runner's key")
    declared = split(endpoints) if endpoints else None
    if not no_check:  # before logging in: a file that cannot run is refused at once
        declared = client.check_file(file, runtime, declared)
    fields: dict[str, Any] = {"name": name or file.name, "description": description or None, "endpoints": declared}
    env_names = list(dict.fromkeys(split(allow_env) + list(opened)))
    permissions = {k: v for k, v in (("env", env_names), ("net", split(allow_net))) if v}
    if permissions:
        fields["permissions"] = permissions
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            if runner_did is not None:
                runner_did = await client.did_of(repos, runner_did, session.pds)
            published = await client.publish(session, repos, file.read_bytes(), runtime, mime=client.code_mime(file),
                                             secret_values=opened, runner=runner_did, **fields)
        finally:
            await session.close()
    err.print(f"published [bold]{published.record['name']}[/bold] ({published.record['code']['size']} bytes)")
    emit({"uri": published.uri, "cid": published.cid})


@bundle.command("update")
@click.argument("bundle_uri")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoints", default=None, help="Comma-separated endpoint names; default: the ones declared now if the "
              "file still defines them, else those it defines.")
@click.option("--no-check", is_flag=True, help="Skip the checks before upload, as for publish.")
@author_options
@run_async
async def bundle_update(bundle_uri: str, file: Path, endpoints: str | None, no_check: bool, pds: str | None,
                        identifier: str | None, password: str | None, plc_url: str) -> None:
    """Replace the code of your bundle BUNDLE_URI with FILE: same AT URI and gateway URL, new CID.

    Its other fields (name, permissions, sealed secrets) are kept. Invocations pinned to the old
    CID are refused by runners that no longer have it: invoke again to run the new code.
    """
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    parse_uri(bundle_uri, "BUNDLE_URI")
    async with client.reader(plc_url) as repos:
        _, old = await client.get_bundle(repos, bundle_uri)
        declared = split(endpoints) if endpoints else None
        if not no_check:
            keep = old.get("endpoints") if declared is None else None
            declared = client.check_file(file, old.get("runtime", ""), declared or keep)
        session = await _login(repos, pds, identifier, password)
        try:
            published = await client.update(session, repos, bundle_uri, file.read_bytes(), mime=client.code_mime(file),
                                            endpoints=declared)
        finally:
            await session.close()
    err.print(f"updated [bold]{published.record.get('name')}[/bold] ({published.record['code']['size']} bytes)")
    emit({"uri": published.uri, "cid": published.cid})


@bundle.command("list")
@click.argument("who", metavar="[DID|HANDLE]", required=False)
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True)
@run_async
async def bundle_list(who: str | None, plc_url: str) -> None:
    """List the bundles of DID|HANDLE (default: you, ATRUND_IDENTIFIER), newest first. No login."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    async with client.reader(plc_url) as repos:
        did = await client.did_of(repos, _me(who), os.environ.get("ATRUND_PDS"))
        found = await client.list_bundles(repos, did)
    emit(found, _show_bundles)


def _show_bundles(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        click.echo(f"{r['runtime'] or '?':<7} {r['name'] or '':<24} {r['createdAt'] or '':<25} {r['uri']}")


@bundle.command("delete")
@click.argument("bundle_uri")
@author_options
@run_async
async def bundle_delete(bundle_uri: str, pds: str | None, identifier: str | None, password: str | None, plc_url: str) -> None:
    """Delete your bundle BUNDLE_URI (runners keep no copy they will run again: its invocations are refused)."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    parse_uri(bundle_uri, "BUNDLE_URI")
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            await client.delete(session, bundle_uri)
        finally:
            await session.close()
    err.print(f"deleted {bundle_uri}")


def _me(who: str | None) -> str:
    """WHO, else the author's own identifier (ATRUND_IDENTIFIER, else the `atrund login` session's DID)."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    who = who or os.environ.get("ATRUND_IDENTIFIER") or (client.kept_session() or {}).get("did")
    if not who:
        raise click.UsageError("name the account (DID or handle), set ATRUND_IDENTIFIER, or `atrund login`")
    return who


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--runtime", type=click.Choice(RUNTIMES) if RUNTIMES else str, default=None,
              help="The runtime; default: the one whose extension FILE has.")
@click.option("--port", type=int, default=8787, show_default=True, help="The local gateway's port (0: any free one).")
@click.option("--isolation", default="auto", show_default=True, help="The local runner's executor backend.")
@click.option("-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run on a real PDS: this runner configuration's account (one for development: its runner record "
                   "gets the loopback gateway URL), with the author `atrund login` kept.")
def dev(file: Path, runtime: str | None, port: int, isolation: str, config_path: Path | None) -> None:
    """Develop FILE locally: a PDS and a runner on loopback, FILE published, re-published on save.

    Starts the local AT Protocol stack (scripts/setup installs it) and a runner, publishes FILE
    as a bundle of a local author, prints the gateway URL and the environment for `atrund invoke`
    from another shell, re-publishes FILE under the same URI each time it is saved (after the
    checks `bundle publish` makes), and prints each result, and what each run printed, as they
    land. With -c, the PDS is that configuration's and the author is you (`atrund login`); the
    runner's state is temporary. Ctrl-C stops it all.
    """
    import signal

    from atrund.dev import loop

    runtime = runtime or {ext: name for name, ext in declared(RUNTIMES_DIR).items()}.get(file.suffix)
    if runtime is None:
        raise click.UsageError(f"give --runtime: no runtime takes {file.suffix or 'a file without extension'}")

    async def until_ctrl_c() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await loop.run(file.resolve(), runtime, lambda line: err.print(escape(line)), port=port, isolation=isolation,
                       ready=lambda info: emit(info) if Output.json else None, stop=stop, config_path=config_path)

    run_async(until_ctrl_c)()


def show_run(out: dict[str, Any]) -> None:
    """An invocation or a call for people: its status and value (or error) first, then where it is."""
    record = out.get("record") or out
    lines = {"status": out.get("status")}
    if "value" in out:
        lines["value"] = out["value"]
    if record.get("error"):
        lines["error"] = record["error"]
    if isinstance(record.get("metrics"), dict) and "durationMs" in record["metrics"]:
        lines["took"] = f"{record['metrics']['durationMs']} ms"
    lines.update({k: out[k] for k in ("uri", "result", "caller") if k in out})
    if "invocation" in out:
        lines["invocation"] = out["invocation"]["uri"]
    show({k: v for k, v in lines.items() if v is not None})


def run_options(runner_help: str):
    """What invoke and call share: which runner, which endpoint with which args, which version, how long."""
    options = [
        click.option("--runner", "runner_did", required=True, help=runner_help),
        click.option("--endpoint", required=True),
        click.option("--args", "args_json", default="{}", show_default=True, help="JSON object passed to the endpoint."),
        click.option("--cid", default=None, help="Pin this bundle version; the current one when omitted."),
        click.option("--timeout", type=int, default=None, help="Seconds the run may take (capped by the runner)."),
    ]

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@main.command()
@click.argument("bundle_uri")
@run_options("DID or handle of the runner to ask.")
@click.option("--wait/--no-wait", default=False, help="Wait for the result record and print it.")
@click.option("--wait-seconds", type=float, default=120, show_default=True)
@click.option("--cleanup", is_flag=True, help="With --wait: delete the invocation record once its result is in "
              "(the result stays readable in the runner's repo).")
@secret_option
@author_options
@run_async
async def invoke(bundle_uri: str, runner_did: str, endpoint: str, args_json: str, cid: str | None, timeout: int | None,
                 wait: bool, wait_seconds: float, cleanup: bool, secrets: tuple[str, ...], pds: str | None, identifier: str | None,
                 password: str | None, plc_url: str) -> None:
    """Create a dev.atrun.invocation of BUNDLE_URI; prints its URI and where the result will be.

    --secret values are sealed to the runner's key (read from its dev.atrun.runner record),
    bound to you, the runner and this bundle; the bundle's permissions.env must list each name.
    """
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    args = parse_args_json(args_json)
    opened = parse_secrets(secrets)
    parse_uri(bundle_uri, "BUNDLE_URI")
    if cleanup and not wait:
        raise click.UsageError("--cleanup needs --wait: the record is deleted once its result is in")
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            # Everything the runner would refuse is checked first: nothing is written for nothing.
            runner_did = await client.did_of(repos, runner_did, session.pds)
            cid, runner = await client.check_invocable(repos, bundle_uri, runner_did, endpoint, cid)
            uri, inv_cid = await client.invoke(session, repos, bundle_uri, runner_did, endpoint, args, cid=cid,
                                               secret_values=opened, timeout=timeout)
            out: dict[str, Any] = {"invocation": {"uri": uri, "cid": inv_cid}, "result": result_uri(runner_did, uri)}
            if not wait:
                emit(out, lambda o: show({"invocation": o["invocation"]["uri"], "result": o["result"]}))
                return
            err.print(f"invoked {endpoint} → waiting for [bold]{out['result']}[/bold]")
            # a quarter second between looks at most: a firehose runner answers in about 0.1-0.4 s
            found = await client.wait_result(repos, runner_did, uri, min(RATE_NOTE_AFTER, wait_seconds), max_delay=0.25)
            if found is None and wait_seconds > RATE_NOTE_AFTER:  # slow: say if it is the runner's per-author rate
                if note := await client.rate_note(repos, session.did, runner, runner_did):
                    warn(note)
                found = await client.wait_result(repos, runner_did, uri, wait_seconds - RATE_NOTE_AFTER, max_delay=0.25)
            if found is not None and cleanup:
                await client.delete(session, uri, INVOCATION)
                out["invocation"]["deleted"] = True
        finally:
            await session.close()
    if found is None:
        emit(out, lambda o: show({"invocation": o["invocation"]["uri"], "result": o["result"]}))
        err.print(f"[yellow]no result after {wait_seconds:g} s[/yellow]")
        sys.exit(EXIT_NO_RESULT)
    out.update(found)
    emit(out, show_run)
    if found["status"] != "success":
        fail_line(f"{found['status']}: {found['record'].get('error') or 'no error text'}")
        sys.exit(EXIT_NOT_SUCCESS)


@main.command()
@click.argument("bundle_uri")
@run_options("DID or handle of the runner to call.")
@click.option("--write-result", is_flag=True, help="Also have the runner keep the answer as a result record.")
@click.option("--gateway", "gateway_url", default=None, help="The runner's gateway URL; read from its runner record when omitted.")
@author_options
@run_async
async def call(bundle_uri: str, runner_did: str, endpoint: str, args_json: str, cid: str | None, timeout: int | None,
               write_result: bool, gateway_url: str | None, pds: str | None, identifier: str | None, password: str | None,
               plc_url: str) -> None:
    """Run BUNDLE_URI's endpoint on a runner now (XRPC dev.atrun.invoke) and print the answer.

    Authenticates with a single-use service-auth token from your own PDS; no record is written
    in your repo. Exits 3 when the status is not success.
    """
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    args = parse_args_json(args_json)
    parse_uri(bundle_uri, "BUNDLE_URI")
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            runner_did = await client.did_of(repos, runner_did, session.pds)
            out = await client.call(session, repos, bundle_uri, runner_did, endpoint, args, cid=cid, timeout=timeout,
                                    write_result=write_result, gateway_url=gateway_url)
        finally:
            await session.close()
    emit(out, show_run)
    if out.get("status") != "success":
        fail_line(f"{out.get('status')}: {out.get('error') or 'no error text'}")
        sys.exit(EXIT_NOT_SUCCESS)


@main.command()
@click.argument("run_id", metavar="ID")
@click.option("--runner", "runner_did", default=None,
              help="DID or handle of the runner; read from the invocation record when ID is an AT URI.")
@author_options
@run_async
async def logs(run_id: str, runner_did: str | None, pds: str | None, identifier: str | None, password: str | None,
               plc_url: str) -> None:
    """Print what one run printed, and its error (XRPC dev.atrun.getLogs).

    ID is an invocation's AT URI, or the request id a gateway or XRPC answer carried
    (Atrun-Request-Id, requestId; give --runner then). Only the bundle's author and the invoker
    may read them; the runner keeps them for its [logs] retention_hours.
    """
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            runner = await (client.did_of(repos, runner_did, session.pds) if runner_did else client.runner_of(repos, run_id))
            if runner is None:
                raise click.UsageError(f"{run_id} is a request id: give --runner, the runner that answered it")
            out = await client.get_logs(session, repos, runner, id=run_id)
        finally:
            await session.close()
    emit(out, _show_logs)
    if not out["logs"]:
        err.print(f"nothing kept for {run_id}: the run succeeded and printed nothing, has not ended yet, "
                  "or is older than the runner keeps logs")


@main.command()
@click.argument("bundle_uri")
@click.option("--runner", "runner_did", required=True, help="DID or handle of the runner whose runs to follow.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True, help="Seconds between looks.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many entries.")
@author_options
@run_async
async def tail(bundle_uri: str, runner_did: str, interval: float, count: int | None, pds: str | None,
               identifier: str | None, password: str | None, plc_url: str) -> None:
    """Follow your bundle's runs on a runner: the newest entries, then each run that prints or
    fails as it ends (JSON lines with --json), until Ctrl-C or --count."""

    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    parse_uri(bundle_uri, "BUNDLE_URI")
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            runner = await client.did_of(repos, runner_did, session.pds)
            err.print(f"following {bundle_uri} on {runner} (Ctrl-C stops)")
            cursor, seen = None, 0
            while True:
                out = await client.get_logs(session, repos, runner, bundle=bundle_uri, cursor=cursor, limit=20 if cursor is None else 100)
                for entry in out["logs"]:
                    emit_line(entry, _show_entry)
                    seen += 1
                    if count is not None and seen >= count:
                        return
                cursor = out["cursor"]
                if len(out["logs"]) < 100:
                    await asyncio.sleep(interval)
        finally:
            await session.close()


def _show_logs(out: dict[str, Any]) -> None:
    for entry in out["logs"]:
        _show_entry(entry)


def _show_entry(e: dict[str, Any]) -> None:
    """One run's entry for people: a line saying which run and how it ended, then its error and
    what it printed, as printed."""
    who = e.get("invoker") or "anonymous"
    click.echo(f"--- {e['createdAt']} {e['status']} {e['kind']} by {who}: {e['id']}")
    if e.get("error"):
        click.echo(f"error: {e['error']}")
    if e.get("output"):
        click.echo(e["output"])


@main.group()
def result() -> None:
    """Read result records."""


@result.command("get")
@click.argument("at_uri")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True)
@run_async
async def result_get(at_uri: str, plc_url: str) -> None:
    """Print the result record at AT_URI (anyone can; no login)."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    parse_uri(at_uri, "AT_URI")
    async with client.reader(plc_url) as repos:
        emit(await client.get_result(repos, at_uri), show_run)


def _show_results(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        _show_result(r)


def _show_result(r: dict[str, Any]) -> None:
    """One result as one line: status, what it says, where it is (the URI whole)."""
    import json

    said = r.get("error") or (json.dumps(r["value"], ensure_ascii=False) if "value" in r else "")
    said = said if len(said) <= 60 else said[:59] + "…"
    click.echo(f"{r.get('status') or '?':<9} {r.get('createdAt') or '':<25} {' '.join(said.split()):<60} {r['uri']}")


result_filters = [
    click.option("--runner", "runner", default=None, help="Results in this runner's repo (DID or handle)."),
    click.option("--bundle", "bundle_uri", default=None, help="Only results of this bundle (AT URI)."),
    click.option("--mine", is_flag=True, help="Only results of your invocations and calls (ATRUND_IDENTIFIER); "
                 "the default without --runner."),
    click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True),
]


def _result_filters(fn):
    for option in reversed(result_filters):
        fn = option(fn)
    return fn


async def _filters(client, repos, runner: str | None, mine: bool) -> tuple[str | None, str | None]:
    """The runner's DID and the author's (for --mine, or no --runner), handles resolved."""
    pds = os.environ.get("ATRUND_PDS")
    runner_did = await client.did_of(repos, runner, pds) if runner else None
    author = await client.did_of(repos, _me(None), pds) if mine or runner is None else None
    return runner_did, author


@result.command("list")
@_result_filters
@click.option("--schedule", "schedule_uri", default=None, help="Only the results of this schedule's ticks (AT URI).")
@click.option("--trigger", "trigger_uri", default=None, help="Only the results of this trigger's firings (AT URI).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@run_async
async def result_list(runner: str | None, bundle_uri: str | None, mine: bool, plc_url: str, schedule_uri: str | None,
                      trigger_uri: str | None, limit: int) -> None:
    """List results, newest first: yours (each of your invocations, `pending` until its result is
    in), or those in one runner's repo (--runner; with --mine only yours), or a schedule's ticks or
    a trigger's firings (--schedule, --trigger: on the runner they name). No login."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    if schedule_uri and trigger_uri:
        raise click.UsageError("give --schedule or --trigger, not both")
    async with client.reader(plc_url) as repos:
        if schedule_uri or trigger_uri:
            runner_did = await client.did_of(repos, runner, os.environ.get("ATRUND_PDS")) if runner else None
            emit(await client.results_of(repos, schedule_uri or trigger_uri, runner_did, limit), _show_results)
            return
        runner_did, author = await _filters(client, repos, runner, mine)
        emit(await client.list_results(repos, runner=runner_did, author=author, bundle=bundle_uri, limit=limit),
             _show_results)


@result.command("watch")
@_result_filters
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True, help="Seconds between looks.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many results.")
@run_async
async def result_watch(runner: str | None, bundle_uri: str | None, mine: bool, plc_url: str, interval: float,
                       count: int | None) -> None:
    """Print results as they land in a runner's repo (--runner needed), one line each (JSON lines
    with --json), until Ctrl-C or --count."""

    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    if runner is None:
        raise click.UsageError("give --runner: results land in the runner's repo")
    async with client.reader(plc_url) as repos:
        runner_did, author = await _filters(client, repos, runner, mine)
        err.print(f"watching {runner_did} for new results (Ctrl-C stops)")
        seen = 0
        async for found in client.watch_results(repos, runner_did, author=author, bundle=bundle_uri, interval=interval):
            emit_line(found, _show_result)
            seen += 1
            if count is not None and seen >= count:
                return


@result.command("uri")
@click.argument("invocation_uri")
@click.option("--runner", "runner_did", required=True, help="DID or handle of the runner (a handle is resolved).")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True)
@run_async
async def result_uri_cmd(invocation_uri: str, runner_did: str, plc_url: str) -> None:
    """Print where the result of INVOCATION_URI will appear (computable before it exists)."""
    if not runner_did.startswith("did:"):  # a DID needs no network: the URI is computed
        from atrund import client  # here, not at the top: the AT SDK takes half a second to import
        async with client.reader(plc_url) as repos:
            runner_did = await client.did_of(repos, runner_did, os.environ.get("ATRUND_PDS"))
    click.echo(result_uri(runner_did, invocation_uri))


@main.group()
def secret() -> None:
    """Seal secrets to a runner's key."""


@secret.command("seal")
@click.argument("pairs", nargs=-1, required=True, metavar="NAME=VALUE...")
@click.option("--runner", "runner_did", required=True, help="DID or handle of the runner whose key seals them.")
@click.option("--bundle", "bundle_uri", required=True, help="AT URI of the bundle the secrets are for.")
@click.option("--author", default=None, help="DID of whoever writes the record that will carry them "
              "(default: the bundle's author, right for the bundle's own record and for invoking your own bundle).")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True)
@run_async
async def secret_seal(pairs: tuple[str, ...], runner_did: str, bundle_uri: str, author: str | None, plc_url: str) -> None:
    """Print the sealed objects (a JSON list) for a record's "secrets" field. No login needed.

    NAME alone takes the value of your environment variable NAME.
    """
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    b_did, _, _ = parse_uri(bundle_uri, "--bundle")
    if author is not None and not author.startswith("did:"):
        raise click.BadParameter(f"{author!r} is not a DID", param_hint="--author")
    opened = parse_secrets(pairs)
    async with client.reader(plc_url) as repos:
        runner_did = await client.did_of(repos, runner_did, os.environ.get("ATRUND_PDS"))
        print_json(await client.seal(repos, opened, runner_did, author or b_did, bundle_uri))
