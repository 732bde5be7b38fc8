"""The dev.atrun.* records as pydantic models.

The lexicon files in ``lexicons/`` are the source of truth; ``tests/test_lexicons.py`` checks
these models against them so the two cannot drift. Field names on the wire are camelCase
(aliases); Python code uses snake_case.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Literal

import libipld
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from typing_extensions import Annotated

from atrund.atproto.uri import AtUri
from atrund.bounds import check_depth, step
from atrund.bounds import loads as bounds_loads
from atrund.errors import UnstorableValue

BUNDLE = "dev.atrun.bundle"
INVOCATION = "dev.atrun.invocation"
RESULT = "dev.atrun.result"
RUNNER = "dev.atrun.runner"
SCHEDULE = "dev.atrun.schedule"
TRIGGER = "dev.atrun.trigger"
INVOKE = "dev.atrun.invoke"  # the XRPC procedure (lexicons/dev/atrun/invoke.json)
GET_STATE = "dev.atrun.getState"  # the XRPC query for a bundle's state (lexicons/dev/atrun/getState.json)
GET_LOGS = "dev.atrun.getLogs"  # the XRPC query of a run's output (lexicons/dev/atrun/getLogs.json)
JSON_VALUE = "dev.atrun.defs#jsonValue"

Status = Literal["success", "error", "timeout", "rejected"]


def now_iso(at: float | None = None) -> str:
    """An AT Protocol datetime (now, or Unix time ``at``): UTC with milliseconds and a Z."""
    moment = datetime.now(timezone.utc) if at is None else datetime.fromtimestamp(at, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def unix_time(value: Any) -> float | None:
    """A datetime string (a record's createdAt: the author's claim) as Unix time; None if unreadable."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def result_rkey(invocation_uri: str) -> str:
    """The record key of the result for an invocation, computable by anyone in advance.

    First 32 characters of the lowercase, unpadded base32 of SHA-256 over the AT URI. The URI
    holds the author's DID, so one author cannot aim at another's result key.
    """
    digest = hashlib.sha256(invocation_uri.encode("utf-8")).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()[:32]


def result_uri(runner_did: str, invocation_uri: str) -> str:
    return str(AtUri(runner_did, RESULT, result_rkey(invocation_uri)))


# A run that no invocation record asked for (a schedule's tick, a trigger's firing) is known by a
# key made of its record's AT URI, '#', and what tells its runs apart: the string result_rkey
# hashes (docs/protocol.md). '#' never occurs in a record's AT URI, so these keys never collide
# with an invocation's, and the part before the first '#' is the record (its author's repo).
ORIGIN_MARK = "#"


def utc_second(t: float) -> str:
    """A scheduled time as a tick key spells it: UTC, whole seconds, ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tick_key(schedule_uri: str, scheduled: float) -> str:
    """The key of one tick of a schedule: its result is at result_rkey(tick_key(...))."""
    return f"{schedule_uri}{ORIGIN_MARK}{utc_second(scheduled)}"


def firing_key(trigger_uri: str, event_uri: str, event_cid: str | None) -> str:
    """The key of one firing of a trigger by one version of a record (``delete``: its deletion)."""
    return f"{trigger_uri}{ORIGIN_MARK}{event_uri}{ORIGIN_MARK}{event_cid or 'delete'}"


def origin_record(key: str) -> str:
    """The AT URI of the record a run's key names: the invocation's own, or the schedule's or trigger's."""
    return key.split(ORIGIN_MARK, 1)[0]


def field_errors(err: ValidationError) -> str:
    """A model's validation errors as one line: each field's dotted path and what is wrong with it."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in err.errors())


def check_cid(value: str) -> str:
    """A CID in its canonical string form (it names files in the bundle cache: never a path)."""
    try:
        parsed = libipld.decode_cid(value)
        canonical = libipld.encode_cid(libipld.decode_multibase(value)[1]) if value.startswith("b") else None
    except ValueError as e:
        raise ValueError(f"not a CID: {e}") from None
    if canonical != value or parsed["hash"]["code"] != 0x12:
        raise ValueError("not a base32 CIDv1 with a sha2-256 hash")
    return value


Cid = Annotated[str, AfterValidator(check_cid)]


