"""The AT client is the network boundary: a remote answer of the wrong shape (not JSON, a key
missing, a value of the wrong type) becomes a typed AtrundError inside atrund.atproto, never a
KeyError, TypeError or AttributeError in whoever called it.

The remote side here is a REAL HTTP server on loopback (aiohttp) that fakes a hostile PDS and
PLC directory at once: it answers each XRPC method and each DID with whatever a test sets. The
callers are the real Identities, Repos, Session, ServiceAuth, trust reader and Poller.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time

import coincurve
import libipld
import pytest
from aiohttp import web
from atproto_crypto.consts import P256_DID_PREFIX, SECP256K1_DID_PREFIX
from atproto_crypto.did import format_did_key
from atproto_crypto.multibase import bytes_to_multibase
from loopback import serve

from atrund.access import AccessPolicy
from atrund.atproto.identity import MAX_ANSWER_BYTES, Identities, resolve_handle
from atrund.atproto.proof import CBOR_SHA256_CID, ProofError, SigningKey, created_records
from atrund.atproto.repos import Repos
from atrund.atproto.serviceauth import ServiceAuth, ServiceAuthError
from atrund.atproto.session import LoginFailed, Rejected, Session
from atrund.errors import AtrundError, ContentMismatch, IdentityError, RemoteError, TooLarge, Unreachable
from atrund.health import Health
from atrund.ingest import Intake
from atrund.ingest.poll import Poller
from atrund.records import INVOCATION
from atrund.state import State
from atrund.trust import follows

DID = "did:plc:hostilepds0000000000000"
KEY = "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"  # a valid K-256 public key (multibase)
JSON = "application/json"
BLOB_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"  # raw, sha2-256 of b"hello"


class HostileServer:
    """A PLC directory (``GET /{did}``) and a PDS (``/xrpc/{method}``) on loopback that answer
    with whatever ``docs`` and ``answers`` hold: (status, body, content type)."""

    def __init__(self) -> None:
        self.docs: dict[str, bytes] = {}
        self.answers: dict[str, tuple[int, bytes, str]] = {}
        self.url = ""

    async def start(self) -> HostileServer:
        async def doc(request: web.Request) -> web.Response:
            body = self.docs.get(request.match_info["did"])
            return web.Response(status=404) if body is None else web.Response(body=body, content_type=JSON)

        async def xrpc(request: web.Request) -> web.Response:
            status, body, content_type = self.answers.get(request.match_info["method"], (501, b"{}", JSON))
            return web.Response(status=status, body=body, headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_route("*", "/xrpc/{method}", xrpc)
        app.router.add_get("/{did}", doc)
        self._runner, self.url = await serve(app)
        self.serve_doc()
        return self

    def serve_doc(self, **changes) -> None:
        """DID's document: its PDS is this server, its key KEY, unless ``changes`` say otherwise."""
        doc = {"id": DID, "alsoKnownAs": ["at://hostile.test"],
               "verificationMethod": [{"id": f"{DID}#atproto", "type": "Multikey", "controller": DID, "publicKeyMultibase": KEY}],
               "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": self.url}]}
        doc.update(changes)
        self.docs[DID] = json.dumps(doc).encode()

    def answer(self, method: str, body: bytes | object, status: int = 200, content_type: str = JSON) -> None:
        self.answers[method] = (status, body if isinstance(body, bytes) else json.dumps(body).encode(), content_type)

    async def close(self) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def hostile():
    server = await HostileServer().start()
    yield server
    await server.close()


@pytest.fixture
async def repos(hostile):
    r = Repos(Identities(hostile.url, timeout=5, allow_private_addresses=True))
    yield r
    await r.close()


