"""Shared pieces of the fuzz harness (hypothesis): the CI profile and input strategies.

Every fuzz target runs in the normal pytest run, bounded: ``ATRUND_FUZZ_EXAMPLES`` examples per
target (default 200) with a per-example deadline, no example database (nothing written into
the checkout). Run longer locally with e.g. ``ATRUND_FUZZ_EXAMPLES=20000``. A crash hypothesis
finds is printed with its reproduction; it becomes a regression test (an ``@example`` on the
target, or a plain test in tests/test_bounds.py).
"""

from __future__ import annotations

import os
from datetime import timedelta

import libipld
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from atrund import bounds

settings.register_profile(
    "atrund-ci",
    max_examples=int(os.environ.get("ATRUND_FUZZ_EXAMPLES", "200")),
    deadline=timedelta(seconds=5),  # generous: the machine is shared; a hang still fails
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile("atrund-ci")

LIMIT = bounds.MAX_DEPTH
CID = "bafyreidaphbml4tzdmdbd43vcmjx2m7jgnynjwnvmkafahvhtdskt67yvi"

# JSON values: scalars inside lists and objects, nested as deep as hypothesis takes them.
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=40)

# DAG-CBOR values: no floats needed; bytes stand for links and blobs.
cbor_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=40)
cbor_values = st.recursive(cbor_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=40)


def nest_json(depth: int, kind: str = "{") -> str:
    if kind == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def nest_cbor(depth: int, kind: str = "map") -> bytes:
    return (b"\xa1\x61a" if kind == "map" else b"\x81") * (depth - 1) + (b"\xa0" if kind == "map" else b"\x80")


# Depths around the limit and far past what any recursive decoder takes, up to 10,000 and beyond.
depths = st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, 255, 256, 999, 1000, 1001, 5000, 10_000, 50_000]) | st.integers(1, 3000)
deep_json = st.builds(nest_json, depths, st.sampled_from(["{", "["]))
deep_cbor = st.builds(nest_cbor, depths, st.sampled_from(["map", "array"]))


@st.composite
def json_texts(draw) -> str:
    """JSON text: a generated value, a deep one, one spliced into another, or garbled."""
    kind = draw(st.sampled_from(["value", "deep", "spliced", "garbled", "text"]))
    if kind == "value":
        import json

        return json.dumps(draw(json_values))
    if kind == "deep":
        return draw(deep_json)
    if kind == "spliced":
        return '{"records":[{"uri":"u","value":' + draw(deep_json) + "}]," + '"x":' + draw(deep_json) + "}"
    if kind == "garbled":
        text = draw(deep_json)
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.text(alphabet='[]{}",:\\ 0a', max_size=20)) + text[cut:]
    return draw(st.text(max_size=200))


@st.composite
def cbor_bytes(draw) -> bytes:
    """DAG-CBOR bytes: a generated value, a deep one, either garbled, or random bytes."""
    kind = draw(st.sampled_from(["value", "deep", "garbled", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    data = libipld.encode_dag_cbor(draw(cbor_values)) if kind == "value" else draw(deep_cbor)
    if kind == "garbled" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at + draw(st.integers(0, 8)):]
    return data