def _utf8_at_most(limit: int):
    def check(value: str) -> str:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise ValueError(f"at most {limit} bytes of UTF-8 (the lexicon's maxLength), not {size}")
        return value

    return AfterValidator(check)


def Text(limit: int) -> Any:  # noqa: N802 - a type, used as one
    """A lexicon string with ``maxLength`` ``limit``: the AT Protocol counts UTF-8 bytes, not characters."""
    return Annotated[str, _utf8_at_most(limit)]


class Record(BaseModel):
    """Base: camelCase on the wire, unknown fields kept (records may grow compatibly). Strict:
    each field must have the type its lexicon says (``timeout: "5"`` is refused, not read as 5)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow", strict=True)

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StrongRef(Record):
    """com.atproto.repo.strongRef"""

    model_config = ConfigDict(extra="ignore", strict=True)
    uri: str = Field(pattern=r"^at://[^/]+/[^/]+/[^/]+$")
    cid: Cid


class BlobLink(BaseModel):
    model_config = ConfigDict(strict=True)
    link: Cid = Field(alias="$link")


class BlobRef(BaseModel):
    """A blob reference as records carry it (``$type: blob``)."""

    model_config = ConfigDict(populate_by_name=True, strict=True)
    type: Literal["blob"] = Field(default="blob", alias="$type")
    ref: BlobLink
    mime_type: str = Field(alias="mimeType")
    size: int = Field(ge=0)

    @property
    def cid(self) -> str:
        return self.ref.link


class Permissions(Record):
    """dev.atrun.defs#permissions: what a bundle asks for (the runner grants it or refuses to run)."""

    net: list[str] | None = None
    read: list[str] | None = None
    write: list[str] | None = None
    env: list[str] | None = None


class Metrics(Record):
    """dev.atrun.defs#metrics: where a run's time went, and what ran it."""

    execution_time_ms: int | None = None
    queued_ms: int | None = None
    total_ms: int | None = None
    isolation: str | None = None
    runtime: str | None = None
    egress_connections: int | None = None
    egress_refused: int | None = None
    egress_bytes_out: int | None = None
    egress_bytes_in: int | None = None


class HttpResponse(Record):
    """dev.atrun.defs#httpResponse: what a handleRequest endpoint answered."""

    status: int = Field(ge=100, le=599)
    headers: dict[str, str] | None = None
    body: str | None = None
    is_base64: bool | None = None


class Limits(Record):
    """dev.atrun.defs#limits: what a runner publishes about the limits it enforces (with the
    lexicon's minimums, so the runner never publishes a record its own lexicon refuses)."""

    timeout_seconds: int | None = Field(default=None, ge=1)
    default_timeout_seconds: int | None = Field(default=None, ge=1)
    max_bundle_bytes: int | None = Field(default=None, ge=0)
    max_output_bytes: int | None = Field(default=None, ge=0)
    memory_mb: int | None = Field(default=None, ge=0)
    concurrency: int | None = Field(default=None, ge=1)
    gateway_requests_per_minute: int | None = Field(default=None, ge=0)
    gateway_timeout_seconds: int | None = Field(default=None, ge=1)
    max_request_bytes: int | None = Field(default=None, ge=0)
    per_author_per_minute: int | None = Field(default=None, ge=0)
    per_author_burst: int | None = Field(default=None, ge=1)
    schedules: bool | None = None
    schedule_min_interval_seconds: int | None = Field(default=None, ge=1)
    schedule_jitter_seconds: int | None = Field(default=None, ge=0)
    max_schedules_per_author: int | None = Field(default=None, ge=0)
    triggers: bool | None = None
    max_triggers_per_author: int | None = Field(default=None, ge=0)
    trigger_firings_per_minute: int | None = Field(default=None, ge=0)
    trigger_backlog: int | None = Field(default=None, ge=0)


class SealedSecret(Record):
    """A name/value pair sealed to a runner's key (atrund.sealed opens and seals it)."""

    name: str = Field(max_length=128)
    key_id: str = Field(max_length=64)
    ciphertext: str = Field(max_length=12000)


class SecretsKey(Record):
    id: str = Field(max_length=64)
    alg: str = Field(max_length=64)
    public_key: str = Field(max_length=128)