def deep(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


# -- reading repos ------------------------------------------------------------------------------------

LIST, GET, SYNC, BLOB = ("com.atproto.repo.listRecords", "com.atproto.repo.getRecord", "com.atproto.sync.getRecord",
                         "com.atproto.sync.getBlob")
REPO_ANSWERS = {
    "list: not JSON": (LIST, 200, b"<html>bad gateway</html>", "text/html", RemoteError, "invalid JSON"),
    "list: JSON that is a list": (LIST, 200, b"[]", JSON, RemoteError, "not an object"),
    "list: records not a list": (LIST, 200, b'{"records": {"a": 1}}', JSON, RemoteError, "without a list of records"),
    "get: no cid": (GET, 200, b'{"value": {}}', JSON, RemoteError, "without a cid and a record"),
    "get: value a string": (GET, 200, b'{"cid": "bafy", "value": "v"}', JSON, RemoteError, "without a cid and a record"),
    "get: cid a number": (GET, 200, b'{"cid": 5, "value": {}}', JSON, RemoteError, "without a cid and a record"),
    "get: error body a list": (GET, 400, b"[1, 2]", JSON, RemoteError, "HTTP 400"),
    "get: error fields of the wrong type": (GET, 400, b'{"error": [1], "message": {}}', JSON, RemoteError, "[1]"),
    "get: error body NaN": (GET, 418, b'{"error": NaN}', JSON, RemoteError, "HTTP 418"),
    "sync: not a CAR": (SYNC, 200, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "application/vnd.ipld.car", RemoteError,
                        "not a CAR"),
    "sync: empty": (SYNC, 200, b"", "application/vnd.ipld.car", RemoteError, "not a CAR"),
    "blob: other bytes": (BLOB, 200, b"olleh", "application/octet-stream", ContentMismatch, "does not hash to its CID"),
    "blob: too many bytes": (BLOB, 200, b"x" * 100, "application/octet-stream", TooLarge, "larger than the limit of 10 bytes"),
    "a 5xx page": (LIST, 502, b"<html>", "text/html", Unreachable, "HTTP 502"),
}


async def _call(repos: Repos, method: str):
    if method == LIST:
        return await repos.list_records(DID, INVOCATION)
    if method == GET:
        return await repos.get_record(DID, INVOCATION, "3lfoo")
    if method == SYNC:
        return await repos.get_verified_record(DID, INVOCATION, "3lfoo", "bafyreib2rxk3rh6kzwq")
    return await repos.get_blob(DID, BLOB_CID, max_bytes=10)


@pytest.mark.parametrize("case", REPO_ANSWERS)
async def test_a_pds_answer_of_the_wrong_shape_is_a_remote_error(hostile, repos, case):
    """Each wrong answer is the typed error named, with a message that says what was wrong."""
    method, status, body, content_type, error, words = REPO_ANSWERS[case]
    hostile.answer(method, body, status, content_type)
    with pytest.raises(AtrundError) as e:
        await _call(repos, method)
    assert isinstance(e.value, error), repr(e.value)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("endpoint", [{"url": "x"}, "pds.example.com", "ftp://pds.example.com", 5, None])
async def test_a_did_document_naming_no_usable_pds_is_an_identity_error(hostile, repos, endpoint):
    """A service endpoint that is an object, has no scheme, a non-HTTP scheme, or no string at
    all: every read of that author is an IdentityError that says so, before any request."""
    hostile.serve_doc(service=[{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": endpoint}])
    with pytest.raises(IdentityError, match="names no PDS"):
        await repos.list_records(DID, INVOCATION)


# -- signing keys ---------------------------------------------------------------------------------------

BAD_KEYS = {
    "not multibase base58": {"type": "Multikey", "publicKeyMultibase": "abc"},
    "an unknown key type": {"type": "Multikey", "publicKeyMultibase": "zzz"},
    "a method type the SDK does not know": {"type": "Weird2099", "publicKeyMultibase": KEY},
    "no key at all": {"type": "Multikey"},
}


@pytest.mark.parametrize("case", BAD_KEYS)
async def test_a_did_document_with_an_unusable_signing_key_is_an_identity_error(hostile, case):
    """Identities.signing_key refuses what the firehose and service auth could not verify with."""
    hostile.serve_doc(verificationMethod=[{"id": f"{DID}#atproto", "controller": DID, **BAD_KEYS[case]}])
    identities = Identities(hostile.url, timeout=5, allow_private_addresses=True)
    try:
        with pytest.raises(IdentityError, match="signing key"):
            await identities.signing_key(DID)
    finally:
        await identities.close()


@pytest.mark.parametrize("prefix", [SECP256K1_DID_PREFIX, P256_DID_PREFIX], ids=["ES256K", "ES256"])
def test_a_did_key_that_is_not_a_point_on_its_curve_is_an_identity_error(prefix):
    """It parses as a did:key, but its bytes are no public key: SigningKey says so as an
    IdentityError (the curve libraries raise ValueError)."""
    with pytest.raises(IdentityError, match="not a usable public key"):
        SigningKey("did:key:" + bytes_to_multibase("z", prefix + b"\x02" + b"\xff" * 32))


async def test_a_service_auth_token_whose_issuer_publishes_a_broken_key_is_refused_as_identity(hostile):
    """The token is well-formed; the issuer's DID document (from the hostile directory) names a
    key that does not parse: ServiceAuthError reason ``identity``, not an exception from the SDK."""
    hostile.serve_doc(verificationMethod=[{"id": f"{DID}#atproto", "type": "Multikey", "controller": DID,
                                           "publicKeyMultibase": "zzz"}])
    identities = Identities(hostile.url, timeout=5, allow_private_addresses=True)
    auth = ServiceAuth(identities, "did:plc:runner")
    now = int(time.time())

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    token = ".".join([part({"alg": "ES256K", "typ": "JWT"}),
                      part({"iss": DID, "aud": "did:plc:runner", "lxm": "dev.atrun.invoke", "exp": now + 60, "iat": now,
                            "jti": "j1"}),
                      base64.urlsafe_b64encode(b"s" * 64).decode().rstrip("=")])
    try:
        with pytest.raises(ServiceAuthError) as e:
            await auth.verify(f"Bearer {token}", "dev.atrun.invoke")
        assert e.value.reason == "identity" and "signing key" in str(e.value), str(e.value)
    finally:
        await identities.close()


# -- handles ----------------------------------------------------------------------------------------------

RESOLVE = "com.atproto.identity.resolveHandle"
HANDLE_ANSWERS = {
    "not JSON": (b"<html>", "is not JSON"),
    "a list": (b'["did:plc:x"]', "HTTP 200"),
    "did a number": (b'{"did": 5}', "HTTP 200"),
    "did not a DID": (b'{"did": "alice"}', "HTTP 200"),
    "nested past the limit": (b'{"did": ' + deep(10_000) + b"}", "nested deeper than"),
    "too large": (b'{"did": "did:plc:x", "pad": "' + b"x" * MAX_ANSWER_BYTES + b'"}', "larger than the limit"),
}


@pytest.mark.parametrize("case", HANDLE_ANSWERS)
async def test_a_resolve_handle_answer_of_the_wrong_shape_is_an_identity_error(hostile, case):
    body, words = HANDLE_ANSWERS[case]
    hostile.answer(RESOLVE, body)
    with pytest.raises(IdentityError) as e:
        await resolve_handle("alice.test", hostile.url, timeout=5, allow_private_addresses=True)
    assert words in str(e.value), str(e.value)


# -- the logged-in session (writes) ----------------------------------------------------------------------

def fake_jwt() -> str:
    """A token the SDK can read the expiry of (it never checks the signature: the PDS does)."""
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'ES256K', 'typ': 'JWT'})}.{part({'sub': DID, 'exp': int(time.time()) + 3600, 'iat': 0, 'scope': 'com.atproto.access'})}.c2ln"


def serve_login(hostile: HostileServer) -> None:
    hostile.answer("com.atproto.server.createSession", {"accessJwt": fake_jwt(), "refreshJwt": fake_jwt(), "did": DID,
                                                        "handle": "hostile.test"})
    hostile.answer("com.atproto.server.getSession", {"did": DID, "handle": "hostile.test"})


LOGIN_ANSWERS = {
    "not JSON, though it says so": (b"<html>hello</html>", JSON),
    "JSON that is a list": (b"[]", JSON),
    "no accessJwt": (json.dumps({"refreshJwt": "x", "did": DID, "handle": "h.test"}).encode(), JSON),
    "did a number": (json.dumps({"accessJwt": "a", "refreshJwt": "r", "did": 5, "handle": "h.test"}).encode(), JSON),
    "nested past the limit": (deep(10_000), JSON),
}


@pytest.mark.parametrize("case", LOGIN_ANSWERS)
async def test_a_login_answer_of_the_wrong_shape_is_a_remote_error(hostile, case):
    """Not LoginFailed (the password may be right) and not a ValueError from the SDK."""
    body, content_type = LOGIN_ANSWERS[case]
    hostile.answer("com.atproto.server.createSession", body, content_type=content_type)
    with pytest.raises(RemoteError) as e:
        await Session.login(hostile.url, "hostile.test", "password")
    assert not isinstance(e.value, LoginFailed)
    assert "the PDS answered with something other than the protocol's answer" in str(e.value), str(e.value)


WRITE_ANSWERS = {
    "not JSON, though it says so": b"{{{",
    "no uri": json.dumps({"cid": "bafyreib2rxk3rh6kzwq"}).encode(),
    "uri a list": json.dumps({"uri": [], "cid": "x"}).encode(),
    "a list": b"[1]",
}


@pytest.mark.parametrize("case", WRITE_ANSWERS)
async def test_a_write_answer_of_the_wrong_shape_is_a_remote_error_worth_retrying(hostile, case):
    """putRecord answered 200 with a body of the wrong shape: a plain RemoteError, which the
    result writer retries. Not Rejected (the record is fine) and not the ValueError the SDK
    raised for a body that says it is JSON and is not, which the writer took for a record that
    can never be sent."""
    serve_login(hostile)
    session = await Session.login(hostile.url, "hostile.test", "password")
    try:
        hostile.answer("com.atproto.repo.putRecord", WRITE_ANSWERS[case])
        with pytest.raises(RemoteError) as e:
            await session.put_record("dev.atrun.result", "abc", {"status": "success"})
        assert type(e.value) is RemoteError and not isinstance(e.value, (Rejected, Unreachable)), repr(e.value)
        hostile.answer("com.atproto.server.getServiceAuth", {"token": 5})
        with pytest.raises(RemoteError, match="other than the protocol's answer"):
            await session.service_token(DID, "dev.atrun.invoke")
    finally:
        await session.close()


# -- the trust source and the poller ------------------------------------------------------------------------

async def test_a_trust_source_listing_garbage_yields_only_well_formed_subjects(hostile, repos):
    """Records that are not objects, values that are not objects, subjects that are not DIDs:
    skipped. A listing that is not a list: a RemoteError (the live policy keeps its last set)."""
    hostile.answer(LIST, {"records": [5, "x", None, {"value": []}, {"value": {"subject": 7}},
                                      {"value": {"subject": "not-a-did"}}, {"value": {"subject": "did:plc:good"}}],
                          "cursor": 12})
    assert await follows(repos, DID) == {"did:plc:good"}
    hostile.answer(LIST, {"records": "none"})
    with pytest.raises(RemoteError, match="without a list of records"):
        await follows(repos, DID)


async def test_a_poll_of_a_pds_listing_garbage_takes_only_this_authors_invocations(hostile, repos, tmp_path):
    """Listed entries of every wrong shape are passed over; the one well-formed invocation of
    this author is taken; a listing that is not a list fails this author's poll alone (counted,
    on /healthz), without an exception."""
    state = State(tmp_path / "state" / "atrund.db")
    try:
        runner = "did:plc:runner"
        intake = Intake(state, runner, AccessPolicy("allowlist", frozenset({DID}), frozenset()), lambda uri: None)
        health = Health()
        poller = Poller(repos, intake, [DID], interval=60, health=health)
        good = f"at://{DID}/{INVOCATION}/3lgood"
        car, cid = proving_author(hostile, f"{INVOCATION}/3lgood", {"runner": runner})
        hostile.answer(SYNC, car, content_type="application/vnd.ipld.car")
        hostile.answer(LIST, {"records": [
            5, [], {"uri": 5, "cid": "c", "value": {}}, {"uri": good, "cid": 7, "value": {}},
            {"uri": f"at://did:plc:other/{INVOCATION}/3lx", "cid": "c", "value": {"runner": runner}},
            {"uri": f"at://{DID}/{INVOCATION}/a/b", "cid": "c", "value": {"runner": runner}},
            {"uri": f"at://{DID}/{INVOCATION}/3lnot", "cid": "c", "value": "not an object"},
            {"uri": good, "cid": cid, "value": {"runner": runner}}]})
        assert await poller.poll_author(DID) == 1
        assert state.status_of(good) == ("pending", None) and poller.unproven == 0
        hostile.answer(LIST, {"records": 5})
        assert await poller.poll_once(reconcile=True) == 0
        assert poller.failures[DID] == 1
        assert "without a list of records" in health.problems()[f"poll:{DID}"]["reason"]
    finally:
        state.close()


# -- commit proofs (a relay's frames) --------------------------------------------------------------------

def _cid(block: bytes) -> bytes:
    return CBOR_SHA256_CID + hashlib.sha256(block).digest()


def proving_author(hostile: HostileServer, path: str, value: dict) -> tuple[bytes, str]:
    """Give DID a signing key of the test's, and sign a one-record repo holding ``value`` at
    ``path``: (the sync.getRecord CAR that proves it, the record's CID)."""
    key = coincurve.PrivateKey()
    public = format_did_key("ES256K", key.public_key.format(compressed=True)).removeprefix("did:key:")
    hostile.serve_doc(verificationMethod=[{"id": f"{DID}#atproto", "type": "Multikey", "controller": DID,
                                           "publicKeyMultibase": public}])
    record = libipld.encode_dag_cbor(value)
    node = libipld.encode_dag_cbor({"l": None, "e": [{"p": 0, "k": path.encode(), "v": _cid(record), "t": None}]})
    commit = signed_commit(DID, _cid(node), key)
    return _car([commit, node, record], root=_cid(commit)), libipld.encode_cid(_cid(record))


def _car(blocks: list[bytes], root: bytes | None = None) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    header = libipld.encode_dag_cbor({"version": 1, "roots": [] if root is None else [root]})
    out = varint(len(header)) + header
    for block in blocks:
        cid = _cid(block)
        out += varint(len(cid) + len(block)) + cid + block
    return out


def signed_commit(did: str, tree: bytes, key: coincurve.PrivateKey) -> bytes:
    unsigned = {"did": did, "version": 3, "data": tree, "rev": "3lrev", "prev": None}
    sig = key.sign_recoverable(libipld.encode_dag_cbor(unsigned))[:64]  # r||s, low S (libsecp256k1)
    return libipld.encode_dag_cbor({**unsigned, "sig": sig})


MST_ENTRIES = {
    "an entry that is a string": "e",
    "key text, not bytes": {"p": 0, "k": "dev.atrun.invocation/x", "v": b"\x01", "t": None},
    "no prefix length": {"k": b"dev.atrun.invocation/x", "v": b"\x01", "t": None},
    "a negative prefix length": {"p": -1, "k": b"dev.atrun.invocation/x", "v": b"\x01", "t": None},
    "a subtree that is a number": {"p": 0, "k": b"a", "v": b"\x01", "t": 5},
}


@pytest.mark.parametrize("case", MST_ENTRIES)
def test_a_signed_commit_with_a_malformed_tree_is_a_proof_error(case):
    """The author signs (their key is real) a tree whose entry is of the wrong shape: the proof
    says ProofError naming the node, where the lookup raised TypeError or KeyError before."""
    key = coincurve.PrivateKey()
    did = "did:plc:signer"
    node = libipld.encode_dag_cbor({"l": None, "e": [MST_ENTRIES[case]]})
    commit = signed_commit(did, _cid(node), key)
    body = {"blocks": _car([commit, node]), "commit": _cid(commit), "repo": did}
    signing = SigningKey(format_did_key("ES256K", key.public_key.format(compressed=True)))
    with pytest.raises(ProofError, match="MST node"):
        created_records(body, [(f"{INVOCATION}/x", b"\x01")], signing)


@pytest.mark.parametrize("field", ["blocks", "commit", "repo"])
def test_a_commit_frame_with_a_field_of_the_wrong_type_is_a_proof_error(field):
    """blocks text instead of bytes, a commit that is a number, a repo that is bytes: ProofError."""
    key = coincurve.PrivateKey()
    body = {"blocks": b"\x01\x02", "commit": b"\x01", "repo": "did:plc:x", "tooBig": False}
    body[field] = {"blocks": "car", "commit": 5, "repo": b"did"}[field]
    signing = SigningKey(format_did_key("ES256K", key.public_key.format(compressed=True)))
    with pytest.raises(ProofError, match="not of the type"):
        created_records(body, [(f"{INVOCATION}/x", b"\x01")], signing)
