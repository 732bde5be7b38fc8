"""Bounded decoding (atrund.bounds): no input nested too deep, or shaped wrong, stops the runner.

Every decoder of outside data is fed what an attacker would send: records nested thousands of
levels deep on the real local PDS (read by polling and by the firehose), frames from a scripted
relay, DID documents from a scripted directory, XRPC bodies and tokens, and records with the
wrong types. Each ends in an explained outcome (a ``rejected`` result naming the field and the
limit, a 400, a skipped and counted frame, an IdentityError), and the runner keeps serving the
same author and others.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import aiohttp
import libipld
import pytest
from aiohttp import web
from conftest import no_result, wait_result
from pydantic import ValidationError
from relay import commit, create_op, send, subscribe
from test_xrpc import invoke, token

from atrund import bounds
from atrund.atproto.identity import MAX_DOCUMENT_BYTES, Identities
from atrund.atproto.repos import to_json_model
from atrund.atproto.serviceauth import ServiceAuth, ServiceAuthError
from atrund.errors import IdentityError
from atrund.gateway import HttpError, parse_invoke_input
from atrund.records import BUNDLE, INVOCATION, Bundle, Invocation, field_errors, now_iso

LIMIT = bounds.MAX_DEPTH
HELLO = "def main(args):\n    return {'n': args.get('n')}\n"
CID = "bafyreidaphbml4tzdmdbd43vcmjx2m7jgnynjwnvmkafahvhtdskt67yvi"


# -- deep values, built without recursion ---------------------------------------------------------

def nest_json(depth: int, key: str | None = "a") -> str:
    """JSON text of ``depth`` nested objects (``{"a":{"a":...{}}}``), or arrays when key is None."""
    if key is None:
        return "[" * depth + "]" * depth
    return f'{{"{key}":' * (depth - 1) + "{}" + "}" * (depth - 1)


def nest_cbor(depth: int, kind: str = "map") -> bytes:
    """DAG-CBOR bytes of ``depth`` nested maps ({"a": ...}) or arrays."""
    return (b"\xa1\x61a" if kind == "map" else b"\x81") * (depth - 1) + (b"\xa0" if kind == "map" else b"\x80")


def nest(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def with_deep(value: dict, deep: bytes) -> bytes:
    """``value`` as DAG-CBOR, with the byte string b"DEEP" in it replaced by ``deep`` (raw CBOR)."""
    raw = libipld.encode_dag_cbor(value)
    assert raw.count(b"\x44DEEP") == 1
    return raw.replace(b"\x44DEEP", deep)


# -- bounds itself: JSON ---------------------------------------------------------------------------

TOO_DEEP_JSON = {
    "objects-129": nest_json(LIMIT + 1),
    "objects-1000": nest_json(1000),
    "objects-10000": nest_json(10_000),
    "arrays-129": nest_json(LIMIT + 1, None),
    "arrays-100000": nest_json(100_000, None),
    "args-129-in-a-record": '{"runner":"did:plc:x","args":' + nest_json(LIMIT) + "}",
    "args-10000-in-a-record": '{"runner":"did:plc:x","args":' + nest_json(10_000) + "}",
    "mixed-5000": '{"a":[' * 2500 + "1" + "]}" * 2500,
    "brackets-in-strings": '{"s":"]]]}}}","a":' + nest_json(3000) + "}",
    "escaped-quotes": '{"s":"\\"]}","a":' + nest_json(3000) + "}",
}


@pytest.mark.parametrize("name", TOO_DEEP_JSON)
def test_json_nested_too_deep_is_refused_naming_where_and_the_limit(name):
    text = TOO_DEEP_JSON[name]
    with pytest.raises(bounds.Malformed, match=rf"^input is nested deeper than {LIMIT} levels at .+ \(the limit\)$") as e:
        bounds.loads(text, "input")
    if name.startswith("args"):
        assert "at args.a.a" in str(e.value)
    cut = bounds.loads(text.encode(), "input", cut=True)  # bytes too, as from a socket
    assert bounds.too_deep(cut) is not None and bounds.too_deep(cut, LIMIT + 1) is None  # one level too deep, no more


NOT_JSON = {
    "nan": "[NaN]", "infinity": '{"a": Infinity}', "minus-infinity": "-Infinity", "overflow": "[1e999]",
    "truncated": '{"a": [1, 2', "unbalanced": "[}", "empty": "", "trailing": "{} {}", "not-utf8": b"\xff\xfe{",
    "lone-bracket-deep": "[" * 5000, "closers-only": "]" * 5000, "deep-then-garbage": "[" * 3000 + "x" + "]" * 3000,
    "deep-unbalanced": "[" * 3000 + "}" * 3000,
}


@pytest.mark.parametrize("name", NOT_JSON)
def test_what_is_not_strict_json_is_refused(name):
    with pytest.raises(bounds.Malformed, match="^input is (not JSON|nested deeper)"):
        bounds.loads(NOT_JSON[name], "input")
    try:  # cut: what is inside a cut subtree is checked only for brackets, so the answer may be a cut value
        assert bounds.too_deep(bounds.loads(NOT_JSON[name], "input", cut=True)) is not None
    except bounds.Malformed as e:
        assert str(e).startswith("input is not JSON")


@pytest.mark.parametrize("text", [
    '["' + 'a\\"' * 100_000 + "x" * 100_000,  # one string that never ends, full of escaped quotes
    '"' + "a" * 1_000_000,
    ('"' + "\\") * 200_000,
    "[" * 50_000 + '"\\\\"' + "]" * 50_000,
], ids=["escaped-quotes", "long-open-string", "quote-backslash", "deep-escaped-backslash"])
def test_cutting_is_linear_in_the_text(text):
    """The fuzzer found that cut_json's first string pattern backtracked exponentially on an
    unterminated string of escaped quotes: a hostile PDS could hang a poll. Each of these takes
    well under a second now."""
    import time

    started = time.monotonic()
    with contextlib.suppress(bounds.Malformed):
        assert bounds.too_deep(bounds.loads(text, "input", cut=True)) is not None
    assert time.monotonic() - started < 2.0


def test_json_within_the_limit_is_read_unchanged():
    text = '{"s":"]}[{\\"","a":' + nest_json(LIMIT - 1) + "}"
    assert bounds.loads(text, "input") == json.loads(text)
    assert bounds.loads(text, "input", cut=True) == json.loads(text)


def test_a_cut_page_keeps_every_other_record():
    """The poll path: one record in a listRecords page 10,000 levels deep; the others, and the
    deep one's uri, cid and runner, are read as usual."""
    deep = '{"uri":"at://x/c/1","cid":"c1","value":{"runner":"did:plc:r","args":' + nest_json(10_000) + "}}"
    page = '{"records":[' + deep + ',{"uri":"at://x/c/2","cid":"c2","value":{"runner":"did:plc:r"}}],"cursor":"2"}'
    out = bounds.loads(page, "page", LIMIT + 3, cut=True)
    first, second = out["records"]
    assert (first["uri"], first["cid"], first["value"]["runner"]) == ("at://x/c/1", "c1", "did:plc:r")
    assert second == {"uri": "at://x/c/2", "cid": "c2", "value": {"runner": "did:plc:r"}} and out["cursor"] == "2"
    with pytest.raises(bounds.Malformed, match=r"^args is nested deeper than 128 levels at args\.a\.a.*… \(the limit\)$"):
        bounds.check_fields(first["value"])


