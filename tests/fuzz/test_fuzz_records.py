"""Fuzz the record parsers (invocation, bundle, runner and result records; DID documents) and
bounds' own decoders: only their documented errors, never RecursionError; and our own records
read back as written."""

from __future__ import annotations

import json

import pytest
from fuzzing import CID, LIMIT, cbor_bytes, deep_json, json_texts, json_values, nest_json
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from atrund import bounds
from atrund.atproto.identity import parse_document
from atrund.bundles import BundleStore
from atrund.errors import BundleRefused, IdentityError
from atrund.records import Bundle, Invocation, Result, Runner

REF = {"uri": "at://did:plc:a/dev.atrun.bundle/x", "cid": CID}
BLOB = {"$type": "blob", "ref": {"$link": CID}, "mimeType": "text/x-python", "size": 10}
SHAPES = {
    Invocation: {"runner": "did:plc:abc", "bundle": REF, "endpoint": "main", "createdAt": "2026-01-01T00:00:00Z"},
    Bundle: {"runtime": "python", "code": BLOB, "createdAt": "2026-01-01T00:00:00Z", "endpoints": ["main"]},
    Runner: {"runtimes": ["python"], "isolation": "process", "accessMode": "open", "createdAt": "2026-01-01T00:00:00Z",
             "limits": {"timeoutSeconds": 30}},
    Result: {"bundle": REF, "status": "success", "createdAt": "2026-01-01T00:00:00Z", "data": {"a": 1},
             "metrics": {"executionTimeMs": 3}},
}


@st.composite
def values(draw) -> object:
    """Any JSON value, or a deep one (parsed from text, so deeper than Python recursion allows)."""
    if draw(st.booleans()):
        return draw(json_values)
    return bounds.loads(draw(deep_json), "fuzz", limit=LIMIT + 2, cut=True)


@st.composite
def records(draw, model) -> dict:
    """A near-valid record: its known shape with fields replaced, removed or added."""
    record = dict(SHAPES[model])
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from([*record, "args", "timeout", "secrets", "permissions", "extra", "$type"]))
        if draw(st.booleans()):
            record[field] = draw(values())
        else:
            record.pop(field, None)
    return record


def parse(model, value):
    """As the runner does: the depth check, then the model (handle() for invocations)."""
    return model.model_validate(bounds.check_fields(value))


@pytest.mark.parametrize("model", list(SHAPES), ids=lambda m: m.__name__)
@given(data=st.data())
def test_record_parsers_raise_only_validation_errors(model, data):
    value = data.draw(records(model) | values())
    try:
        parsed = parse(model, value)
    except (ValidationError, bounds.Malformed):
        return
    # What validates can be written and read back (result and runner records are ours).
    assert parse(model, json.loads(json.dumps(parsed.to_record()))).to_record() == parsed.to_record()


@given(value=records(Bundle) | values())
@example(value={**SHAPES[Bundle], "description": bounds.loads(nest_json(10_000), "x", cut=True)})
def test_bundle_store_parse_refuses_with_bundle_refused(value):
    try:
        BundleStore.parse(value)
    except BundleRefused as e:
        assert str(e).startswith("bundle record is invalid: ")


DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
GOOD_DOC = {"id": DID, "alsoKnownAs": ["at://a.test"], "service": [
    {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "http://127.0.0.1:1"}]}


@st.composite
def documents(draw) -> bytes:
    kind = draw(st.sampled_from(["text", "mutated", "deep-field"]))
    if kind == "text":
        return draw(json_texts()).encode("utf-8", "surrogatepass")
    doc = dict(GOOD_DOC)
    if kind == "mutated":
        doc[draw(st.sampled_from([*doc, "verificationMethod", "x"]))] = draw(json_values)
        return json.dumps(doc).encode()
    return (json.dumps(doc)[:-1] + ',"x":' + draw(deep_json) + "}").encode()


@given(body=documents() | st.binary(max_size=200))
@example(body=nest_json(100_000, "[").encode())
def test_did_document_parsing_raises_only_identity_errors(body):
    try:
        doc = parse_document(DID, body)
    except IdentityError as e:
        assert str(e).startswith(f"cannot resolve {DID}: ")
        return
    assert doc.id == DID


@given(text=json_texts(), cut=st.booleans())
@example(text="[" * 100_000, cut=True)
@example(text='"' + "\\" * 50_001 + '"', cut=True)
@example(text='["a' + "\\\"" * 30 + "x", cut=True)  # found here: cut_json's string pattern backtracked exponentially
def test_bounds_loads_raises_only_malformed(text, cut):
    try:
        value = bounds.loads(text, "fuzz", cut=cut)
    except bounds.Malformed:
        return
    assert bounds.too_deep(value, LIMIT + (1 if cut else 0)) is None
    if not cut:
        assert value == json.loads(text)


@given(data=cbor_bytes(), cut=st.booleans(), multi=st.booleans())
def test_bounds_decode_dag_cbor_raises_only_malformed(data, cut, multi):
    try:
        value = bounds.decode_dag_cbor(data, "fuzz", cut=cut, multi=multi)
    except bounds.Malformed:
        return
    for item in value if multi else [value]:
        assert bounds.too_deep(item, LIMIT + (1 if cut else 0)) is None
