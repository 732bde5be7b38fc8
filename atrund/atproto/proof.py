"""What a ``#commit`` frame proves on its own: the records it creates, checked locally.

A relay can say anything, so a record taken from its stream is only believed once it is tied to
the author's signing key. Every commit frame carries what that takes (its CAR slice holds the
signed commit block, the repo's MST nodes along every changed path, and the new record blocks):

1. every block used is hashed against the CID that names it;
2. the commit block names the frame's repo DID, and its signature (over the commit without
   ``sig``, DAG-CBOR) verifies against the signing key in the author's DID document;
3. the record's path is looked up in the MST under the commit's ``data`` root, and must lead to
   the CID the frame's op names; that CID's block is the record.

No network request is made per invocation, so a slow or hostile PDS cannot stall the stream and
one core verifies thousands of commits a second. When a frame lacks a block (a ``tooBig`` commit
of an old PDS), :class:`Incomplete` says so and the caller fetches the record from the author's
own PDS instead.
"""

from __future__ import annotations

import hashlib
from typing import Any

import coincurve
import libipld
from atproto_core.exceptions import AtProtocolError
from atproto_crypto.algs import ALGORITHM_TO_CLASS
from atproto_crypto.did import parse_did_key
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ec import ECDSA
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256

from atrund import bounds
from atrund.errors import IdentityError, Incomplete, ProofError

CBOR_SHA256_CID = b"\x01\x71\x12\x20"  # CIDv1, dag-cbor, sha2-256, 32-byte digest: all repo blocks


class SigningKey:
    """An author's atproto signing key (``did:key``), parsed once and kept for verifying.

    K-256 (what PDSes issue) is verified with libsecp256k1 through coincurve: OpenSSL's generic
    secp256k1 takes about 790 us a signature here, libsecp256k1 about 55 us. P-256 goes through
    ``cryptography`` (about 120 us). Both refuse high-S signatures, as atproto requires.
    """

    def __init__(self, did_key: str) -> None:
        """IdentityError if ``did_key`` (from a DID document: remote input) is not a public key
        of an algorithm atproto signs with."""
        try:
            parsed = parse_did_key(did_key)
            if parsed.jwt_alg == "ES256K":
                self._k256 = coincurve.PublicKey(parsed.key_bytes)
                return
            alg = ALGORITHM_TO_CLASS.get(parsed.jwt_alg)
            if alg is None:
                raise IdentityError(f"unsupported signing key algorithm {parsed.jwt_alg}")
            self._k256 = None
            self._p256 = alg()
            self._public = self._p256.get_elliptic_curve_public_key(parsed.key_bytes)
        except (AtProtocolError, ValueError, TypeError) as e:  # the SDK's, and the curve libraries' for a bad point
            raise IdentityError(f"the signing key {did_key[:100]!r} is not a usable public key: {e}") from None

    def verify(self, data: bytes, sig: bytes) -> bool:
        if len(sig) != 64:
            return False
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        if self._k256 is not None:
            try:
                return self._k256.verify(encode_dss_signature(r, s), data)  # libsecp256k1 rejects high S itself
            except (ValueError, TypeError):
                return False
        try:
            # The SDK's encoding step refuses high-S signatures (atproto forbids malleable ones).
            self._public.verify(self._p256._encode_signature(sig), data, ECDSA(SHA256()))
        except InvalidSignature:
            return False
        return True


def read_car(data: bytes) -> dict[bytes, bytes]:
    """The blocks of a CAR v1 file, raw, keyed by their binary CID (not yet verified)."""
    try:
        size, pos = _varint(data, 0)
        pos += size  # the header (roots): a commit frame names its commit itself
        blocks = {}
        end_of_data = len(data)
        while pos < end_of_data:
            size = data[pos]
            if size < 0x80:  # sections under 128 bytes: most MST nodes and small records
                pos += 1
            else:
                size, pos = _varint(data, pos)
            end = pos + size
            if end > end_of_data:
                raise ProofError("CAR section runs past the end of the frame")
            # Repo blocks all have 36-byte CIDv1 dag-cbor sha2-256 CIDs; anything else is parsed.
            cid_end = pos + 36 if data.startswith(CBOR_SHA256_CID, pos) else _cid_end(data, pos)
            blocks[data[pos:cid_end]] = data[cid_end:end]
            pos = end
        return blocks
    except IndexError:
        raise ProofError("truncated CAR") from None


