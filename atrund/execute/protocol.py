"""The at-run-exec protocol: the one definition of ExecRequest and ExecResponse.

Framing: the worker writes ``{"ready": true}`` + newline on stdout when started, reads one
ExecRequest JSON line on stdin, writes one ExecResponse JSON line on stdout, and exits. A worker
that can serve several requests of one reuse key says so in its ready line
(``{"ready": true, "reuse": true}``): it then reads the next request line after each answer, and
exits when stdin ends. One that says ``"marks": true`` writes OUTPUT_MARK on stderr before each
answer, so the runner knows when it has all the request printed. The runner decides whether it gets another (docs/protocol.md §7.1).
During a run the worker may ask for the bundle's state (docs/protocol.md §7.6): a StateCall
line on stdout, which the runner answers with one StateReply line on stdin before it reads on;
the run's answer line still ends the request. A state call carries the request's ``run``, so
one that does not belong to the request being run is refused.
``nix/runtimes/exec-protocol.schema.json`` is exported from these models (``atrund schema``);
a test keeps it current.

An answer is untrusted data: bundle code shares the worker with the wrapper that writes it (in
Python it can always write on the protocol descriptor). So ``parse_answer`` checks every answer
against the schema with strict types and ranges (no ``"5"`` for 5, no NaN, metrics whole
milliseconds between 0 and MAX_METRIC_MS) and turns one that breaks a rule into a
``ProtocolError`` failure naming the field and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from atrund import bounds
from atrund.records import valid_unicode

MAX_METRIC_MS = 86_400_000  # 24 h: longer than any run a runner allows; a metric past it is a lie
MAX_METRICS = 16  # named metrics in one answer
MAX_METRIC_NAME = 64
MAX_ERROR_CHARS = 65_536  # the wrappers cut their messages at 16384; results keep 4000 bytes
MAX_ERROR_TYPE_CHARS = 256  # the wrappers cut at 128
ANSWER = {"answer": True}  # validation context of parse_answer: the value came from a worker


def _rule(kind: str, message: str, ok: Callable[[Any], bool], repair: Callable[[Any], Any] = lambda v: v,
          answers_only: Callable[[Any], bool] = lambda v: True) -> BeforeValidator:
    """A strict check with a message that says the rule (pydantic's would coerce, or say less).
    It runs before pydantic's own validation, which keeps the type and bounds in the schema.
    ``answers_only`` is a further check applied only to what a worker sent (parse_answer): the
    runner's own messages (a crash with its output, a VM's console) are not cut by it."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if not ok(value) or (info.context == ANSWER and not answers_only(value)):
            raise PydanticCustomError(kind, message)
        return repair(value)

    return BeforeValidator(check)


def _int_between(lo: int, hi: int) -> Any:
    return Annotated[int, Field(ge=lo, le=hi),
                     _rule("int_range", f"must be an integer between {lo} and {hi}", lambda v: type(v) is int and lo <= v <= hi)]


# Text meant for people (error messages, HTTP headers and bodies) has each lone surrogate
# replaced: it has no UTF-8 form, so no record, log line or HTTP answer could carry it (and
# pydantic refuses such a str). The return value is not text: see records.data_problem.
def _text(max_chars: int) -> Any:
    return Annotated[str, Field(json_schema_extra={"maxLength": max_chars}),  # enforced on answers only
                     _rule("text", f"must be a string of at most {max_chars} characters",
                           lambda v: type(v) is str, valid_unicode, answers_only=lambda v: len(v) <= max_chars)]


StrictBool = Annotated[bool, _rule("bool", "must be true or false", lambda v: type(v) is bool)]
Text = Annotated[str, _rule("str", "must be a string", lambda v: type(v) is str, valid_unicode)]
Millis = _int_between(0, MAX_METRIC_MS)


