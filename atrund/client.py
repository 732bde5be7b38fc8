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
from atrund.errors import (
    CallFailed,
    EndpointUndeclared,
    InvalidUrl,
    LoginFailed,
    Malformed,
    NoSession,
    NotARunner,
    NotFound,
    RunnerMismatch,
    Unreachable,
)
from atrund.records import (
    BUNDLE,
    GET_LOGS,
    GET_STATE,
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
    Runner,
    Schedule,
    Trigger,
    decode_data,
    field_errors,
    now_iso,
    origin_record,
    result_rkey,
    result_uri,
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


async def get_bundle(repos: Repos, uri: str) -> tuple[str, dict[str, Any]]:
    """The bundle record at ``uri`` (its CID and value); Malformed if it is not one."""
    cid, value = await _get(repos, uri)
    try:
        Bundle.model_validate(value)
    except ValidationError as e:
        raise Malformed(f"{uri} is not a bundle record: {field_errors(e)}") from None
    return cid, value


async def _get(repos: Repos, uri: str) -> tuple[str, dict[str, Any]]:
    """The record at ``uri`` (its CID and value); the CLI has checked the URI's form already."""
    parsed = AtUri.parse(uri)
    return await repos.get_record(parsed.authority, parsed.collection, parsed.rkey)


@contextlib.asynccontextmanager
async def reader(plc_url: str = PLC_DIRECTORY, timeout: float | None = None) -> AsyncIterator[Repos]:
    """Read anyone's repo (no login): the one place the CLI builds a Repos, closed on the way out.

    Private addresses are allowed: an author's own tool reads what its user names, on their
    machine (the runner's reads are the ones guarded, atrund.atproto.addresses)."""
    repos = Repos(Identities(plc_url, **({} if timeout is None else {"timeout": timeout}), allow_private_addresses=True))
    try:
        yield repos
    finally:
        await repos.close()


# Answers com.atproto.identity.resolveHandle for any handle: where a command that has no PDS of
# the author's (a read, no login) resolves a handle.
HANDLE_RESOLVER = "https://public.api.bsky.app"


async def did_of(repos: Repos, who: str, pds: str | None = None) -> str:
    """``who`` (a DID or a handle) as a DID, checked before anything is written: a DID must have
    a DID document; a handle is resolved through ``pds`` and verified both ways (the DID
    document claims the handle back). IdentityError naming ``who`` otherwise."""
    if who.startswith("did:"):
        await repos.identities.document(who)
        return who
    return await repos.identities.did_for_handle(who.lower().removeprefix("@"), pds or HANDLE_RESOLVER)


async def runner_record(repos: Repos, runner: str) -> Runner:
    """``runner``'s dev.atrun.runner record; NotARunner if it publishes none (or a broken one)."""
    try:
        _, value = await repos.get_record(runner, RUNNER, "self")
    except NotFound:
        raise NotARunner(f"{runner} has no dev.atrun.runner record: it runs no atrund runner (or has not started one)") \
            from None
    try:
        return Runner.model_validate(value)
    except ValidationError as e:
        raise NotARunner(f"{runner}'s dev.atrun.runner record is not valid: {field_errors(e)}") from None


async def check_invocable(repos: Repos, bundle_uri: str, runner: str, endpoint: str,
                          cid: str | None = None) -> tuple[str, Runner]:
    """Before an invocation is written: ``runner`` publishes a runner record listing the bundle's
    runtime, and the bundle (at ``cid``, else its current version) declares ``endpoint`` when it
    declares any. Returns the CID checked and the runner's record; raises what the runner would
    only answer later (NotARunner, RunnerMismatch, EndpointUndeclared)."""
    declared = await runner_record(repos, runner)
    if cid is None:
        cid, value = await _get(repos, bundle_uri)
    else:
        parsed = AtUri.parse(bundle_uri)
        value = await repos.get_verified_record(parsed.authority, parsed.collection, parsed.rkey, cid)
    try:
        bundle = Bundle.model_validate(value)
    except ValidationError as e:
        raise Malformed(f"{bundle_uri} is not a bundle record: {field_errors(e)}") from None
    if bundle.runtime not in declared.runtimes:
        raise RunnerMismatch(f"runner {runner} runs {', '.join(declared.runtimes) or 'no runtime'}, not {bundle.runtime} "
                             f"(the runtime of {bundle_uri})")
    if bundle.endpoints is not None and endpoint not in bundle.endpoints:
        raise EndpointUndeclared(f"endpoint {endpoint!r} is not one the bundle declares "
                                 f"({', '.join(bundle.endpoints) or 'none'})")
    return cid, declared


async def rate_note(repos: Repos, author: str, runner: Runner, runner_did: str) -> str | None:
    """What to tell an author who waits: that their recent invocations on ``runner_did`` are
    past the per-author rate its record announces (a token bucket, as the runner keeps it), and
    about how long this one waits for its turn; None when they are within it."""
    limits = runner.limits
    if limits is None or not limits.per_author_per_minute or not limits.per_author_burst:
        return None
    per_second = limits.per_author_per_minute / 60
    horizon = time.time() - limits.per_author_burst / per_second - 60  # older starts no longer weigh
    records, _ = await repos.list_records(author, INVOCATION, limit=100, newest_first=True)
    starts = sorted(t for r in records
                    if isinstance(v := r.get("value"), dict) and v.get("runner") == runner_did
                    and (t := _epoch(v.get("createdAt"))) is not None and t >= horizon)
    tokens, last = float(limits.per_author_burst), None
    for t in starts:
        if last is not None:
            tokens = min(float(limits.per_author_burst), tokens + (t - last) * per_second)
        tokens, last = tokens - 1, t
    if tokens >= 0 or last is None:
        return None
    behind = -tokens / per_second - (time.time() - last)
    if behind <= 0:
        return None
    return (f"you are over this runner's per-author rate ({limits.per_author_per_minute}/min, burst "
            f"{limits.per_author_burst}): {len(starts)} recent invocations; this one waits about {behind:.0f} s for its turn")


def _epoch(stamp: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


async def login(repos: Repos, identifier: str, password: str, pds: str | None = None) -> Session:
    """Log in to ``pds``, or to the PDS ``identifier`` (a DID) names in its DID document."""
    if pds is None:
        pds = await repos.identities.pds(identifier)
    return await Session.login(check_url(pds, "the PDS URL"), identifier, password)


# -- a kept session (`atrund login`): passwords stay out of commands ------------------------

def session_file() -> Path:
    """Where `atrund login` keeps the author's session: $ATRUND_SESSION_FILE, else
    $XDG_CONFIG_HOME/atrund/session.json (~/.config/atrund/session.json)."""
    import os

    if os.environ.get("ATRUND_SESSION_FILE"):
        return Path(os.environ["ATRUND_SESSION_FILE"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "atrund" / "session.json"


def keep_session(session: Session, path: Path | None = None) -> Path:
    """Write ``session`` (its tokens, refresh token included) to ``path``, mode 0600 from the
    start (never readable by others, not even for a moment), replacing what was there."""
    import os

    path = path or session_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"did": session.did, "handle": session.handle, "pds": session.pds, "session": session.export()}, f)
    os.replace(tmp, path)
    return path


def kept_session(path: Path | None = None) -> dict[str, str] | None:
    """What `atrund login` kept (did, handle, pds, session), or None when nothing is kept."""
    path = path or session_file()
    try:
        kept = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise NoSession(f"{path}: cannot read the kept session: {e}") from None
    if not isinstance(kept, dict) or not all(isinstance(kept.get(k), str) for k in ("did", "pds", "session")):
        raise NoSession(f"{path}: not a session kept by `atrund login`")
    return kept


async def resume(identifier: str | None = None, path: Path | None = None) -> Session:
    """The session `atrund login` kept (for ``identifier``, when given), its tokens refreshed as
    needed and the refreshed ones kept again; NoSession when there is none (for them)."""
    path = path or session_file()
    kept = kept_session(path)
    if kept is None:
        raise NoSession(f"no login given and no session kept in {path}")
    if identifier and identifier.lower().removeprefix("@") not in (kept["did"], kept.get("handle", "").lower()):
        raise NoSession(f"the session kept in {path} is {kept.get('handle') or kept['did']}'s, not {identifier}'s")
    try:
        session = await Session.resume(kept["pds"], kept["session"])
    except LoginFailed:
        raise NoSession(f"the session kept in {path} has expired or was revoked") from None
    session.client.on_session_change(lambda event, _: keep_session(session, path))
    keep_session(session, path)  # the tokens may have been refreshed while resuming
    return session


async def seal(repos: Repos, secrets: dict[str, str], runner: str, author: str, bundle_uri: str) -> list[dict[str, str]]:
    """Seal ``secrets`` (name -> value) to the key ``runner``'s dev.atrun.runner record publishes,
    bound to ``author``, the runner and ``bundle_uri``: the objects a record's ``secrets`` holds."""
    try:
        _, runner_record = await repos.get_record(runner, RUNNER, "self")
    except NotFound:
        raise NotARunner(f"{runner} has no dev.atrun.runner record: is it a runner?") from None
    key = RunnerKey.from_record(runner_record, runner)
    return [seal_one(n, v, key, author=author, runner=runner, bundle_uri=bundle_uri) for n, v in secrets.items()]


def check_file(path: Path, runtime: str, endpoints: list[str] | None) -> list[str] | None:
    """What `bundle publish` checks before uploading (atrund.execute.check): the file's extension
    fits ``runtime``, the runtime's own checker parses it, and ``endpoints`` are defined in it.
    Returns the endpoints to declare: those given, else the ones the file defines."""
    from atrund.config import RUNTIMES_DIR
    from atrund.execute.check import check_bundle
    from atrund.execute.runtimes import load_runtimes

    return check_bundle(path, runtime, load_runtimes(RUNTIMES_DIR), endpoints)


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
                  secret_values: dict[str, str] | None = None, runner: str | None = None, rkey: str | None = None,
                  **fields: Any) -> Published:
    """Upload ``code`` as a blob and write a dev.atrun.bundle record for it (``fields``: see
    bundle_record), at ``rkey`` (a new one when None). ``secret_values`` (name -> value) are
    sealed to ``runner`` (its key read through ``repos``) and bound to this bundle, so its record
    key is chosen before it exists."""
    # The record is checked before anything is written: a refused publish leaves no orphan blob.
    bundle_record(runtime, {"$type": "blob", "ref": {"$link": cid_of(code)}, "mimeType": mime, "size": len(code)}, **fields)
    blob = await session.upload_blob(code, mime)
    rkey = rkey or new_tid()
    if secret_values:
        fields["secrets"] = await seal(repos, secret_values, runner, session.did, str(AtUri(session.did, BUNDLE, rkey)))
    record = bundle_record(runtime, blob, **fields)
    uri, cid = await session.put_record(BUNDLE, rkey, record)
    return Published(uri, cid, record)


def _own(session: Session, uri: str, collection: str) -> AtUri:
    """``uri`` parsed, if it is a record of ``collection`` in the author's own repo."""
    parsed = AtUri.parse(uri)
    if parsed.collection != collection:
        raise Malformed(f"{uri} is not a {collection} record")
    if parsed.authority not in (session.did, session.handle):
        raise Malformed(f"{uri} is not in your repo ({session.did}): only its author can change it")
    return parsed


async def update(session: Session, repos: Repos, bundle_uri: str, code: bytes, *, mime: str,
                 endpoints: list[str] | None = None) -> Published:
    """New code for the author's bundle at ``bundle_uri``: the same record key (so the same AT URI
    and gateway URL, and its sealed secrets still open), a new CID. Its other fields are kept;
    ``endpoints``, when given, replace the declared ones."""
    parsed = _own(session, bundle_uri, BUNDLE)
    _, old = await _get(repos, bundle_uri)
    fields = {k: v for k, v in old.items() if k not in ("$type", "code", "createdAt", "runtime")}
    if endpoints is not None:
        fields["endpoints"] = endpoints
    return await publish(session, repos, code, old.get("runtime", ""), mime=mime, rkey=parsed.rkey, **fields)


async def delete(session: Session, uri: str, collection: str = BUNDLE) -> None:
    """Delete the author's own record at ``uri`` (a bundle, or an invocation)."""
    parsed = _own(session, uri, collection)
    await session.delete_record(collection, parsed.rkey)


async def list_bundles(repos: Repos, did: str) -> list[dict[str, Any]]:
    """``did``'s bundles, newest first: URI, CID, name, runtime, endpoints, when."""
    out = []
    async for record in _records(repos, did, BUNDLE):
        v = record["value"]
        out.append({"uri": record.get("uri"), "cid": record.get("cid"), "name": v.get("name"), "runtime": v.get("runtime"),
                    "endpoints": v.get("endpoints"), "createdAt": v.get("createdAt")})
    return out


async def _records(repos: Repos, did: str, collection: str, limit: int | None = None) -> AsyncIterator[dict[str, Any]]:
    """Every record of ``collection`` in ``did``'s repo, newest first (at most ``limit``)."""
    cursor, seen = None, 0
    while True:
        page, cursor = await repos.list_records(did, collection, cursor, newest_first=True)
        for record in page:
            if isinstance(record, dict) and isinstance(record.get("value"), dict):
                yield record
                seen += 1
                if limit is not None and seen >= limit:
                    return
        if not cursor or not page:
            return


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


WRITES_PER_COMMIT = 200  # the reference PDS's cap on one applyWrites


async def invoke_many(session: Session, bundle: dict[str, str], runner: str, endpoint: str,
                      many_args: list[dict[str, Any]]) -> list[str]:
    """Write one invocation of ``bundle`` (a strong reference: uri, cid) on ``runner`` per
    item of ``many_args``, WRITES_PER_COMMIT to an applyWrites commit (a burst costs a few
    commits, not one per invocation); returns their URIs in the order given."""
    records = [(new_tid(), invocation_record(runner, bundle, endpoint, args)) for args in many_args]
    for start in range(0, len(records), WRITES_PER_COMMIT):
        await session.apply_creates(INVOCATION, records[start:start + WRITES_PER_COMMIT])
    return [str(AtUri(session.did, INVOCATION, rkey)) for rkey, _ in records]


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


def _result_line(uri: str, value: dict[str, Any]) -> dict[str, Any]:
    """A result record as `result list` and `result watch` print it: one short entry."""
    out: dict[str, Any] = {"uri": uri, "status": value.get("status"), "createdAt": value.get("createdAt"),
                           "bundle": (value.get("bundle") or {}).get("uri")}
    if isinstance(value.get("invocation"), dict):
        out["invocation"] = value["invocation"].get("uri")
    if value.get("caller"):
        out["caller"] = value["caller"]
    for origin, detail in (("schedule", "scheduledAt"), ("trigger", "event")):  # a tick's, a firing's
        if isinstance(value.get(origin), dict):
            out[origin], out[detail] = value[origin].get("uri"), value.get(detail)
    if "data" in value:
        out["value"] = decode_data(value["data"])
    if value.get("error"):
        out["error"] = value["error"]
    return out


def _result_matches(value: dict[str, Any], author: str | None, bundle: str | None) -> bool:
    """Is this result one of ``author``'s (an invocation of theirs, or their XRPC call), of ``bundle``?"""
    if bundle is not None and (value.get("bundle") or {}).get("uri") != bundle:
        return False
    if author is None:
        return True
    invocation = (value.get("invocation") or {}).get("uri") or ""
    return invocation.startswith(f"at://{author}/") or value.get("caller") == author


async def list_results(repos: Repos, *, runner: str | None = None, author: str | None = None, bundle: str | None = None,
                       limit: int = 50) -> list[dict[str, Any]]:
    """Results, newest first, at most ``limit``: with ``runner``, the ones in its repo (only
    ``author``'s, only of ``bundle``, when given); without, ``author``'s invocations (needed
    then), each with its result on the runner it named, or ``pending`` if none yet."""
    out: list[dict[str, Any]] = []
    if runner is not None:
        async for record in _records(repos, runner, RESULT):
            if _result_matches(record["value"], author, bundle):
                out.append(_result_line(record.get("uri", ""), record["value"]))
                if len(out) >= limit:
                    break
        return out
    if author is None:
        raise Malformed("result list needs a runner or an author (--runner, or --mine with your identifier)")
    async for record in _records(repos, author, INVOCATION):
        inv = record["value"]
        if bundle is not None and (inv.get("bundle") or {}).get("uri") != bundle:
            continue
        runner_did, uri = inv.get("runner"), record.get("uri", "")
        if not isinstance(runner_did, str) or not runner_did.startswith("did:"):
            continue
        where = result_uri(runner_did, uri)
        try:
            _, value = await repos.get_record(runner_did, RESULT, result_rkey(uri))
            out.append(_result_line(where, value))
        except NotFound:
            out.append({"uri": where, "status": "pending", "createdAt": inv.get("createdAt"),
                        "bundle": (inv.get("bundle") or {}).get("uri"), "invocation": uri})
        if len(out) >= limit:
            break
    return out


async def watch_results(repos: Repos, runner: str, *, author: str | None = None, bundle: str | None = None,
                        interval: float = 1.0) -> AsyncIterator[dict[str, Any]]:
    """New results in ``runner``'s repo as they land (only ``author``'s, of ``bundle``, when
    given), by polling its newest records every ``interval`` seconds; those there already are
    not repeated."""
    seen: set[str] = set()
    first = True
    while True:
        page, _ = await repos.list_records(runner, RESULT, limit=100, newest_first=True)
        fresh = [r for r in page if isinstance(r, dict) and isinstance(r.get("value"), dict) and r.get("uri") not in seen]
        seen.update(r.get("uri") for r in fresh)
        if not first:
            for record in reversed(fresh):  # oldest of the new first
                if _result_matches(record["value"], author, bundle):
                    yield _result_line(record["uri"], record["value"])
        first = False
        await asyncio.sleep(interval)


async def call(session: Session, repos: Repos, bundle_uri: str, runner: str, endpoint: str, args: dict[str, Any], *,
               cid: str | None = None, timeout: int | None = None, write_result: bool = False,
               gateway_url: str | None = None) -> dict[str, Any]:
    """Run ``endpoint`` of ``bundle_uri`` on ``runner`` now (XRPC dev.atrun.invoke, with a
    single-use service-auth token from the author's PDS) and return its answer, the value
    unwrapped. The runner's gateway is read from its record unless ``gateway_url`` is given."""

    if cid is None:
        cid, _ = await _get(repos, bundle_uri)
    body: dict[str, Any] = {"bundle": {"uri": bundle_uri, "cid": cid}, "endpoint": endpoint, "args": args}  # the lexicon's input
    if timeout is not None:
        body["timeout"] = timeout
    if write_result:
        body["writeResult"] = True
    out = await _xrpc(session, repos, runner, INVOKE, gateway_url, body=body)
    if "data" in out:
        out["value"] = decode_data(out["data"])
    return out


async def get_state(session: Session, repos: Repos, bundle_uri: str, runner: str, *, key: str | None = None,
                    prefix: str | None = None, cursor: str | None = None, limit: int | None = None,
                    gateway_url: str | None = None) -> dict[str, Any]:
    """Read the state a runner keeps for one of the author's bundles (XRPC dev.atrun.getState,
    with a single-use service-auth token): ``{"entries": [{"key", "value"}], "cursor"?}``, the
    values decoded. With ``key``, that key only (no entry: absent); else a page of keys."""
    params = {name: value for name, value in (("bundle", bundle_uri), ("key", key), ("prefix", prefix), ("cursor", cursor),
                                              ("limit", None if limit is None else str(limit))) if value is not None}
    out = await _xrpc(session, repos, runner, GET_STATE, gateway_url, params=params)
    entries = out.get("entries") if isinstance(out.get("entries"), list) else []
    out["entries"] = [{"key": e.get("key"), "value": decode_data(e.get("value"))} for e in entries if isinstance(e, dict)]
    return out


async def get_logs(session: Session, repos: Repos, runner: str, *, id: str | None = None, bundle: str | None = None,
                   cursor: str | None = None, limit: int = 50, gateway_url: str | None = None) -> dict[str, Any]:
    """What runs printed and why they failed (XRPC dev.atrun.getLogs): one run's entries (``id``:
    an invocation's AT URI, or a gateway or XRPC request id) or a bundle's (its author only)."""
    params = {k: v for k, v in (("id", id), ("bundle", bundle), ("cursor", cursor)) if v is not None}
    return await _xrpc(session, repos, runner, GET_LOGS, gateway_url, params={**params, "limit": str(limit)})


async def runner_of(repos: Repos, uri: str) -> str | None:
    """The runner an invocation (or a schedule or trigger: a tick's or firing's key) was addressed
    to, as its record says; None if ``uri`` names no such record (a request id)."""
    if not uri.startswith("at://"):
        return None
    _, value = await _get(repos, origin_record(uri))
    runner = value.get("runner")
    if not isinstance(runner, str):
        raise Malformed(f"{uri} names no runner")
    return runner


async def _xrpc(session: Session, repos: Repos, runner: str, nsid: str, gateway_url: str | None, *,
                body: dict[str, Any] | None = None, params: dict[str, str] | None = None) -> dict[str, Any]:
    """Call ``nsid`` on the runner's gateway (read from its record unless ``gateway_url`` is
    given) with a single-use service-auth token from the author's PDS: a procedure with
    ``body``, else a query with ``params``. Its answer, a JSON object; CallFailed otherwise."""
    import aiohttp

    if gateway_url is None:
        _, declared = await repos.get_record(runner, RUNNER, "self")
        gateway_url = declared.get("gatewayUrl")
        if not gateway_url:
            raise CallFailed(f"runner {runner} publishes no gatewayUrl: it does not serve XRPC")
    token = await session.service_token(runner, nsid)
    url = gateway_url.rstrip("/") + "/xrpc/" + nsid
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as http:
            request = http.post(url, json=body, headers=headers) if body is not None else http.get(url, params=params, headers=headers)
            async with request as resp:
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
    """An author's schedules or triggers ({uri, cid, value}), newest first."""
    return [record async for record in _records(repos, author, collection, limit)]


def next_tick(value: dict[str, Any], now: float | None = None) -> float | None:
    """When a schedule record next ticks (its scheduled time; the runner may add its jitter)."""
    return Timetable.of(value).next_after(time.time() if now is None else now)


async def results_of(repos: Repos, uri: str, runner: str | None = None, limit: int = 20,
                     max_pages: int = 20) -> list[dict[str, Any]]:
    """The latest results (newest first) of a schedule's ticks or a trigger's firings: the result
    records in the runner's repo (``runner``, else the one the schedule or trigger names) whose
    ``schedule`` or ``trigger`` is ``uri``; at most ``max_pages`` pages of 100 are looked through."""
    try:
        at = AtUri.parse(uri)
    except ValueError as e:
        raise Malformed(str(e)) from None
    if at.collection not in (SCHEDULE, TRIGGER):
        raise Malformed(f"{uri} is neither a {SCHEDULE} nor a {TRIGGER} record")
    if runner is None:
        _, value = await _get(repos, uri)
        runner = value.get("runner")
        if not isinstance(runner, str):
            raise Malformed(f"{uri} names no runner; give --runner")
    field = "schedule" if at.collection == SCHEDULE else "trigger"
    found: list[dict[str, Any]] = []
    cursor = None
    for _ in range(max_pages):
        records, cursor = await repos.list_records(runner, RESULT, cursor=cursor, limit=100, newest_first=True)
        for rec in records:
            value = rec.get("value") if isinstance(rec, dict) else None
            ref = value.get(field) if isinstance(value, dict) else None
            if isinstance(ref, dict) and ref.get("uri") == uri:
                found.append(_result_line(rec.get("uri"), value))
        if len(found) >= limit or cursor is None or not records:
            break
    found.sort(key=lambda r: r.get("scheduledAt") or r.get("createdAt") or "", reverse=True)
    return found[:limit]