class Bundle(Record):
    runtime: Text(64) = Field(min_length=1)
    code: BlobRef
    created_at: str
    name: Text(256) | None = None
    description: Text(3000) | None = None
    entrypoint: Text(1024) | None = None
    endpoints: list[Text(128)] | None = None
    permissions: Permissions | None = None
    secrets: list[SealedSecret] | None = Field(default=None, max_length=32)


class Invocation(Record):
    runner: str = Field(pattern=r"^did:[a-z]+:[a-zA-Z0-9._:%-]+$")
    bundle: StrongRef
    endpoint: Text(128) = Field(min_length=1)
    created_at: str
    args: dict[str, Any] | None = None
    timeout: int | None = Field(default=None, ge=1)
    secrets: list[SealedSecret] | None = Field(default=None, max_length=32)


class _Standing(Record):
    """What a schedule and a trigger ask for alike: a runner to call a bundle's endpoint."""

    runner: str = Field(pattern=r"^did:[a-z]+:[a-zA-Z0-9._:%-]+$")
    bundle: StrongRef
    endpoint: Text(128) = Field(min_length=1)
    created_at: str
    args: dict[str, Any] | None = None


class Schedule(_Standing):
    """dev.atrun.schedule: a bundle's endpoint on a timetable (atrund.timetable reads it)."""

    cron: Text(256) | None = None
    timezone: Text(64) | None = None
    interval_seconds: int | None = Field(default=None, ge=1)
    start_at: str | None = None
    end_at: str | None = None
    catch_up: Text(64) | None = None


class Trigger(_Standing):
    """dev.atrun.trigger: a bundle's endpoint fired by matching records of the network (atrund.triggers)."""

    collections: list[Text(317)] = Field(min_length=1, max_length=16)
    actions: list[Text(16)] | None = Field(default=None, max_length=3)
    authors: list[Text(2048)] | None = Field(default=None, max_length=100)
    subject: Text(64) | None = None
    results: Text(64) | None = None


class Result(Record):
    bundle: StrongRef
    status: Status
    created_at: str
    invocation: StrongRef | None = None  # absent for an XRPC invoke, which names its caller instead
    caller: str | None = Field(default=None, pattern=r"^did:[a-z]+:[a-zA-Z0-9._:%-]+$")
    schedule: StrongRef | None = None  # a schedule's tick: the schedule and the tick's time
    scheduled_at: str | None = None
    trigger: StrongRef | None = None  # a trigger's firing: the trigger and the record that fired it
    event: str | None = None
    event_cid: str | None = None
    data: dict[str, Any] | None = None
    error: str | None = None
    response: HttpResponse | None = None
    metrics: Metrics | None = None

    def value(self) -> Any:
        """The endpoint's return value, unwrapped from a jsonValue if it was wrapped."""
        return decode_data(self.data)


class Runner(Record):
    runtimes: list[str]
    isolation: str
    monitor: str | None = None  # isolation microvm only: qemu or firecracker
    access_mode: str
    created_at: str
    access_source: str | None = None
    secrets_key: SecretsKey | None = None
    limits: Limits | None = None
    description: str | None = None
    version: str | None = None
    gateway_url: str | None = None


# The integers every AT client reads exactly: JavaScript numbers are exact only up to 2^53 - 1,
# and the reference PDS parses record JSON into JavaScript numbers (an integer past this range
# would be stored rounded, or as a float it then refuses). Larger integers go into a jsonValue.
MAX_SAFE_INTEGER = 2**53 - 1


def _short(path: str) -> str:
    return path if len(path) <= 60 else path[:60] + "…"  # a deep value's path is long: its start says where


