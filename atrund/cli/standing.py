"""Commands for an author's standing requests: schedule create|list|delete, trigger
create|list|delete (their results: ``result list --schedule|--trigger``, in atrund.cli.author);
and status (a runner's /healthz).

Thin shells over atrund.client, like atrund.cli.author: options in, JSON out.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from atrund.cli.author import _login, author_options
from atrund.cli.group import emit, load_config, main, parse_args_json, parse_uri, run_async
from atrund.config import PLC_DIRECTORY
from atrund.errors import ConfigError, Malformed, Unreachable
from atrund.records import SCHEDULE, TRIGGER, utc_second


def _runner_options(fn):
    fn = click.option("--cid", default=None, help="Pin this bundle version; the current one when omitted.")(fn)
    fn = click.option("--args", "args_json", default="{}", show_default=True, help="JSON object passed to the endpoint.")(fn)
    fn = click.option("--endpoint", required=True)(fn)
    fn = click.option("--runner", "runner_did", required=True, help="DID of the runner asked to run it.")(fn)
    return fn


def _author_did(author: str | None) -> str:
    """--author, else ATRUND_IDENTIFIER when it is a DID."""
    did = author or os.environ.get("ATRUND_IDENTIFIER")
    if not did or not did.startswith("did:"):
        raise click.UsageError("give --author DID (or set ATRUND_IDENTIFIER to your DID)")
    return did


async def _list(author: str | None, plc_url: str, collection: str, describe: Callable[..., dict[str, Any]]) -> None:
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    did = _author_did(author)
    async with client.reader(plc_url) as repos:
        records = await client.list_standing(repos, did, collection)
    emit([describe(r.get("uri"), r.get("cid"), r.get("value") or {}) for r in records])


async def _delete(uri: str, collection: str, pds: str | None, identifier: str, password: str, plc_url: str) -> None:
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    parse_uri(uri, "URI")
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            await client.delete(session, uri, collection)
        finally:
            await session.close()
    emit({"deleted": uri})


# -- schedules ----------------------------------------------------------------------------------


@main.group()
def schedule() -> None:
    """Run a bundle on a timetable (dev.atrun.schedule records)."""


def _describe_schedule(uri: str, cid: str | None, value: dict[str, Any]) -> dict[str, Any]:
    from atrund import client
    from atrund.errors import InvalidSchedule

    out = {"uri": uri, "cid": cid, "runner": value.get("runner"), "endpoint": value.get("endpoint")}
    for key in ("cron", "timezone", "intervalSeconds", "startAt", "endAt", "catchUp"):
        if key in value:
            out[key] = value[key]
    try:
        nxt = client.next_tick(value)
        out["next"] = None if nxt is None else utc_second(nxt)
    except InvalidSchedule as e:
        out["invalid"] = str(e)
    return out


@schedule.command("create")
@click.argument("bundle_uri")
@_runner_options
@click.option("--cron", default=None, help='Five cron fields, e.g. "0 9 * * 1-5".')
@click.option("--timezone", default=None, help="IANA time zone the cron is read in (default UTC), e.g. Europe/Berlin.")
@click.option("--every", "interval_seconds", type=int, default=None, help="Seconds between ticks (instead of --cron).")
@click.option("--start-at", default=None, help="No tick before this datetime (ISO 8601, with a zone).")
@click.option("--end-at", default=None, help="No tick after this datetime (ISO 8601, with a zone).")
@click.option("--catch-up", type=click.Choice(["latest", "none"]), default=None,
              help="Ticks missed while the runner was down: run the latest once (default), or none.")
@author_options
@run_async
async def schedule_create(bundle_uri: str, runner_did: str, endpoint: str, args_json: str, cid: str | None, cron: str | None,
                          timezone: str | None, interval_seconds: int | None, start_at: str | None, end_at: str | None,
                          catch_up: str | None, pds: str | None, identifier: str, password: str, plc_url: str) -> None:
    """Create a dev.atrun.schedule of BUNDLE_URI; prints its AT URI and its next run."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    args = parse_args_json(args_json)
    parse_uri(bundle_uri, "BUNDLE_URI")
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            uri, cid_ = await client.create_schedule(session, repos, bundle_uri, runner_did, endpoint, cid=cid,
                                                     args=args or None, cron=cron, timezone=timezone,
                                                     interval_seconds=interval_seconds, start_at=start_at, end_at=end_at,
                                                     catch_up=catch_up)
            _, value = await repos.get_record(session.did, SCHEDULE, uri.rsplit("/", 1)[1])
        finally:
            await session.close()
    emit(_describe_schedule(uri, cid_, value))


@schedule.command("list")
@click.option("--author", default=None, help="Whose schedules (a DID); default: ATRUND_IDENTIFIER if it is a DID.")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True)
@run_async
async def schedule_list(author: str | None, plc_url: str) -> None:
    """List an author's schedules with their next run (no login)."""
    await _list(author, plc_url, SCHEDULE, _describe_schedule)