# -- bounds itself: DAG-CBOR -------------------------------------------------------------------------

TOO_DEEP_CBOR = {
    "maps-129": nest_cbor(LIMIT + 1),
    "maps-1000": nest_cbor(1000),
    "maps-10000": nest_cbor(10_000),
    "arrays-129": nest_cbor(LIMIT + 1, "array"),
    "arrays-100000": nest_cbor(100_000, "array"),
    "tagged-links-deep": b"\x81" * 3000 + b"\xd8\x2a\x58\x25\x00" + libipld.decode_multibase(CID)[1],
    "in-a-record": with_deep({"runner": "did:plc:x", "args": b"DEEP"}, nest_cbor(5000)),
}


@pytest.mark.parametrize("name", TOO_DEEP_CBOR)
def test_dag_cbor_nested_too_deep_is_refused_or_cut(name):
    raw = TOO_DEEP_CBOR[name]
    with pytest.raises(bounds.Malformed, match=rf"^record is nested deeper than {LIMIT} levels at .+ \(the limit\)$"):
        bounds.decode_dag_cbor(raw, "record")
    cut = bounds.decode_dag_cbor(raw, "record", cut=True)
    assert bounds.too_deep(cut) is not None and bounds.too_deep(cut, LIMIT + 1) is None
    json_form = to_json_model(cut)  # links become {"$link": ...}; no recursion
    assert bounds.too_deep(json_form) is not None
    if name == "in-a-record":
        assert cut["runner"] == "did:plc:x"
        with pytest.raises(bounds.Malformed, match=r"^args is nested deeper than 128 levels at args\.a"):
            bounds.check_fields(json_form)


