"""Result keys and the encoding of return values into records."""

import pytest

from atrund.records import JSON_VALUE, Result, decode_data, encode_data, result_rkey, result_uri


def test_result_key_is_base32_sha256_prefix_of_the_invocation_uri():
    """Pinned against coreutils: printf URI | sha256sum | xxd -r -p | base32 | tr A-Z a-z | cut -c1-32."""
    assert result_rkey("at://did:plc:abc/dev.atrun.invocation/3kabc") == "7vstiuogi2j5spw2rcifxtxeekk7akc6"

def test_result_key_depends_on_the_author():
    a = result_rkey("at://did:plc:alice/dev.atrun.invocation/3kabc")
    b = result_rkey("at://did:plc:mallory/dev.atrun.invocation/3kabc")
    assert a != b and len(a) == len(b) == 32 and set(a + b) <= set("abcdefghijklmnopqrstuvwxyz234567")

def test_result_uri():
    assert result_uri("did:plc:r", "at://x/y/z") == f"at://did:plc:r/dev.atrun.result/{result_rkey('at://x/y/z')}"

@pytest.mark.parametrize("value", [{"a": 1, "b": [True, None, "x"], "c": {"d": -5}}])
def test_plain_objects_are_stored_as_they_are(value):
    assert encode_data(value) is value
    assert decode_data(encode_data(value)) == value

@pytest.mark.parametrize("value", [42, "text", [1, 2], {"pi": 3.14}, {"$type": "x"}, {"big": 2**70}, 0.5, True, {"n": [1.5]}])
def test_values_the_data_model_cannot_hold_are_kept_exactly_as_json(value):
    data = encode_data(value)
    assert data["$type"] == JSON_VALUE and isinstance(data["json"], str)
    assert decode_data(data) == value
    assert set(data) == {"$type", "json"}  # nothing but a string: no float reaches the record

def test_none_is_no_data():
    assert encode_data(None) is None

def test_result_model_rejects_an_unknown_status_type():
    with pytest.raises(ValueError):
        Result.model_validate({"invocation": {"uri": "at://a/b/c", "cid": "bafyreiabc"}, "bundle": {"uri": "at://a/b/c", "cid": "bafyreiabc"},
                               "status": 3, "createdAt": "2026-01-01T00:00:00Z"})


@pytest.mark.parametrize("link", ["../../../etc/passwd", "/etc/passwd", "bafkreinotacid", "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"])
def test_blob_and_record_references_must_be_cids(link):
    """A CID names a file in the bundle cache: anything else (a path!) is refused by the model."""
    from atrund.records import Bundle, StrongRef

    with pytest.raises(ValueError):
        Bundle.model_validate({"runtime": "python", "createdAt": "x",
                               "code": {"$type": "blob", "ref": {"$link": link}, "mimeType": "text/x-python", "size": 1}})
    with pytest.raises(ValueError):
        StrongRef(uri="at://did:plc:a/dev.atrun.bundle/b", cid=link)


BLOB = {"$type": "blob", "ref": {"$link": "bafkreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
        "mimeType": "text/x-python", "size": 3}


@pytest.mark.parametrize(("field", "limit"), [("runtime", 64), ("name", 256), ("description", 3000), ("entrypoint", 1024)])
def test_bundle_strings_are_held_to_the_lexicons_max_length_in_utf8_bytes(field, limit):
    """The lexicon's maxLength counts UTF-8 bytes (the AT Protocol's rule), not characters: at the
    limit a field is taken; one byte over, or fewer characters that take more bytes, is refused
    naming the field and the limit."""
    from pydantic import ValidationError

    from atrund.records import Bundle

    base = {"runtime": "python", "code": BLOB, "createdAt": "2026-12-06T00:00:00.000Z"}
    assert getattr(Bundle.model_validate({**base, field: "x" * limit}), field) == "x" * limit
    for too_long in ("x" * (limit + 1), "é" * (limit // 2 + 1)):
        with pytest.raises(ValidationError) as caught:
            Bundle.model_validate({**base, field: too_long})
        err = caught.value.errors()[0]
        assert err["loc"] == (field,) and f"at most {limit} bytes of UTF-8" in err["msg"]


def test_endpoint_names_are_held_to_128_bytes():
    from pydantic import ValidationError

    from atrund.records import Bundle, Invocation

    with pytest.raises(ValidationError, match="at most 128 bytes"):
        Bundle.model_validate({"runtime": "python", "code": BLOB, "createdAt": "x", "endpoints": ["ok", "e" * 129]})
    ref = {"uri": "at://did:plc:a/dev.atrun.bundle/b", "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}
    with pytest.raises(ValidationError, match="at most 128 bytes"):
        Invocation.model_validate({"runner": "did:plc:r", "bundle": ref, "endpoint": "é" * 65, "createdAt": "x"})