@schedule.command("delete")
@click.argument("uri")
@author_options
@run_async
async def schedule_delete(uri: str, pds: str | None, identifier: str, password: str, plc_url: str) -> None:
    """Delete one of your schedules; the runner stops it at its next ingest."""
    await _delete(uri, SCHEDULE, pds, identifier, password, plc_url)


# -- triggers -----------------------------------------------------------------------------------


@main.group()
def trigger() -> None:
    """Run a bundle when matching records appear on the network (dev.atrun.trigger records)."""


def _describe_trigger(uri: str, cid: str | None, value: dict[str, Any]) -> dict[str, Any]:
    return {"uri": uri, "cid": cid, "runner": value.get("runner"), "endpoint": value.get("endpoint"),
            "filter": {"collections": value.get("collections"), "actions": value.get("actions") or ["create"],
                       "authors": value.get("authors"), "subject": value.get("subject")},
            "results": value.get("results") or "errors"}


@trigger.command("create")
@click.argument("bundle_uri")
@_runner_options
@click.option("--collection", "collections", multiple=True, required=True,
              help="A collection (NSID) whose records fire it, e.g. app.bsky.feed.like (repeatable; no wildcards).")
@click.option("--action", "actions", multiple=True, type=click.Choice(["create", "update", "delete"]),
              help="Which changes fire it (repeatable; default create).")
@click.option("--from", "authors", multiple=True, metavar="DID|self", help="Only records by these authors (repeatable).")
@click.option("--about-me", is_flag=True, help="Only records that point at you: likes, reposts, follows, replies, "
              "quotes and mentions of you or your records (subject = self).")
@click.option("--results", type=click.Choice(["all", "errors", "none"]), default=None,
              help="Which firings get a result record (default errors).")
@author_options
@run_async
async def trigger_create(bundle_uri: str, runner_did: str, endpoint: str, args_json: str, cid: str | None,
                         collections: tuple[str, ...], actions: tuple[str, ...], authors: tuple[str, ...], about_me: bool,
                         results: str | None, pds: str | None, identifier: str, password: str, plc_url: str) -> None:
    """Create a dev.atrun.trigger of BUNDLE_URI; prints its AT URI and its filter."""
    from atrund import client  # here, not at the top: the AT SDK takes half a second to import
    args = parse_args_json(args_json)
    parse_uri(bundle_uri, "BUNDLE_URI")
    bad = [c for c in collections if "*" in c]
    if bad:
        raise Malformed(f"--collection {bad[0]!r}: name each collection (NSID); wildcards are refused")
    async with client.reader(plc_url) as repos:
        session = await _login(repos, pds, identifier, password)
        try:
            uri, cid_ = await client.create_trigger(session, repos, bundle_uri, runner_did, endpoint, list(collections), cid=cid,
                                                    args=args or None, actions=list(actions) or None,
                                                    authors=list(authors) or None, subject="self" if about_me else None,
                                                    results=results)
            _, value = await repos.get_record(session.did, TRIGGER, uri.rsplit("/", 1)[1])
        finally:
            await session.close()
    emit(_describe_trigger(uri, cid_, value))


@trigger.command("list")
@click.option("--author", default=None, help="Whose triggers (a DID); default: ATRUND_IDENTIFIER if it is a DID.")
@click.option("--plc-url", envvar="ATRUND_PLC_URL", default=PLC_DIRECTORY, show_default=True)
@run_async
async def trigger_list(author: str | None, plc_url: str) -> None:
    """List an author's triggers with their filters (no login)."""
    await _list(author, plc_url, TRIGGER, _describe_trigger)


@trigger.command("delete")
@click.argument("uri")
@author_options
@run_async
async def trigger_delete(uri: str, pds: str | None, identifier: str, password: str, plc_url: str) -> None:
    """Delete one of your triggers; the runner stops following it at its next ingest."""
    await _delete(uri, TRIGGER, pds, identifier, password, plc_url)


# -- a runner's status ----------------------------------------------------------------------------


@main.command()
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="The runner's gateway (its [gateway] listen).")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Replicas: list the fleet from the configuration's shared state.url instead (no gateway asked).")
def status(url: str, config_path: Path | None) -> None:
    """Print a serving runner's status (its /healthz): queue, pool, schedules, triggers and their drops.
    With -c and a state.url: the fleet (replicas, roles, heartbeats, the ingest leader) and the
    queue depth per author."""
    if config_path is not None:
        cfg = load_config(config_path)
        if cfg.state.url is None:
            raise ConfigError(f"state.url: not set in {config_path}; `atrund status -c` lists replicas sharing a Postgres "
                              "state (a SQLite runner: `atrund status --url` its gateway)")
        from atrund.pgstate import fleet_of

        emit(fleet_of(cfg.state.url))
        return
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=10) as answer:  # noqa: S310 - an operator's URL
            body = answer.read()
    except urllib.error.HTTPError as e:
        body = e.read()  # 503 while degraded: the body still says why
    except (urllib.error.URLError, OSError) as e:
        raise Unreachable(f"{url}: {getattr(e, 'reason', e)}") from None
    try:
        emit(json.loads(body))
    except ValueError:
        raise Malformed(f"{url}/healthz did not answer with JSON") from None