NOT_CBOR = {
    "empty": b"", "break-byte": b"\xff", "indefinite-array": b"\x9f\x01\xff", "indefinite-map": b"\xbf\xff",
    "truncated-length": b"\x5b\xff\xff", "huge-bytes": b"\x5b" + b"\xff" * 8, "huge-array": b"\x9b" + b"\xff" * 8,
    "huge-map-deep": b"\xa1\x61a" * 3000 + b"\xbb" + b"\xff" * 8, "reserved-info": b"\x1c", "truncated-deep": b"\x81" * 5000,
    "float-nan": b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", "undefined": b"\xf7",
}


@pytest.mark.parametrize("name", NOT_CBOR)
def test_what_is_not_dag_cbor_is_refused(name):
    for cut in (False, True):
        with pytest.raises(bounds.Malformed, match="^block is not DAG-CBOR"):
            bounds.decode_dag_cbor(NOT_CBOR[name], "block", cut=cut)


def test_dag_cbor_within_the_limit_is_read_unchanged():
    value = {"a": [1, -2, "x", b"\x00", None, True], "deep": nest(LIMIT - 1)}
    raw = libipld.encode_dag_cbor(value)
    assert bounds.decode_dag_cbor(raw, "x") == value
    assert bounds.decode_dag_cbor(raw + raw, "x", multi=True) == [value, value]


def test_to_json_model_takes_any_depth():
    value: list = []
    for _ in range(100_000):
        value = [value, b"\x01\x02"]
    out = to_json_model(value)
    assert out[1] == {"$bytes": "AQI"} and bounds.too_deep(out).count("[") == LIMIT


# -- strict lexicon types ---------------------------------------------------------------------------

GOOD_INVOCATION = {"runner": "did:plc:abc", "bundle": {"uri": f"at://did:plc:a/{BUNDLE}/x", "cid": CID},
                   "endpoint": "main", "createdAt": "2026-01-01T00:00:00.000Z"}
WRONG_TYPES = {
    "timeout-string": ({"timeout": "5"}, "timeout: Input should be a valid integer"),
    "timeout-true": ({"timeout": True}, "timeout: Input should be a valid integer"),
    "timeout-float": ({"timeout": 5.0}, "timeout: Input should be a valid integer"),
    "timeout-zero": ({"timeout": 0}, "timeout: Input should be greater than or equal to 1"),
    "endpoint-int": ({"endpoint": 5}, "endpoint: Input should be a valid string"),
    "runner-list": ({"runner": ["did:plc:abc"]}, "runner: Input should be a valid string"),
    "created-at-int": ({"createdAt": 1700000000}, "createdAt: Input should be a valid string"),
    "args-list": ({"args": [1, 2]}, "args: Input should be a valid dictionary"),
    "bundle-cid-int": ({"bundle": {"uri": f"at://did:plc:a/{BUNDLE}/x", "cid": 5}}, "bundle.cid: Input should be a valid string"),
    "secret-key-id-int": ({"secrets": [{"name": "A", "keyId": 1, "ciphertext": "x"}]},
                          "secrets.0.keyId: Input should be a valid string"),
}


@pytest.mark.parametrize("name", WRONG_TYPES)
def test_an_invocation_with_a_type_the_lexicon_does_not_say_is_refused_naming_the_field(name):
    change, message = WRONG_TYPES[name]
    assert Invocation.model_validate(GOOD_INVOCATION).timeout is None
    with pytest.raises(ValidationError) as e:
        Invocation.model_validate({**GOOD_INVOCATION, **change})
    assert field_errors(e.value) == message