def valid_unicode(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD. A lone surrogate (JSON's ``\\ud800``,
    which Python and JavaScript strings can hold) has no UTF-8 form: no record, log line or HTTP
    body can carry it. Messages and HTTP answers are text for people, so they are repaired."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def data_problem(value: Any, where: str = "data", *, record: bool = False) -> str | None:
    """Why ``value`` cannot be stored in any form (see UnstorableValue), naming where; None if
    it can. Iterative: measures values of any depth without recursing. It runs on every answer,
    so it is written for speed: a place's path is spelled out only for the answer, and plain
    scalars (ASCII text, integers, booleans, null) are passed over without a stack entry.

    ``record``: ``value`` goes into a record as it is, not as jsonValue text, so the AT data
    model's numbers apply too: no floats, no integers past MAX_SAFE_INTEGER."""
    stack: list[tuple[Any, Any]] = [(value, None)]  # (node, (parent link, key) or None)
    while stack:
        node, link = stack.pop()
        kind = type(node)
        if kind is dict:
            items = node.items()
        elif kind is list or kind is tuple:
            items = enumerate(node)
        else:
            problem = _scalar_problem(node, record)
            if problem:
                return problem.replace("{at}", _where(where, link))
            continue
        for key, child in items:
            if kind is dict:
                if type(key) is not str:
                    return f"holds a key that is not a string (at {_where(where, link)})"
                if not key.isascii() and _scalar_problem(key):
                    return f"holds a key that is not valid Unicode (a lone surrogate at {_where(where, (link, key))})"
            ck = type(child)
            if ((ck is int and (not record or -MAX_SAFE_INTEGER <= child <= MAX_SAFE_INTEGER)) or ck is bool
                    or child is None or (ck is str and child.isascii())):
                continue
            stack.append((child, (link, key)))
    return None


def _scalar_problem(node: Any, record: bool = False) -> str | None:
    """What is wrong with a value that holds no others, with ``{at}`` where the place goes."""
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a string that is not valid Unicode (a lone surrogate at {at})"
    elif record and (isinstance(node, float) or (isinstance(node, int) and not isinstance(node, bool)
                                                 and not -MAX_SAFE_INTEGER <= node <= MAX_SAFE_INTEGER)):
        return f"holds the number {node!r}, which AT records cannot hold (at {{at}})"
    elif isinstance(node, float):
        if node != node or node in (float("inf"), float("-inf")):
            return f"holds {node!r}, which is not a JSON number (at {{at}})"
    elif not (node is None or isinstance(node, (bool, int))):
        return f"holds a {type(node).__name__}, which is not a JSON value (at {{at}})"
    return None


def _where(where: str, link: Any) -> str:
    keys = []
    while link is not None:
        link, key = link
        keys.append(key)
    path = where
    for key in reversed(keys):
        path = step(path, key)
    return valid_unicode(_short(path))


def _fits_data_model(value: Any) -> bool:
    """True if ``value`` (a JSON value: see data_problem) survives the AT Protocol data model
    unchanged and every AT client reads it exactly.

    The data model has no floats, keys starting with '$' have meanings of their own ($type,
    $link, $bytes), and integers past MAX_SAFE_INTEGER are not read exactly by JavaScript
    clients, the reference PDS among them: a value holding any of these is not stored as it is.
    Iterative, like data_problem.
    """
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, bool) or node is None or isinstance(node, str):
            continue
        if isinstance(node, int):
            if not -MAX_SAFE_INTEGER <= node <= MAX_SAFE_INTEGER:
                return False
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if any(not isinstance(k, str) or k.startswith("$") for k in node):
                return False
            stack.extend(node.values())
        else:
            return False
    return True


def encode_data(value: Any) -> dict[str, Any] | None:
    """The ``data`` field for an endpoint's return value.

    An object the data model holds unchanged is stored as it is (readable by any AT client);
    anything else (a number, a list, a string, floats or integers past 2^53 - 1 inside) is kept
    exactly as JSON text in a ``dev.atrun.defs#jsonValue``. That text is always strict JSON
    (never ``NaN``) and pure ASCII (non-ASCII characters as ``\\u`` escapes).

    Raises UnstorableValue (naming what and where) for a value no record can hold (see
    data_problem), and bounds.Malformed for one nested deeper than bounds.MAX_DEPTH.
    """
    if value is None:
        return None
    check_depth(value, "the return value")
    problem = data_problem(value)
    if problem:
        raise UnstorableValue(f"the return value {problem}")
    if isinstance(value, dict) and _fits_data_model(value):
        return value
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return {"$type": JSON_VALUE, "json": text}


def decode_data(data: Any) -> Any:
    if isinstance(data, dict) and data.get("$type") == JSON_VALUE and isinstance(data.get("json"), str):
        return bounds_loads(data["json"], "the jsonValue")
    return data