def block(blocks: dict[bytes, bytes], cid: bytes, *, record: bool = False) -> Any:
    """The decoded block that ``cid`` names, after checking it hashes to it.

    Nested deeper than bounds.MAX_DEPTH: a commit or tree node is refused (ProofError); a
    ``record`` comes back cut one level past the limit (bounds.decode_dag_cbor), so the record
    is still answered, with a refusal that names where it is too deep."""
    raw = blocks.get(cid)
    if raw is None:
        raise Incomplete(f"the frame lacks block {_cid_str(cid)}")
    if not cid.startswith(CBOR_SHA256_CID) or len(cid) != 36:
        raise ProofError(f"block {_cid_str(cid)} is not a sha2-256 dag-cbor CID")
    if hashlib.sha256(raw).digest() != cid[4:]:
        raise ProofError(f"block {_cid_str(cid)} does not hash to its CID")
    try:
        return bounds.decode_dag_cbor(raw, f"block {_cid_str(cid)}", cut=record)
    except bounds.Malformed as e:
        raise ProofError(str(e)) from None


def verify_commit(blocks: dict[bytes, bytes], commit_cid: bytes, did: str, key: SigningKey) -> dict[str, Any]:
    """The commit block, once its DID and signature check out."""
    commit = block(blocks, commit_cid)
    if not isinstance(commit, dict) or commit.get("did") != did or not isinstance(commit.get("sig"), bytes):
        raise ProofError(f"the commit block is not a signed commit of {did}")
    unsigned = {k: v for k, v in commit.items() if k != "sig"}
    if not key.verify(libipld.encode_dag_cbor(unsigned), commit["sig"]):
        raise ProofError(f"the commit signature does not verify against {did}'s signing key")
    return commit


def mst_lookup(blocks: dict[bytes, bytes], root: bytes, path: str) -> bytes | None:
    """The CID stored under ``path`` in the MST at ``root``, or None when the tree proves it absent.

    MST nodes hold sorted entries; entry keys are prefix-compressed against the previous one;
    ``l`` is the subtree left of the first entry and each entry's ``t`` the subtree to its right.
    """
    key = path.encode()
    node_cid: bytes | None = root
    while node_cid is not None:
        node = block(blocks, node_cid)
        if not isinstance(node, dict) or not isinstance(node.get("e"), list):
            raise ProofError(f"MST node {_cid_str(node_cid)} is malformed")
        child, previous = node.get("l"), b""
        for entry in node["e"]:
            if not _entry_ok(entry):
                raise ProofError(f"MST node {_cid_str(node_cid)} has a malformed entry")
            full = previous[: entry["p"]] + entry["k"]
            previous = full
            if full == key:
                return entry["v"]
            if full > key:
                break
            child = entry.get("t")
        if child is not None and not isinstance(child, bytes):
            raise ProofError(f"MST node {_cid_str(node_cid)} links a subtree by something that is not a CID")
        node_cid = child
    return None


def _entry_ok(entry: Any) -> bool:
    """An MST entry: ``p`` a prefix length, ``k`` key bytes, ``v`` a CID, ``t`` a CID or null."""
    return (isinstance(entry, dict) and isinstance(entry.get("p"), int) and not isinstance(entry["p"], bool)
            and entry["p"] >= 0 and isinstance(entry.get("k"), bytes) and isinstance(entry.get("v"), bytes)
            and (entry.get("t") is None or isinstance(entry["t"], bytes)))


