"""An author's side of atrund, as a library: publish a bundle, invoke it, wait for its result,
read a result, call a runner over XRPC, seal secrets to a runner.

The CLI, the demo, the tests' fixtures and the bench scripts all go through here, so every
dev.atrun.* record an author writes is built from the models in ``atrund.records`` (and
validated by them) in one place. Reads need no login (``reader``); writes need a ``Session``
(``login``). Failures are AtrundErrors (atrund.errors), never a click exception: the CLI turns
them into one line and an exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos, cid_of
from atrund.atproto.session import Session
from atrund.atproto.uri import AtUri, new_tid
from atrund.config import PLC_DIRECTORY, url_problem
from atrund.errors import CallFailed, InvalidUrl, Malformed, NotARunner, NotFound, Unreachable
from atrund.records import (
    BUNDLE,
    INVOCATION,
    INVOKE,
    RESULT,
    RUNNER,
    SCHEDULE,
    TRIGGER,
    Bundle,
    Invocation,
    Record,
    Result,
    Schedule,
    Trigger,
    decode_data,
    field_errors,
    now_iso,
    result_rkey,
)
from atrund.sealed import RunnerKey
from atrund.sealed import seal as seal_one
from atrund.timetable import Timetable

CODE_MIME = {".py": "text/x-python", ".ts": "application/typescript", ".js": "text/javascript",
             ".mjs": "text/javascript"}  # mimetypes calls .ts an MPEG stream


def code_mime(path: Path) -> str:
    import mimetypes

    return CODE_MIME.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def check_url(url: str, what: str) -> str:
    """``url`` if it is an http(s) URL with a host; else InvalidUrl naming ``what`` and the fix."""
    if problem := url_problem(url, ("http", "https")):
        raise InvalidUrl(f"{what} {problem}")
    return url


async def _get(repos: Repos, uri: str) -> tuple[str, dict[str, Any]]:
    """The record at ``uri`` (its CID and value); the CLI has checked the URI's form already."""
    parsed = AtUri.parse(uri)
    return await repos.get_record(parsed.authority, parsed.collection, parsed.rkey)


@contextlib.asynccontextmanager
async def reader(plc_url: str = PLC_DIRECTORY, timeout: float | None = None) -> AsyncIterator[Repos]:
    """Read anyone's repo (no login): the one place the CLI builds a Repos, closed on the way out."""
    repos = Repos(Identities(plc_url) if timeout is None else Identities(plc_url, timeout=timeout))
    try:
        yield repos
    finally:
        await repos.close()


async def login(repos: Repos, identifier: str, password: str, pds: str | None = None) -> Session:
    """Log in to ``pds``, or to the PDS ``identifier`` (a DID) names in its DID document."""
    if pds is None:
        pds = await repos.identities.pds(identifier)
    return await Session.login(check_url(pds, "the PDS URL"), identifier, password)


async def seal(repos: Repos, secrets: dict[str, str], runner: str, author: str, bundle_uri: str) -> list[dict[str, str]]:
    """Seal ``secrets`` (name -> value) to the key ``runner``'s dev.atrun.runner record publishes,
    bound to ``author``, the runner and ``bundle_uri``: the objects a record's ``secrets`` holds."""
    try:
        _, runner_record = await repos.get_record(runner, RUNNER, "self")
    except NotFound:
        raise NotARunner(f"{runner} has no dev.atrun.runner record: is it a runner?") from None
    key = RunnerKey.from_record(runner_record, runner)
    return [seal_one(n, v, key, author=author, runner=runner, bundle_uri=bundle_uri) for n, v in secrets.items()]


@dataclass(frozen=True)
class Published:
    uri: str
    cid: str
    record: dict[str, Any]

    @property
    def ref(self) -> dict[str, str]:
        """The strong reference an invocation pins."""
        return {"uri": self.uri, "cid": self.cid}


