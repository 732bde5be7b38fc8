"""`atrund state`: bundles' durable state (ctx.state, docs/protocol.md §7.6), and ``migrate``
(the state database's schema, for a Postgres ``state.url``).

Operators (``-c CONFIG``): list, get, export and delete one namespace (``--author DID --bundle
RKEY``) in the runner's state store. The store is private to a running runner (its lock), so
these work while it is stopped; a running runner's state is read by its authors, remotely.

Authors (no ``-c``): ``atrund state get --runner RUNNER --bundle RKEY [KEY]`` reads their own
bundle's state from the runner (XRPC dev.atrun.getState, service auth as the author).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from atrund.cli.author import _login, author_options
from atrund.cli.group import config_option, err, fail_line, load_config, main, print_json, run_async
from atrund.errors import StateLocked

EXIT_NO_KEY = 3  # as for a status that is not success: what was asked for is not there


@main.group()
def state() -> None:
    """Bundles' durable state (ctx.state): operators read and delete it, authors read their own;
    and the state database's schema (migrate)."""


def namespace_options(fn):
    fn = click.option("--bundle", "rkey", required=True, help="The bundle record's key (RKEY in at://DID/dev.atrun.bundle/RKEY).")(fn)
    return click.option("--author", "author", required=True, help="The bundle author's DID.")(fn)


def _store(config_path: Path):
    """The runner's BundleState over its state store, opened for an operator's command."""
    from atrund.kv import BundleState
    from atrund.state import State

    cfg = load_config(config_path)
    if cfg.state.url is not None:  # shared by replicas: usable while they run; with no role, it is given no work
        from atrund.pgstate import PgState

        return BundleState(PgState(cfg.state.url, roles=()), cfg.bundle_state)
    try:
        store = State(cfg.state.dir / "atrund.sqlite3")
    except StateLocked:
        raise StateLocked(f"{cfg.state.dir} is in use by a running runner, which keeps its state store to itself: stop it to "
                          "read or change bundles' state, or read one bundle's state as its author with `atrund state get "
                          "--runner RUNNER --bundle RKEY`") from None
    return BundleState(store, cfg.bundle_state)


@state.command("list")
@config_option
@namespace_options
@click.option("--prefix", default="", help="Only keys that start with this.")
def state_list(config_path: Path, author: str, rkey: str, prefix: str) -> None:
    """Print a bundle's keys, one per line, in order."""
    kv = _store(config_path)
    entries, _ = kv.read(author, rkey, prefix=prefix, limit=None)
    for key, _value in entries:
        click.echo(key)


@state.command("get")
@click.argument("key", required=False)
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The runner's TOML configuration: read its store (an operator). Without it: ask --runner (the author).")
@click.option("--author", "author", default=None, help="With -c: the bundle author's DID.")
@click.option("--bundle", "rkey", required=True, help="The bundle record's key (RKEY in at://DID/dev.atrun.bundle/RKEY).")
@click.option("--runner", "runner", default=None, help="Without -c: DID or handle of the runner to ask (XRPC dev.atrun.getState).")
@click.option("--gateway", "gateway_url", default=None, help="The runner's gateway URL; read from its runner record when omitted.")
@author_options
@run_async
async def state_get(key: str | None, config_path: Path | None, author: str | None, rkey: str, runner: str | None,
                    gateway_url: str | None, pds: str | None, identifier: str | None, password: str | None, plc_url: str) -> None:
    """Print KEY's value as JSON (exit 3 if the key is absent); without KEY, every key and value
    as one JSON object."""
    if config_path is not None:
        if author is None:
            raise click.UsageError("-c needs --author (the bundle author's DID)")
        entries, _ = _store(config_path).read(author, rkey, key, limit=None)
    else:
        if runner is None:
            raise click.UsageError("give --runner (an author asks the runner) or -c CONFIG (an operator reads its store)")
        entries = await _remote_entries(runner, rkey, key, gateway_url, pds, identifier, password, plc_url)
    _print_entries(entries, key)


async def _remote_entries(runner: str, rkey: str, key: str | None, gateway_url: str | None, pds: str | None,
                          identifier: str | None, password: str | None, plc_url: str) -> list[tuple[str, Any]]:
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    from atrund.records import BUNDLE

    entries: list[tuple[str, Any]] = []
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            runner_did = await client.did_of(repos, runner, session.pds)
            uri, cursor = f"at://{session.did}/{BUNDLE}/{rkey}", None
            while True:  # every page: a token is single-use, one per page
                out = await client.get_state(session, repos, uri, runner_did, key=key, cursor=cursor, limit=1000,
                                             gateway_url=gateway_url)
                entries += [(e["key"], e["value"]) for e in out["entries"]]
                cursor = out.get("cursor")
                if key is not None or not cursor:
                    return entries
        finally:
            await session.close()


