"""The at-run-exec protocol: the one definition of ExecRequest and ExecResponse.

Framing: the worker writes ``{"ready": true}`` + newline on stdout when started, reads one
ExecRequest JSON line on stdin, writes one ExecResponse JSON line on stdout, and exits.
``nix/runtimes/exec-protocol.schema.json`` is exported from these models (``atrund schema``);
a test keeps it current.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Msg(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class ExecPermissions(_Msg):
    net: list[str] = []
    read: list[str] = []
    write: list[str] = []
    env: list[str] = []


class ExecRequest(_Msg):
    code_path: str
    endpoint: str
    args: dict[str, Any] = {}
    permissions: ExecPermissions = ExecPermissions()
    env: dict[str, str] = {}
    timeout: int = Field(default=30, ge=1)


class ExecHttpResponse(_Msg):
    status: int = Field(ge=100, le=599)
    headers: dict[str, str] = {}
    body: str = ""
    is_base64: bool = False


class ExecMetrics(_Msg):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    execution_time_ms: int | None = None


class ExecResponse(_Msg):
    success: bool
    data: Any = None
    response: ExecHttpResponse | None = None
    error: str | None = None
    # Extensions of the seed's ExecResponse, all optional:
    error_type: str | None = Field(default=None, description="exception or failure class, e.g. ZeroDivisionError, Timeout")
    timed_out: bool | None = Field(default=None, description="set by the runner when the deadline killed the worker")
    metrics: ExecMetrics = ExecMetrics()


READY = {"ready": True}


def parse_ready(line: bytes) -> bool:
    try:
        return json.loads(line) == READY
    except ValueError:
        return False


def schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "at-run-exec protocol",
        "$defs": {
            "ExecRequest": ExecRequest.model_json_schema(by_alias=True),
            "ExecResponse": ExecResponse.model_json_schema(by_alias=True),
        },
    }