GOOD_BUNDLE = {"runtime": "python", "createdAt": "2026-01-01T00:00:00.000Z",
               "code": {"$type": "blob", "ref": {"$link": CID}, "mimeType": "text/x-python", "size": 10}}


@pytest.mark.parametrize("change, message", [
    ({"runtime": 1}, "runtime: Input should be a valid string"),
    ({"endpoints": ["main", 2]}, "endpoints.1: Input should be a valid string"),
    ({"code": {**GOOD_BUNDLE["code"], "size": "10"}}, "code.size: Input should be a valid integer"),
    ({"permissions": {"net": "example.com"}}, "permissions.net: Input should be a valid list"),
], ids=["runtime-int", "endpoint-int", "size-string", "net-string"])
def test_a_bundle_with_a_wrong_type_is_refused_naming_the_field(change, message):
    Bundle.model_validate(GOOD_BUNDLE)
    with pytest.raises(ValidationError) as e:
        Bundle.model_validate({**GOOD_BUNDLE, **change})
    assert field_errors(e.value) == message


XRPC_BODIES = {
    "timeout-string": ({"timeout": "5"}, "input: timeout: Input should be a valid integer"),
    "timeout-true": ({"timeout": True}, "input: timeout: Input should be a valid integer"),
    "write-result-string": ({"writeResult": "true"}, "input: writeResult: Input should be a valid boolean"),
    "args-129": ('"args":' + nest_json(LIMIT), "input is nested deeper than 128 levels at args.a.a"),
    "args-300": ('"args":' + nest_json(300), "input is nested deeper than 128 levels at args.a.a"),
    "args-10000": ('"args":' + nest_json(10_000), "input is nested deeper than 128 levels at args.a.a"),
    "args-arrays-100000": ('"args":{"x":' + nest_json(100_000, None) + "}", "input is nested deeper than 128 levels at args.x[0]"),
    "nan": ('"args":{"x":NaN}', "input is not JSON: NaN is not JSON"),
}


def xrpc_body(change: dict | str) -> bytes:
    base = {"bundle": GOOD_INVOCATION["bundle"], "endpoint": "main"}
    if isinstance(change, dict):
        return json.dumps({**base, **change}).encode()
    return (json.dumps(base)[:-1] + "," + change + "}").encode()


@pytest.mark.parametrize("name", XRPC_BODIES)
def test_an_xrpc_input_that_breaks_a_limit_or_a_type_is_a_400_naming_it(name):
    change, message = XRPC_BODIES[name]
    assert parse_invoke_input(xrpc_body({})).endpoint == "main"
    with pytest.raises(HttpError) as e:
        parse_invoke_input(xrpc_body(change))
    assert (e.value.status, e.value.error) == (400, "InvalidRequest")
    assert e.value.message.startswith(message), e.value.message


# -- service-auth tokens --------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize("part", ["header", "payload"])
@pytest.mark.parametrize("depth", [LIMIT + 1, 10_000])
async def test_a_token_nested_too_deep_is_refused_before_anything_is_resolved(part, depth):
    """Refused as malformed, naming the part and the limit; the issuer's DID is never resolved
    (the directory here is a closed port: asking it would fail differently)."""
    auth = ServiceAuth(Identities("http://127.0.0.1:9", allow_private_addresses=True), "did:plc:runner")
    header, payload = b'{"alg":"ES256K","typ":"JWT"}', b'{"iss":"did:plc:x","aud":"did:plc:runner"}'
    deep = ('{"x":' + nest_json(depth) + "}").encode()
    jwt = ".".join([b64(deep if part == "header" else header), b64(deep if part == "payload" else payload), b64(b"s" * 64)])
    with pytest.raises(ServiceAuthError) as e:
        await auth.verify(f"Bearer {jwt}", "dev.atrun.invoke")
    assert e.value.reason == "malformed"
    assert str(e.value).startswith(f"token is not a JWT: its {part} is nested deeper than 128 levels at x.a")