def _print_entries(entries: list[tuple[str, Any]], key: str | None) -> None:
    if key is None:
        print_json(dict(entries))
        return
    if not entries:
        fail_line(f"no key {key!r} in this bundle's state")
        raise SystemExit(EXIT_NO_KEY)
    print_json(entries[0][1])


@state.command("export")
@config_option
@namespace_options
def state_export(config_path: Path, author: str, rkey: str) -> None:
    """Print a bundle's whole state as one JSON object (key -> value), for a backup or a move:
    `atrund state export ... > state.json`."""
    entries, _ = _store(config_path).read(author, rkey, limit=None)
    click.echo(json.dumps(dict(entries), ensure_ascii=False, indent=2))


@state.command("delete")
@config_option
@namespace_options
@click.argument("keys", nargs=-1)
@click.option("--all", "every", is_flag=True, help="The whole namespace.")
def state_delete(config_path: Path, author: str, rkey: str, keys: tuple[str, ...], every: bool) -> None:
    """Delete KEYS of a bundle's state, or --all of it."""
    if bool(keys) == every:
        raise click.UsageError("give the keys to delete, or --all")
    deleted = _store(config_path).store.drop_bundle_state(author, rkey, None if every else list(keys))
    click.echo(f"deleted {deleted} key(s)", err=True)


@state.command("migrate")
@config_option
def state_migrate(config_path: Path) -> None:
    """Bring the state database's schema up to date (`serve` does it too, at every start). Safe
    while runners use the database: each migration is applied once, under a lock."""
    cfg = load_config(config_path)
    if cfg.state.url is None:
        err.print(f"[green]ok[/green]: SQLite in {cfg.state.dir}: its schema is brought up to date whenever a runner "
                  "opens it; nothing to migrate")
        return
    from atrund.pgstate import migrate_url, where

    before, after = migrate_url(cfg.state.url)
    did = f"migrated from version {before} to {after}" if after != before else f"already at version {after}"
    err.print(f"[green]ok[/green]: {where(cfg.state.url)}: schema {did}")


@state.command("copy")
@config_option
@click.option("--to", "url", required=True, metavar="POSTGRESQL_URL",
              help="The Postgres database to copy into (postgresql://USER@HOST/DB; the password from PGPASSWORD, a "
                   "PGPASSFILE or ~/.pgpass): new and empty, migrated by this command.")
def state_copy(config_path: Path, url: str) -> None:
    """Move a stopped SQLite runner (-c its configuration) into Postgres: copy its whole state
    (invocations, cursors, outbox, schedules and triggers, inactive accounts, logs, bundles'
    state, the access policy file) into an empty database in one transaction, then mark the
    SQLite state directory moved so that it is not run again. docs/scaling.md."""
    from pydantic import ValidationError

    from atrund.access import PolicyFile
    from atrund.config import StateSection
    from atrund.errors import CopyRefused
    from atrund.pgcopy import copy
    from atrund.pgstate import where
    from atrund.state import State

    cfg = load_config(config_path)
    if cfg.state.url is not None:
        raise CopyRefused(f"{config_path}: its state is already in Postgres (state.url); give the SQLite runner's configuration")
    try:
        StateSection(url=url)
    except ValidationError as e:
        raise click.BadParameter(e.errors()[0]["msg"].removeprefix("Value error, "), param_hint="--to") from None
    path = cfg.state.dir / "atrund.sqlite3"
    if not path.is_file():
        raise CopyRefused(f"no SQLite state at {path} (state.dir of {config_path}): nothing to copy")
    try:
        source = State(path)
    except StateLocked:
        raise StateLocked(f"{cfg.state.dir} is in use by a running runner: stop it (systemctl stop atrund) before copying "
                          "its state, so that nothing it does after the copy is lost") from None
    try:
        entries = PolicyFile(cfg.access_file).read()
        copied = copy(source, url, sorted(entries.allow), sorted(entries.deny))
    finally:
        source.close()
    rows = ", ".join(f"{table} {n}" for table, n in copied.items())
    err.print(f"[green]ok[/green]: copied {cfg.state.dir} into the {where(url)} ({rows}); {cfg.state.dir} is marked "
              "moved: start the replicas with state.url naming the database")
