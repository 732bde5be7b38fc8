"""Fuzz the firehose frame decoder and the proof: arbitrary, garbled and deeply nested frames,
CAR files and record blocks. Nothing may escape the frame loop; the proof raises only its
documented errors; never RecursionError."""

from __future__ import annotations

import asyncio
import hashlib

import coincurve
import libipld
import pytest
from atproto_crypto.did import SECP256K1_JWT_ALG, format_did_key
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fuzzing import CID, LIMIT, cbor_bytes, cbor_values, deep_cbor, nest_cbor
from hypothesis import example, given
from hypothesis import strategies as st

from atrund import bounds
from atrund.access import AccessPolicy
from atrund.atproto.identity import Identities
from atrund.atproto.proof import CBOR_SHA256_CID, Incomplete, ProofError, SigningKey, created_records, read_car
from atrund.atproto.repos import Repos, to_json_model
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.records import INVOCATION
from atrund.state import State

DID = "did:plc:fuzzauthor"
PATH = f"{INVOCATION}/3lfuzz"
# What the frame loop (Firehose.ingest) turns into "malformed frame skipped"; anything else
# escaping the proof would end ingest.
TOLERATED = (ProofError, Incomplete, AttributeError, TypeError, ValueError, KeyError, IndexError)


@pytest.fixture(scope="module")
def firehose(tmp_path_factory):
    """A real Firehose, State and Intake; the DID directory is a closed loopback port, so a frame
    that needs the author's key fails to resolve it (as when the PLC is down) and is not taken."""
    loop = asyncio.new_event_loop()
    state = State(tmp_path_factory.mktemp("fuzz") / "atrund.sqlite3")
    repos = Repos(Identities("http://127.0.0.1:9", timeout=2, allow_private_addresses=True))
    policy = AccessPolicy("allowlist", frozenset({DID}), frozenset())
    hose = Firehose("ws://127.0.0.1:9", repos, Intake(state, "did:plc:fuzzrunner", policy, lambda uri: None))
    yield hose, loop
    loop.run_until_complete(repos.close())
    loop.close()
    state.close()


def frame(header: dict, body: dict) -> bytes:
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


kinds = st.sampled_from(["#commit", "#identity", "#account", "#info", "#sync", "#other"])
ops = st.lists(st.fixed_dictionaries({
    "action": st.sampled_from(["create", "update", "delete", "x"]),
    "path": st.sampled_from([PATH, "app.bsky.feed.post/1", ""]) | st.text(max_size=30),
    "cid": st.none() | st.binary(max_size=40) | st.just(libipld.decode_multibase(CID)[1]),
}) | cbor_values, max_size=4)
bodies = st.fixed_dictionaries({
    "seq": st.integers(-(2**63), 2**63) | cbor_values,
    "repo": st.sampled_from([DID, "did:plc:other"]) | cbor_values,
    "ops": ops | cbor_values,
    "blocks": st.binary(max_size=300),
    "commit": st.binary(max_size=40),
    "tooBig": st.booleans(),
}, optional={"did": st.just(DID), "active": st.booleans(), "error": st.text(max_size=10), "name": st.text(max_size=10)})
structured = st.builds(frame, st.fixed_dictionaries({"op": st.sampled_from([1, -1, 0]), "t": kinds}), bodies)


@st.composite
def deep_spliced(draw) -> bytes:
    """A well-formed frame with a deep value in place of one of its fields."""
    field = draw(st.sampled_from(["seq", "repo", "ops", "blocks", "note"]))
    body = {"seq": 1, "repo": DID, "ops": [], "blocks": b"", "note": PATH, field: b"DEEP"}
    raw = frame({"op": 1, "t": "#commit"}, body)
    return raw.replace(b"\x44DEEP", draw(deep_cbor), 1)


frames = cbor_bytes() | structured | deep_spliced() | st.builds(lambda a, b: a + b, cbor_bytes(), cbor_bytes())


@given(messages=st.lists(frames, min_size=1, max_size=4))
@example(messages=[nest_cbor(100_000) + nest_cbor(100_000)])
@example(messages=[libipld.encode_dag_cbor({"op": 1, "t": "#commit"}) + nest_cbor(10_000, "array")])
@example(messages=[libipld.encode_dag_cbor({"op": 1, "t": "#info"}) + b"\xa1\x61a" * 5000])
def test_no_frame_escapes_the_frame_loop(firehose, messages):
    hose, loop = firehose
    before = hose.counters.frames
    loop.run_until_complete(hose.ingest(messages))  # raises nothing, whatever the frames
    assert hose.counters.frames == before + len(messages)