class _Msg(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class ExecPermissions(_Msg):
    net: list[str] = []
    read: list[str] = []
    write: list[str] = []
    env: list[str] = []
    net_private: list[str] = Field(default=[], description=(
        "the operator's [permissions] net_private: private address ranges a net grant may reach (the runner's "
        "egress proxy lets them through; a runtime with its own network permission should allow them too)"))


class ExecRequest(_Msg):
    code_path: str
    endpoint: str
    args: dict[str, Any] = {}
    permissions: ExecPermissions = ExecPermissions()
    env: dict[str, str] = {}
    timeout: int = Field(default=30, ge=1)
    run: str | None = Field(default=None, description="set when the runner offers the bundle's state in this run: "
                                                      "every StateCall of the run carries it (§7.6)")


class ExecHttpResponse(_Msg):
    status: _int_between(100, 599)  # type: ignore[valid-type]
    headers: dict[Text, Text] = {}
    body: Text = ""
    is_base64: StrictBool = False


class ExecMetrics(_Msg):
    """Whole milliseconds. Runtimes may add metrics of their own (node and deno: loadTimeMs);
    every one is an integer from 0 to 86400000 (24 h), at most 16 of them, names of at most 64
    characters. The runner also refuses one above the request's timeout plus 1000 ms."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow",
                              json_schema_extra={"additionalProperties": {"type": "integer", "minimum": 0, "maximum": MAX_METRIC_MS},
                                                 "maxProperties": MAX_METRICS})
    __pydantic_extra__: dict[str, Millis] = Field(init=False)  # type: ignore[valid-type]
    execution_time_ms: Millis | None = None  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _few_short_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if len(value) > MAX_METRICS:
                raise PydanticCustomError("metrics", f"must hold at most {MAX_METRICS} metrics")
            if any(len(name) > MAX_METRIC_NAME for name in value):
                raise PydanticCustomError("metrics", f"metric names must be at most {MAX_METRIC_NAME} characters")
        return value


@dataclass(frozen=True)
class ExecEgress:
    """One request's network through the egress proxy: connections let out and refused, bytes
    sent and received."""

    connections: int = 0
    refused: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class ExecResponse(_Msg):
    success: StrictBool
    data: Any = None
    response: ExecHttpResponse | None = None
    error: _text(MAX_ERROR_CHARS) | None = None  # type: ignore[valid-type]
    # Extensions of the seed's ExecResponse, all optional:
    error_type: _text(MAX_ERROR_TYPE_CHARS) | None = Field(  # type: ignore[valid-type]
        default=None, description="exception or failure class, e.g. ZeroDivisionError, Timeout")
    timed_out: StrictBool | None = Field(default=None, description="set by the runner when the deadline killed the worker")
    retire: StrictBool | None = Field(
        default=None, description="set by a worker that serves several requests when it must not get another "
                                  "(the bundle left a thread or child running); the runner discards it")
    output: str | None = Field(
        default=None, description="set by the runner, never taken from the worker: the last bytes the bundle printed "
                                  "(its stdout and stderr) while it ran this request")
    metrics: ExecMetrics = ExecMetrics()
    # What the worker's egress proxy carried during this request: set by the runner, never read
    # from the worker's answer (so neither in the schema nor parsed).
    _egress: ExecEgress | None = PrivateAttr(default=None)

    @property
    def egress(self) -> ExecEgress | None:
        return self._egress

    def set_egress(self, egress: ExecEgress | None) -> None:
        self._egress = egress


class StateCall(_Msg):
    """A worker's request for the bundle's state during a run: a line on stdout that starts with
    exactly ``{"state":``. ``get`` and ``delete`` take ``key``, ``set`` ``key`` and ``value``,
    ``list`` ``prefix``, ``limit`` and ``cursor``. What a key or value may be (length, the AT
    data model, quotas) is the runner's answer (StateReply), not a protocol error."""

    state: Annotated[Literal["get", "set", "delete", "list"],
                     _rule("state", "must be one of get, set, delete, list", lambda v: v in ("get", "set", "delete", "list"))]
    run: Text
    key: Text | None = None
    value: Any = None
    prefix: Text | None = None
    limit: _int_between(1, 1000) | None = None  # type: ignore[valid-type]
    cursor: Text | None = None


class StateReply(_Msg):
    """The runner's answer to one StateCall, one line on the worker's stdin. ``ok`` false: the
    call fails inside the bundle with ``error`` (``errorType`` e.g. StateError, StateQuotaExceeded)."""

    ok: bool
    value: Any = None  # get: the value, null when the key is absent
    keys: list[str] | None = None  # list: the keys, in order
    cursor: str | None = None  # list: pass it back for the next page; absent at the end
    error: str | None = None
    error_type: str | None = None


class StateHandler(Protocol):
    """What answers a run's state calls (atrund.kv); the pool relays them."""

    async def call(self, call: StateCall) -> StateReply: ...


# What a worker that says ``"marks": true`` writes on stderr before each answer, after the
# request's prints: the runner keeps a request's output up to it (docs/protocol.md §7.1, item 4).
# A bundle that prints it ends its own output early, nothing more; the runner strips it.
OUTPUT_MARK = b"\x1eatrun:end-of-output\x1e"


@dataclass(frozen=True)
class Ready:
    """What a ready line says: the worker serves several requests; it marks each one's output end."""

    reuse: bool = False
    marks: bool = False


def parse_ready(line: bytes) -> Ready | None:
    """None if ``line`` is not a ready line: the JSON object ``{"ready": true}``, optionally with
    ``"reuse"`` and ``"marks"`` booleans and nothing else."""
    try:
        value = bounds.loads(line, "the ready line")
    except bounds.Malformed:
        return None
    if not isinstance(value, dict) or value.get("ready") is not True or not set(value) <= {"ready", "reuse", "marks"}:
        return None
    flags = {name: value.get(name, False) for name in ("reuse", "marks")}
    if any(type(flag) is not bool for flag in flags.values()):
        return None
    return Ready(**flags)


def _where(loc: tuple) -> str:
    path = ""
    for part in loc:
        path = bounds.step(path, part)
    return path or "(top level)"


def answer_problem(e: ValidationError) -> str:
    """A validation failure of an answer as ``field: rule`` items (at most three)."""
    items = [f"{_where(err['loc'])}: {err['msg']}" for err in e.errors(include_url=False)]
    more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
    return "; ".join(items[:3]) + more


def parse_answer(line: bytes) -> ExecResponse:
    """The ExecResponse in a worker's answer line. Raises ``bounds.Malformed`` naming the field
    and the rule broken if the line is not strict JSON, nests deeper than bounds.MAX_DEPTH, or
    does not match the schema."""
    value = bounds.loads(line, "the answer")
    try:
        return ExecResponse.model_validate(value, context=ANSWER)
    except ValidationError as e:
        raise bounds.Malformed(answer_problem(e)) from None


STATE_PREFIX = b'{"state":'  # how a state call line starts; anything else is the answer


def parse_state_call(line: bytes) -> StateCall:
    """The StateCall in a worker's line (one that starts with STATE_PREFIX). Raises
    ``bounds.Malformed`` as ``parse_answer`` does."""
    value = bounds.loads(line, "the state call")
    try:
        return StateCall.model_validate(value, context=ANSWER)
    except ValidationError as e:
        raise bounds.Malformed(answer_problem(e)) from None


def schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "at-run-exec protocol",
        "$defs": {
            "ExecRequest": ExecRequest.model_json_schema(by_alias=True),
            "ExecResponse": ExecResponse.model_json_schema(by_alias=True),
            "StateCall": StateCall.model_json_schema(by_alias=True),
            "StateReply": StateReply.model_json_schema(by_alias=True),
        },
    }