def signed_tree(body: dict[str, Any], key: SigningKey) -> tuple[dict[bytes, bytes], bytes]:
    """A commit frame's blocks and the root of its repo tree, once the commit's signature checks
    out against ``key``. ProofError if it does not; Incomplete if the frame carries no blocks."""
    if not body.get("blocks") or body.get("tooBig"):
        raise Incomplete("the frame carries no blocks (a tooBig commit)")
    car, commit_cid, did = body["blocks"], body.get("commit"), body.get("repo")
    if not isinstance(car, bytes) or not isinstance(commit_cid, bytes) or not isinstance(did, str):
        raise ProofError("the frame's blocks, commit or repo is not of the type a commit frame has (bytes, a CID, a DID)")
    blocks = read_car(car)
    commit = verify_commit(blocks, commit_cid, did, key)
    if not isinstance(commit.get("data"), bytes):
        raise ProofError(f"the commit of {did} names no repo tree (data)")
    return blocks, commit["data"]


def created_records(body: dict[str, Any], paths: list[tuple[str, bytes]], key: SigningKey) -> dict[str, Any]:
    """``{path: record}`` for the created ``(path, cid)`` pairs, each proven against the signed commit.

    Raises ProofError when anything fails to check out, Incomplete when a block is missing.
    """
    blocks, tree = signed_tree(body, key)
    records = {}
    for path, cid in paths:
        found = mst_lookup(blocks, tree, path)
        if found != cid:
            raise ProofError(f"{path} is not at {_cid_str(cid)} in the signed repo tree")
        records[path] = block(blocks, cid, record=True)
    return records


def deleted_paths(body: dict[str, Any], paths: list[str], key: SigningKey) -> None:
    """Prove that each of ``paths`` is absent from the tree of the signed commit (a delete the
    commit claims). Raises ProofError when a path is still there or the commit does not verify,
    Incomplete when a block is missing."""
    blocks, tree = signed_tree(body, key)
    for path in paths:
        if mst_lookup(blocks, tree, path) is not None:
            raise ProofError(f"{path} is still in the signed repo tree: not deleted")


def car_root(data: bytes) -> bytes:
    """The first root a CAR v1 file's header names (a ``sync.getRecord`` CAR: the signed commit)."""
    try:
        size, pos = _varint(data, 0)
        header = bounds.decode_dag_cbor(data[pos:pos + size], "the CAR header")
    except (IndexError, bounds.Malformed) as e:
        raise ProofError(f"the CAR header does not parse: {e}") from None
    roots = header.get("roots") if isinstance(header, dict) else None
    if not isinstance(roots, list) or not roots or not isinstance(roots[0], bytes):
        raise ProofError("the CAR header names no root")
    return roots[0]


def record_proof(blocks: dict[bytes, bytes], root: bytes, did: str, path: str, key: SigningKey) -> tuple[bytes, Any] | None:
    """``(cid, record)`` at ``path`` in ``did``'s repo, proven by the blocks of a
    ``com.atproto.sync.getRecord`` CAR and its ``root``: a commit of ``did`` signed by ``key``,
    under which the MST leads ``path`` to ``cid``, whose block is the record. None when the signed
    tree proves ``path`` absent. ProofError when anything fails to check out, a block the proof
    needs included: unlike a firehose frame, this CAR is the PDS's whole answer, so a missing
    block is no proof."""
    try:
        commit = verify_commit(blocks, root, did, key)
        if not isinstance(commit.get("data"), bytes):
            raise ProofError(f"the commit of {did} names no repo tree (data)")
        cid = mst_lookup(blocks, commit["data"], path)
        return None if cid is None else (cid, block(blocks, cid, record=True))
    except Incomplete as e:
        raise ProofError(f"the proof is incomplete: {e}") from None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ProofError("varint too long")


def _cid_end(data: bytes, pos: int) -> int:
    if data[pos] == 0x12 and data[pos + 1] == 0x20:  # CIDv0: a bare sha2-256 multihash
        return pos + 34
    _version, pos = _varint(data, pos)
    _codec, pos = _varint(data, pos)
    _hash, pos = _varint(data, pos)
    length, pos = _varint(data, pos)
    return pos + length


def _cid_str(cid: bytes) -> str:
    try:
        return libipld.encode_cid(cid)
    except ValueError:
        return cid.hex()
