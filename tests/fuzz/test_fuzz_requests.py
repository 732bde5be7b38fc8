"""Fuzz the HTTP side's request parsing (XRPC input, gateway requests, service-auth tokens) and
the worker answer parser: only their documented errors, never RecursionError or a 500."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fuzzing import CID, deep_json, json_texts, json_values, nest_json
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict, MultiDict

from atrund import bounds
from atrund.atproto.identity import Identities
from atrund.atproto.serviceauth import ServiceAuth, ServiceAuthError
from atrund.execute.protocol import parse_answer
from atrund.gateway import HttpError, parse_invoke_input, to_bundle_request
from atrund.records import StrongRef
from atrund.results import build

REF = {"uri": "at://did:plc:a/dev.atrun.bundle/x", "cid": CID}
REF_MODEL = StrongRef.model_validate(REF)


@st.composite
def invoke_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["near-valid", "deep-args", "text", "bytes"]))
    if kind == "near-valid":
        body = {"bundle": REF, "endpoint": "main"}
        for _ in range(draw(st.integers(0, 3))):
            body[draw(st.sampled_from(["bundle", "endpoint", "args", "timeout", "writeResult", "x"]))] = draw(json_values)
        return json.dumps(body).encode()
    if kind == "deep-args":
        return (json.dumps({"bundle": REF, "endpoint": "main"})[:-1] + ',"args":' + draw(deep_json) + "}").encode()
    if kind == "text":
        return draw(json_texts()).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=300))


@given(body=invoke_bodies())
@example(body=(json.dumps({"bundle": REF, "endpoint": "main"})[:-1] + ',"args":' + nest_json(100_000, "[") + "}").encode())
def test_xrpc_input_parsing_answers_400_or_an_input(body):
    try:
        parse_invoke_input(body)
    except HttpError as e:
        assert (e.status, e.error) == (400, "InvalidRequest") and e.message


headers_or_query = st.lists(st.tuples(st.text(max_size=20), st.text(max_size=50)), max_size=6)


@given(method=st.text(max_size=10), path=st.text(max_size=100), query=headers_or_query, headers=headers_or_query,
       body=st.binary(max_size=300) | st.builds(str.encode, deep_json))
def test_gateway_request_conversion_never_fails(method, path, query, headers, body):
    out = to_bundle_request(method, path, MultiDict(query), CIMultiDict(headers), body)
    assert json.loads(json.dumps(out))["isBase64"] in (True, False)  # what the worker is sent is JSON


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@st.composite
def authorizations(draw) -> str:
    kind = draw(st.sampled_from(["text", "parts", "deep"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    part = st.builds(lambda v: b64(json.dumps(v).encode()), json_values) | st.text(max_size=40)
    if kind == "deep":
        part = st.builds(lambda t: b64(t.encode()), deep_json)
    return "Bearer " + ".".join(draw(st.lists(part, min_size=1, max_size=4)))


@pytest.fixture(scope="module")
def auth():
    loop = asyncio.new_event_loop()
    identities = Identities("http://127.0.0.1:9", timeout=2, allow_private_addresses=True)  # a closed port: nothing is resolved
    yield ServiceAuth(identities, "did:plc:runner"), loop
    loop.run_until_complete(identities.close())
    loop.close()


@given(authorization=authorizations())
@example(authorization="Bearer " + b64(nest_json(100_000).encode()) + "." + b64(b"{}") + ".c2ln")
def test_service_auth_raises_only_service_auth_errors(auth, authorization):
    service, loop = auth
    with pytest.raises(ServiceAuthError):
        loop.run_until_complete(service.verify(authorization, "dev.atrun.invoke"))


@st.composite
def answer_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["near-valid", "deep-data", "text"]))
    if kind == "near-valid":
        answer = {"success": draw(st.booleans())}
        for _ in range(draw(st.integers(0, 3))):
            answer[draw(st.sampled_from(["data", "response", "error", "errorType", "timedOut", "metrics", "x"]))] = draw(json_values)
        return json.dumps(answer).encode()
    if kind == "deep-data":
        return ('{"success":true,"data":' + draw(deep_json) + "}").encode()
    return draw(json_texts()).encode("utf-8", "surrogatepass")


@given(line=answer_lines())
@example(line=('{"success":true,"data":' + nest_json(100_000) + "}").encode())
def test_answer_parsing_raises_only_documented_errors(line):
    """The answer parser atrund.execute.pool applies (protocol.parse_answer): an ExecResponse or
    bounds.Malformed naming the field and rule; and what it accepts can be stored as a result."""
    try:
        answer = parse_answer(line)
    except bounds.Malformed as e:
        assert str(e)
        return
    build(None, REF_MODEL, "success" if answer.success else "error", data=answer.data, error=answer.error,
          response=answer.response.model_dump(by_alias=True) if answer.response else None).to_record()