# -- DID documents from a scripted directory -------------------------------------------------------

class Directory:
    """A PLC directory on loopback that answers every DID with ``body`` (and ``status``)."""

    def __init__(self) -> None:
        self.body, self.status, self.headers = b"", 200, {}
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "Directory":
        async def answer(request: web.Request) -> web.Response:
            return web.Response(status=self.status, body=self.body, headers=self.headers)

        app = web.Application()
        app.router.add_get("/{did}", answer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self


@pytest.fixture
async def directory():
    d = await Directory().start()
    yield d
    await d.runner.cleanup()


DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
GOOD_DOC = {"id": DID, "alsoKnownAs": ["at://a.test"], "verificationMethod": [
    {"id": f"{DID}#atproto", "type": "Multikey", "controller": DID,
     "publicKeyMultibase": "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"}],
    "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "http://127.0.0.1:1"}]}
BAD_DOCS = {
    "deep-129": ((json.dumps(GOOD_DOC)[:-1] + ',"x":' + nest_json(LIMIT) + "}").encode(), "nested deeper than 128 levels at x.a"),
    "deep-10000": ((json.dumps(GOOD_DOC)[:-1] + ',"x":' + nest_json(10_000) + "}").encode(), "nested deeper than 128 levels"),
    "arrays-30000": (nest_json(30_000, None).encode(), "nested deeper than 128 levels"),
    "too-large": (json.dumps({**GOOD_DOC, "pad": "x" * MAX_DOCUMENT_BYTES}).encode(), f"larger than the limit of {MAX_DOCUMENT_BYTES} bytes"),
    "not-json": (b"<html>hello</html>", "is not JSON"),
    "nan": (b'{"id": NaN}', "is not JSON: NaN is not JSON"),
    "a-list": (b"[1, 2]", "not a JSON object"),
    "wrong-shape": (json.dumps({"id": DID, "service": "nope"}).encode(), "PoorlyFormattedDidDocumentError"),
    "another-did": (json.dumps({**GOOD_DOC, "id": "did:plc:someoneelse"}).encode(), "PoorlyFormattedDidDocumentError"),
}


@pytest.mark.parametrize("name", BAD_DOCS)
async def test_a_did_document_that_breaks_a_limit_is_an_identity_error_naming_it(directory, name):
    identities = Identities(directory.url, timeout=5, allow_private_addresses=True)
    try:
        directory.body = json.dumps(GOOD_DOC).encode()
        assert await identities.pds(DID) == "http://127.0.0.1:1"  # the directory works: only the document changes
        directory.body, message = BAD_DOCS[name]
        with pytest.raises(IdentityError) as e:
            await identities.document(DID, refresh=True)
        assert str(e.value).startswith(f"cannot resolve {DID}: ") and message in str(e.value), str(e.value)
    finally:
        await identities.close()


@pytest.mark.parametrize("status", [302, 410, 500])
async def test_a_did_directory_that_does_not_answer_200_is_an_identity_error(directory, status):
    identities = Identities(directory.url, timeout=5, allow_private_addresses=True)
    directory.status, directory.headers = status, ({"Location": "http://127.0.0.1:9/x"} if status == 302 else {})
    try:
        with pytest.raises(IdentityError, match=f"HTTP {status}"):
            await identities.document(DID)
    finally:
        await identities.close()


# -- frames from a scripted relay ---------------------------------------------------------------------

def deep_frames(did: str) -> dict[str, bytes]:
    """Frames too deep to take; each holds ``dev.atrun.invocation/`` or is not a #commit, so it
    is decoded (not skipped unread on the fast path)."""
    header = libipld.encode_dag_cbor({"op": 1, "t": "#commit"})
    info = libipld.encode_dag_cbor({"op": 1, "t": "#info"})
    needle = f"{INVOCATION}/3zz"
    return {
        "header-10000": nest_cbor(10_000) + libipld.encode_dag_cbor({"seq": 1}),
        "header-129": nest_cbor(LIMIT + 1) + libipld.encode_dag_cbor({"seq": 1}),
        "identity-body-100000": libipld.encode_dag_cbor({"op": 1, "t": "#identity"}) + nest_cbor(100_000, "array"),
        "body-field-5000": header + with_deep({"seq": 500, "repo": did, "note": needle, "x": b"DEEP"}, nest_cbor(5000)),
        "body-field-129": header + with_deep({"seq": 500, "repo": did, "note": needle, "x": b"DEEP"}, nest_cbor(LIMIT)),
        "ops-5000": header + with_deep({"seq": 500, "repo": did, "note": needle, "ops": b"DEEP"}, nest_cbor(5000, "array")),
        "op-path-3000": header + with_deep({"seq": 500, "repo": did, "ops": [{"action": "create", "path": b"DEEP",
                                                                              "cid": needle}]}, nest_cbor(3000)),
        "info-10000": info + with_deep({"seq": 500, "name": b"DEEP"}, nest_cbor(10_000)),
        "error-10000": libipld.encode_dag_cbor({"op": -1}) + with_deep({"error": b"DEEP"}, nest_cbor(10_000)),
        "truncated-5000": info + b"\xa1\x61a" * 5000,
    }


@pytest.mark.parametrize("kind", list(deep_frames("did:plc:x")))
async def test_a_frame_nested_too_deep_is_skipped_counted_and_the_stream_goes_on(rig, kind):  # noqa: F811
    """Skipped with a log line and the ``malformed`` counter; the connection stays up, and a
    genuine frame after it is taken and moves the cursor."""
    uri, cid = await rig.invocation(40)
    rig.start(send(deep_frames(rig.did)[kind], commit(rig.did, 600, [create_op(uri, cid)])))
    await rig.until(lambda: rig.seen, f"the genuine frame after a {kind} frame")
    assert rig.seen == [uri] and rig.cursor() == "600"
    assert rig.firehose.counters.malformed == 1
    assert len(rig.relay.paths) == 1  # skipped, not disconnected


async def test_a_deep_frame_skipped_unread_does_not_break_the_cursor(rig):  # noqa: F811
    """A frame that looks like a commit touching no invocation is skipped without decoding; its
    seq is read only when the stream resumes after it: 10,000 levels deep, it has none, and the
    client resumes after the genuine frame before it."""
    uri, cid = await rig.invocation(41)
    unread = libipld.encode_dag_cbor({"op": 1, "t": "#commit"}) + nest_cbor(10_000)
    rig.start(send(commit(rig.did, 610, [create_op(uri, cid)]), unread, then_close=True))
    await rig.until(lambda: len(rig.relay.paths) == 2, "the reconnection after the relay closed")
    assert rig.seen == [uri] and rig.firehose.counters.skipped_fast == 1
    assert rig.relay.paths[1] == subscribe(610) and rig.cursor() == "610"


# -- deep records on the real PDS, through a real runner ------------------------------------------------

async def create_raw(pds_url: str, account, collection: str, record_json: str) -> tuple[int, dict]:
    """createRecord with the record as JSON text (the SDK cannot build values this deep)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{pds_url}/xrpc/com.atproto.server.createSession",
                             json={"identifier": account.handle, "password": account.app_password}) as r:
            jwt = (await r.json())["accessJwt"]
        body = json.dumps({"repo": account.did, "collection": collection, "record": {}})[:-3] + record_json + "}"
        async with http.post(f"{pds_url}/xrpc/com.atproto.repo.createRecord", data=body.encode(),
                             headers={"Authorization": f"Bearer {jwt}", "Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None)


def invocation_json(runner_did: str, bundle: dict, **deep: str) -> str:
    """An invocation record's JSON text with fields given as raw JSON text (``args=nest_json(...)``)."""
    record = {"$type": INVOCATION, "runner": runner_did, "bundle": bundle, "endpoint": "main", "createdAt": now_iso()}
    return json.dumps(record)[:-1] + "".join(f",{json.dumps(k)}:{v}" for k, v in deep.items()) + "}"


# args at depth d make the record d + 1 deep: the record itself is level 1.
DEEP_FIELDS = {
    "args-128": ("args", nest_json(LIMIT)),
    "args-129": ("args", nest_json(LIMIT + 1)),
    "args-255": ("args", nest_json(255)),
    "args-256": ("args", nest_json(256)),
    "args-1000": ("args", nest_json(1000)),
    "args-2000": ("args", nest_json(2000)),
    "args-arrays-1500": ("args", '{"x":' + nest_json(1500, None) + "}"),
    "unknown-field-1000": ("extra", nest_json(1000)),
    "bundle-ref-1000": ("bundle", None),
}


async def post_deep_cases(stack, author, runner_did: str, bundle: dict) -> dict[str, str]:
    uris = {}
    for name, (field, text) in DEEP_FIELDS.items():
        if field == "bundle":
            record = invocation_json(runner_did, bundle)[:-1]
            record = record.replace('"bundle": {', '"bundle": {"x": ' + nest_json(1000) + ", ", 1) + "}"
        else:
            record = invocation_json(runner_did, bundle, **{field: text})
        status, out = await create_raw(stack.pds_url, author.account, INVOCATION, record)
        assert status == 200, (name, out)  # the reference PDS takes records up to ~2000 levels
        uris[name] = out["uri"]
    return uris


async def test_the_reference_pds_refuses_records_past_about_2500_levels(stack, author):
    status, out = await create_raw(stack.pds_url, author.account, INVOCATION,
                                   invocation_json("did:plc:x", {"uri": "at://x/y/z", "cid": CID}, args=nest_json(5000)))
    assert status in (400, 500), out  # 400 "Maximum call stack size exceeded" (or a 500) from the PDS itself


def assert_rejected_naming(result: dict, field: str) -> None:
    assert result["status"] == "rejected", result
    assert result["error"].startswith(f"invalid invocation record: {field} is nested deeper than 128 levels at {field}."), result
    assert result["error"].endswith("(the limit)")


@pytest.mark.parametrize("mode", ["poll", "firehose"])
async def test_deep_invocations_are_rejected_naming_the_limit_and_the_authors_go_on(stack, author, login_author,
                                                                                    make_runner, reader, mode):
    """Records nested 128 to 2000 levels (all the reference PDS takes), addressed to the runner,
    in args, an unknown field and the bundle reference; and one addressed to another runner.
    Poll mode reads them all in one listRecords page with the valid invocations after them (the
    page used to fail as a whole); firehose mode gets them in frames it proves. Each deep one
    gets a ``rejected`` result naming the field and the limit; args 127 levels deep (the record:
    128) still runs; the runner stays up; and the next invocations of the same author and of
    another author are answered."""
    other = await login_author("other")
    allowed = [author.account.did, other.account.did]
    sections = {"access": {"allowlist": allowed}}
    if mode == "firehose":
        sections["ingest"] = {"mode": "firehose", "reconcile_interval": 3600}
    runner = await make_runner(start=(mode == "firehose"), **sections)
    bundle = await author.publish(HELLO)
    if mode == "firehose":
        await asyncio.sleep(1.0)  # past the start-up poll: what follows comes by the stream
    fits = (await create_raw(stack.pds_url, author.account, INVOCATION,
                             invocation_json(runner.did, bundle, args='{"n":1,"d":' + nest_json(LIMIT - 2) + "}")))[1]["uri"]
    deep = await post_deep_cases(stack, author, runner.did, bundle)
    elsewhere = (await create_raw(stack.pds_url, author.account, INVOCATION,
                                  invocation_json(other.account.did, bundle, args=nest_json(2000))))[1]["uri"]
    same = await author.invoke(bundle, runner.did, args={"n": 2})
    other_bundle = await other.publish(HELLO)
    another = await other.invoke(other_bundle, runner.did, args={"n": 3})
    if mode == "poll":
        await runner.start()

    assert (await wait_result(reader, runner.did, same))["data"] == {"n": 2}
    assert (await wait_result(reader, runner.did, another))["data"] == {"n": 3}
    assert (await wait_result(reader, runner.did, fits))["data"] == {"n": 1}
    assert (await wait_result(reader, runner.did, deep["args-128"]))["status"] == "rejected"  # the record: 129 levels
    for name, uri in deep.items():
        assert_rejected_naming(await wait_result(reader, runner.did, uri), DEEP_FIELDS[name][0])
    assert await no_result(reader, runner.did, elsewhere, settle=0.5)
    assert not runner._task.done()  # still serving
    if mode == "poll":
        assert runner.app.state.cursor(f"poll:{author.account.did}") == same.rsplit("/", 1)[1]  # moved past them all
    else:
        assert runner.app.firehose.counters.proven >= len(deep) + 2  # proven from the frames, not polled
    # and the runner still takes new work from both after it all
    later = await author.invoke(bundle, runner.did, args={"n": 4})
    assert (await wait_result(reader, runner.did, later))["data"] == {"n": 4}


async def test_a_deep_bundle_record_is_refused_naming_the_field(stack, author, make_runner, reader):
    """A bundle record 1000 levels deep in an unknown field: the invocation pinning it is
    rejected, naming the field and the limit; the author's next invocation runs."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    blob = await author.session.upload_blob(HELLO.encode(), "text/x-python")
    record = json.dumps({"$type": BUNDLE, "runtime": "python", "code": blob, "createdAt": now_iso()})[:-1]
    status, out = await create_raw(stack.pds_url, author.account, BUNDLE, record + ',"extra":' + nest_json(1000) + "}")
    assert status == 200, out
    uri = await author.invoke({"uri": out["uri"], "cid": out["cid"]}, runner.did, args={"n": 1})
    result = await wait_result(reader, runner.did, uri)
    assert result["status"] == "rejected", result
    assert result["error"].startswith("bundle record is invalid: extra is nested deeper than 128 levels at extra.a.a")
    good = await author.publish(HELLO)
    assert (await wait_result(reader, runner.did, await author.invoke(good, runner.did, args={"n": 2})))["data"] == {"n": 2}


@pytest.mark.parametrize("depth", [LIMIT + 1, 1000, 2000])
async def test_reading_a_deep_record_from_the_pds_cuts_it_one_level_past_the_limit(stack, author, reader, depth):
    """listRecords, getRecord and the proof-carrying sync.getRecord each give the deep record
    back cut one level past the limit: readable, and still refused where it is checked."""
    status, out = await create_raw(stack.pds_url, author.account, INVOCATION,
                                   invocation_json("did:plc:x", {"uri": "at://x/y/z", "cid": CID}, args=nest_json(depth)))
    assert status == 200, out
    rkey = out["uri"].rsplit("/", 1)[1]
    await author.invoke({"uri": "at://x/y/z", "cid": CID}, "did:plc:x", args={"n": 1})  # a shallow one after it
    records, _ = await reader.list_records(author.account.did, INVOCATION)
    cid, value = await reader.get_record(author.account.did, INVOCATION, rkey)
    proven = await reader.get_verified_record(author.account.did, INVOCATION, rkey, out["cid"])
    assert cid == out["cid"] and [r["uri"] for r in records][-2] == out["uri"] and records[-1]["value"]["args"] == {"n": 1}
    for v in (records[-2]["value"], value, proven):
        assert v["runner"] == "did:plc:x"
        with pytest.raises(bounds.Malformed, match=r"^args is nested deeper than 128 levels at args\.a\.a"):
            bounds.check_fields(v)


async def test_xrpc_refuses_deep_and_mistyped_input_with_a_400_and_goes_on(author, make_runner):
    """Args nested past the limit (they used to give a 500, or an internal error naming a
    pydantic serializer) and wrong types: a 400 naming the field; then a valid call runs."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    base = runner.app.gateway.url
    bundle = await author.publish(HELLO)
    for name in ["args-129", "args-300", "args-10000", "timeout-string", "timeout-true", "write-result-string"]:
        change, message = XRPC_BODIES[name]
        body = {"bundle": bundle, "endpoint": "main"}
        data = json.dumps({**body, **change}) if isinstance(change, dict) else json.dumps(body)[:-1] + "," + change + "}"
        status, out = await invoke(base, await token(author, runner.did), data.encode())
        assert (status, out["error"]) == (400, "InvalidRequest"), (name, out)
        assert out["message"].startswith(message), (name, out)
    status, out = await invoke(base, await token(author, runner.did), {"bundle": bundle, "endpoint": "main", "args": {"n": 5}})
    assert status == 200 and out["data"] == {"n": 5}, out