def bundle_record(runtime: str, code: dict[str, Any], *, created_at: str | None = None, **fields: Any) -> dict[str, Any]:
    """A dev.atrun.bundle record, validated: ``code`` is the uploaded blob, ``fields`` the
    record's other fields (snake_case or as on the wire)."""
    return _record(Bundle, "bundle", {"runtime": runtime, "code": code, "created_at": created_at or now_iso(), **fields})


def invocation_record(runner: str, bundle: dict[str, str], endpoint: str, args: dict[str, Any] | None = None, *,
                      created_at: str | None = None, **fields: Any) -> dict[str, Any]:
    """A dev.atrun.invocation record, validated: ``bundle`` is the strong reference (uri, cid)
    it pins; ``args`` is left out when None; ``fields`` are the others (timeout, secrets)."""
    if args is not None:
        fields["args"] = args
    return _record(Invocation, "invocation", {"runner": runner, "bundle": bundle, "endpoint": endpoint,
                                              "created_at": created_at or now_iso(), **fields})


def _record(model: type[Record], what: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as the record ``model`` says it must be; Malformed naming the first bad field if
    not (a --runner that is not a DID, a --cid that is not a CID, a --timeout of 0)."""
    try:
        return model.model_validate(data).to_record()
    except ValidationError as e:
        raise Malformed(f"the {what} record would not be valid: {field_errors(e)}") from None


async def publish(session: Session, repos: Repos | None, code: bytes, runtime: str, *, mime: str = "text/x-python",
                  secret_values: dict[str, str] | None = None, runner: str | None = None, **fields: Any) -> Published:
    """Upload ``code`` as a blob and write a dev.atrun.bundle record for it (``fields``: see
    bundle_record). ``secret_values`` (name -> value) are sealed to ``runner`` (its key read
    through ``repos``) and bound to this bundle, so its record key is chosen before it exists."""
    # The record is checked before anything is written: a refused publish leaves no orphan blob.
    bundle_record(runtime, {"$type": "blob", "ref": {"$link": cid_of(code)}, "mimeType": mime, "size": len(code)}, **fields)
    blob = await session.upload_blob(code, mime)
    rkey = new_tid()
    if secret_values:
        fields["secrets"] = await seal(repos, secret_values, runner, session.did, str(AtUri(session.did, BUNDLE, rkey)))
    record = bundle_record(runtime, blob, **fields)
    uri, cid = await session.put_record(BUNDLE, rkey, record)
    return Published(uri, cid, record)


async def invoke(session: Session, repos: Repos | None, bundle_uri: str, runner: str, endpoint: str,
                 args: dict[str, Any] | None = None, *, cid: str | None = None, secret_values: dict[str, str] | None = None,
                 **fields: Any) -> tuple[str, str]:
    """Write a dev.atrun.invocation of ``bundle_uri`` on ``runner``, pinned to ``cid`` (else to
    the bundle's current CID, read through ``repos``); returns its URI and CID.
    ``secret_values`` (name -> value) are sealed to the runner, bound to this author and
    bundle; ``fields`` are the record's others (``timeout``, or ``secrets`` already sealed)."""
    if cid is None:
        cid, _ = await _get(repos, bundle_uri)
    if secret_values:
        fields["secrets"] = await seal(repos, secret_values, runner, session.did, bundle_uri)
    record = invocation_record(runner, {"uri": bundle_uri, "cid": cid}, endpoint, args, **fields)
    return await session.create_record(INVOCATION, record)


def describe_result(cid: str, value: dict[str, Any]) -> dict[str, Any]:
    """A result record as the CLI prints it: its CID, status, the record, and the value unwrapped."""
    out: dict[str, Any] = {"cid": cid, "status": value.get("status"), "record": value}
    if "data" in value:
        out["value"] = decode_data(value["data"])
    return out


async def wait_result(repos: Repos, runner: str, invocation_uri: str, wait_seconds: float,
                      max_delay: float = 1.0) -> dict[str, Any] | None:
    """Poll the computed result URI (as any AT client would) until the record exists: it as
    ``describe_result`` gives it, or None after ``wait_seconds``."""
    deadline = time.monotonic() + wait_seconds
    delay = min(0.1, max_delay)
    while time.monotonic() < deadline:
        try:
            cid, value = await repos.get_record(runner, RESULT, result_rkey(invocation_uri))
            return describe_result(cid, value)
        except NotFound:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, max_delay)
    return None


async def get_result(repos: Repos, uri: str) -> dict[str, Any]:
    """The result record at ``uri`` (anyone can read it); Malformed, naming the field, if it is not one."""
    cid, value = await _get(repos, uri)
    try:
        Result.model_validate(value)
    except ValidationError as e:
        raise Malformed(f"{uri} is not a result record: {field_errors(e)}") from None
    return {"uri": uri, **describe_result(cid, value)}


async def call(session: Session, repos: Repos, bundle_uri: str, runner: str, endpoint: str, args: dict[str, Any], *,
               cid: str | None = None, timeout: int | None = None, write_result: bool = False,
               gateway_url: str | None = None) -> dict[str, Any]:
    """Run ``endpoint`` of ``bundle_uri`` on ``runner`` now (XRPC dev.atrun.invoke, with a
    single-use service-auth token from the author's PDS) and return its answer, the value
    unwrapped. The runner's gateway is read from its record unless ``gateway_url`` is given."""
    import aiohttp

    if cid is None:
        cid, _ = await _get(repos, bundle_uri)
    if gateway_url is None:
        _, declared = await repos.get_record(runner, RUNNER, "self")
        gateway_url = declared.get("gatewayUrl")
        if not gateway_url:
            raise CallFailed(f"runner {runner} publishes no gatewayUrl: it does not serve XRPC invoke")
    token = await session.service_token(runner, INVOKE)
    body: dict[str, Any] = {"bundle": {"uri": bundle_uri, "cid": cid}, "endpoint": endpoint, "args": args}  # the lexicon's input
    if timeout is not None:
        body["timeout"] = timeout
    if write_result:
        body["writeResult"] = True
    url = gateway_url.rstrip("/") + "/xrpc/" + INVOKE
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
                status, text = resp.status, await resp.text()
    except aiohttp.ClientError as e:
        raise Unreachable(f"{url}: {type(e).__name__}: {e}") from None
    try:
        out = json.loads(text)
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise CallFailed(f"{url} answered HTTP {status} with something that is not a JSON object: {text[:200]!r}")
    if status != 200:
        raise CallFailed(f"{url}: HTTP {status} {out.get('error')}: {out.get('message')}")
    if "data" in out:
        out["value"] = decode_data(out["data"])
    return out


# -- schedules and triggers ---------------------------------------------------------------------
# (dev.atrun.schedule and dev.atrun.trigger: an author's standing requests, and their results)


def schedule_record(runner: str, bundle: dict[str, str], endpoint: str, *, created_at: str | None = None,
                    **fields: Any) -> dict[str, Any]:
    """A dev.atrun.schedule record, validated as the runner reads it (cron or intervalSeconds,
    a known time zone); ``fields``: cron, timezone, interval_seconds, args, start_at, end_at, catch_up."""
    record = _record(Schedule, "schedule", {"runner": runner, "bundle": bundle, "endpoint": endpoint,
                                            "created_at": created_at or now_iso(), **{k: v for k, v in fields.items() if v is not None}})
    Timetable.of(record)  # InvalidSchedule, naming what is wrong
    return record


def trigger_record(runner: str, bundle: dict[str, str], endpoint: str, collections: list[str], *,
                   created_at: str | None = None, **fields: Any) -> dict[str, Any]:
    """A dev.atrun.trigger record, validated; ``fields``: actions, authors, subject, results, args."""
    return _record(Trigger, "trigger", {"runner": runner, "bundle": bundle, "endpoint": endpoint, "collections": collections,
                                        "created_at": created_at or now_iso(), **{k: v for k, v in fields.items() if v is not None}})


async def create_schedule(session: Session, repos: Repos | None, bundle_uri: str, runner: str, endpoint: str, *,
                          cid: str | None = None, **fields: Any) -> tuple[str, str]:
    """Write a dev.atrun.schedule of ``bundle_uri`` (pinned to ``cid``, else its current CID); its URI and CID."""
    if cid is None:
        cid, _ = await _get(repos, bundle_uri)
    return await session.create_record(SCHEDULE, schedule_record(runner, {"uri": bundle_uri, "cid": cid}, endpoint, **fields))


async def create_trigger(session: Session, repos: Repos | None, bundle_uri: str, runner: str, endpoint: str,
                         collections: list[str], *, cid: str | None = None, **fields: Any) -> tuple[str, str]:
    """Write a dev.atrun.trigger of ``bundle_uri`` (pinned to ``cid``, else its current CID); its URI and CID."""
    if cid is None:
        cid, _ = await _get(repos, bundle_uri)
    record = trigger_record(runner, {"uri": bundle_uri, "cid": cid}, endpoint, collections, **fields)
    return await session.create_record(TRIGGER, record)


async def list_standing(repos: Repos, author: str, collection: str, limit: int = 1000) -> list[dict[str, Any]]:
    """An author's schedules or triggers ({uri, cid, value}), oldest first."""
    out: list[dict[str, Any]] = []
    cursor = None
    while len(out) < limit:
        records, cursor = await repos.list_records(author, collection, cursor=cursor, limit=100)
        out += [r for r in records if isinstance(r, dict)]
        if not records or cursor is None:
            break
    return out[:limit]


async def delete_standing(session: Session, uri: str, collection: str) -> None:
    """Delete one of the author's own schedules or triggers; the runner stops it at its next ingest."""
    try:
        at = AtUri.parse(uri)
    except ValueError as e:
        raise Malformed(str(e)) from None
    if at.collection != collection or at.did != session.did:
        raise Malformed(f"{uri} is not a {collection} record of yours ({session.did})")
    await session.delete_record(collection, at.rkey)


def next_tick(value: dict[str, Any], now: float | None = None) -> float | None:
    """When a schedule record next ticks (its scheduled time; the runner may add its jitter)."""
    return Timetable.of(value).next_after(time.time() if now is None else now)


async def results_of(repos: Repos, runner: str, uri: str, limit: int = 20, max_pages: int = 20) -> list[dict[str, Any]]:
    """The latest results (newest first) of a schedule's ticks or a trigger's firings on ``runner``:
    the result records whose ``schedule`` or ``trigger`` names ``uri``, read from the runner's
    repo (at most ``max_pages`` pages of 100 results are looked through)."""
    try:
        collection = AtUri.parse(uri).collection
    except ValueError as e:
        raise Malformed(str(e)) from None
    if collection not in (SCHEDULE, TRIGGER):
        raise Malformed(f"{uri} is neither a {SCHEDULE} nor a {TRIGGER} record")
    field = "schedule" if collection == SCHEDULE else "trigger"
    found: list[dict[str, Any]] = []
    cursor = None
    for _ in range(max_pages):
        records, cursor = await repos.list_records(runner, RESULT, cursor=cursor, limit=100, oldest_first=False)
        for rec in records:
            value = rec.get("value") if isinstance(rec, dict) else None
            ref = value.get(field) if isinstance(value, dict) else None
            if isinstance(ref, dict) and ref.get("uri") == uri:
                found.append({"uri": rec.get("uri"), **describe_result(rec.get("cid"), value)})
        if len(found) >= limit or cursor is None or not records:
            break
    found.sort(key=lambda r: r["record"].get("scheduledAt") or r["record"].get("createdAt") or "", reverse=True)
    return found[:limit]