@given(data=cbor_bytes() | st.binary(max_size=500))
@example(data=b"\x00")
@example(data=b"\x05" + b"\x00" * 3)
def test_read_car_raises_only_proof_errors(data):
    try:
        blocks = read_car(data)
    except ProofError:
        return
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in blocks.items())


# -- the proof over a genuinely signed commit -------------------------------------------------------

KEY = coincurve.PrivateKey(hashlib.sha256(b"atrund fuzz key").digest())
SIGNING = SigningKey(format_did_key(SECP256K1_JWT_ALG, KEY.public_key.format(compressed=True)))


def put(blocks: dict[bytes, bytes], raw: bytes) -> bytes:
    cid = CBOR_SHA256_CID + hashlib.sha256(raw).digest()
    blocks[cid] = raw
    return cid


def signed_frame(record_raw: bytes) -> tuple[dict, bytes]:
    """A #commit body proving ``record_raw`` (any bytes) at PATH, signed with KEY: (body, record CID)."""
    blocks: dict[bytes, bytes] = {}
    record_cid = put(blocks, record_raw)
    root = put(blocks, libipld.encode_dag_cbor({"l": None, "e": [{"p": 0, "k": PATH.encode(), "v": record_cid, "t": None}]}))
    unsigned = {"did": DID, "version": 3, "data": root, "rev": "3lfuzz", "prev": None}
    r, s = decode_dss_signature(KEY.sign(libipld.encode_dag_cbor(unsigned)))
    commit = put(blocks, libipld.encode_dag_cbor({**unsigned, "sig": r.to_bytes(32, "big") + s.to_bytes(32, "big")}))
    head = libipld.encode_dag_cbor({"roots": [commit], "version": 1})

    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    car = varint(len(head)) + head + b"".join(varint(len(c) + len(b)) + c + b for c, b in blocks.items())
    return {"repo": DID, "commit": commit, "blocks": car}, record_cid


@st.composite
def record_blocks(draw) -> bytes:
    kind = draw(st.sampled_from(["record", "deep-args", "any"]))
    if kind == "any":
        return draw(cbor_bytes())
    record = {"runner": "did:plc:fuzzrunner", "endpoint": "main", "args": b"DEEP" if kind == "deep-args" else draw(cbor_values)}
    raw = libipld.encode_dag_cbor(record)
    return raw.replace(b"\x44DEEP", draw(deep_cbor), 1) if kind == "deep-args" else raw


@given(record_raw=record_blocks(), flip=st.none() | st.tuples(st.integers(0, 10_000), st.integers(1, 255)))
@example(record_raw=libipld.encode_dag_cbor({"runner": "did:plc:r", "args": b"DEEP"}).replace(b"\x44DEEP", nest_cbor(10_000)), flip=None)
def test_the_proof_takes_any_record_block_and_garbled_cars(record_raw, flip):
    """Genuinely signed: the record comes back (cut one level past the limit if deeper); with a
    byte of the CAR flipped, the proof refuses it or, if the flip missed everything it checks,
    still returns the record."""
    body, cid = signed_frame(record_raw)
    if flip is not None:
        car = bytearray(body["blocks"])
        at, xor = flip
        car[at % len(car)] ^= xor
        body["blocks"] = bytes(car)
    try:
        records = created_records(body, [(PATH, cid)], SIGNING)
    except TOLERATED:
        assert flip is not None or not _is_dag_cbor(record_raw), "a genuine frame of a DAG-CBOR record was refused"
        return
    value = to_json_model(records[PATH])
    assert bounds.too_deep(value, LIMIT + 1) is None  # never deeper than one level past the limit
    if isinstance(value, dict):
        try:
            bounds.check_fields(value)
        except bounds.Malformed as e:
            assert "(the limit)" in str(e)


def _is_dag_cbor(raw: bytes) -> bool:
    try:
        bounds.decode_dag_cbor(raw, "record", cut=True)
        return True
    except bounds.Malformed:
        return False
