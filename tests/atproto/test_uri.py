"""AT URIs and TIDs: atrund.atproto.uri is the one parser and the one maker."""

import pytest

from atrund.atproto.uri import AtUri, authority, is_tid, new_tid

URI = "at://did:plc:abc/dev.atrun.invocation/3lfoo"


def test_a_record_uri_parses_into_its_parts_and_prints_back():
    """parse() gives authority (the DID), collection and record key; str() is the URI again."""
    uri = AtUri.parse(URI)
    assert (uri.did, uri.authority, uri.collection, uri.rkey) == ("did:plc:abc", "did:plc:abc", "dev.atrun.invocation", "3lfoo")
    assert str(uri) == URI
    assert AtUri.of("did:plc:abc", "dev.atrun.invocation/3lfoo") == uri
    assert authority(URI) == "did:plc:abc"


@pytest.mark.parametrize(("text", "why"), [
    ("did:plc:abc/dev.atrun.invocation/3lfoo", "does not start with at://"),
    ("https://did:plc:abc/c/r", "does not start with at://"),
    ("at://did:plc:abc/dev.atrun.invocation", "has 2 parts after at://, not 3"),
    ("at://did:plc:abc", "has 1 part after at://, not 3"),
    ("at://did:plc:abc/c/r/extra", "has 4 parts after at://, not 3"),
    ("at://did:plc:abc/c/", "its record key is empty"),
    ("at:///c/r", "its authority (DID) is empty"),
    ("at://did:plc:abc//r", "its collection is empty"),
    (None, "not a string"),
    (42, "not a string"),
])
def test_a_malformed_uri_is_refused_naming_what_is_wrong(text, why):
    """One ValueError whose message quotes the input and says what is wrong with it."""
    with pytest.raises(ValueError) as e:
        AtUri.parse(text)
    assert why in str(e.value) and repr(text) in str(e.value), str(e.value)


def test_a_path_with_a_slash_in_its_record_key_is_not_a_record():
    """A commit op path of three parts names no record: AtUri.of refuses it (the firehose skips such ops)."""
    with pytest.raises(ValueError, match="has 4 parts"):
        AtUri.of("did:plc:abc", "dev.atrun.invocation/a/b")


def test_new_tids_are_valid_and_strictly_increasing():
    """Thousands made at once (many within one microsecond) are all TIDs, all distinct, in order."""
    tids = [new_tid() for _ in range(5000)]
    assert all(is_tid(t) for t in tids)
    assert tids == sorted(tids) and len(set(tids)) == len(tids)


@pytest.mark.parametrize("text", ["3lfoo", "3jzfcijpj2z2aa", "kzzzzzzzzzzzz", "3JZFCIJPJ2Z2A", "3jzfcijpj2z21", "", None, 7])
def test_what_is_not_a_tid(text):
    """Too short or long, a top bit set (first character past j), capitals, 0/1/8/9, not a string."""
    assert not is_tid(text)
    assert is_tid("3jzfcijpj2z2a")
