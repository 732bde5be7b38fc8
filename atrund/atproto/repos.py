"""Reading other people's repos: records, record blocks and blobs, from the PDS their DID names.

Reads go over plain aiohttp rather than the SDK's client because they need what the SDK does
not offer: a hard cap on the bytes a remote PDS may send (a hostile PDS can stream forever),
and errors sorted into "not found" (final) versus "unreachable" (retry). Everything that
proves content (CID and CAR decoding) is the SDK's and libipld's.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import libipld

from atrund import bounds
from atrund.atproto import addresses
from atrund.atproto.http import read_capped
from atrund.atproto.identity import Identities
from atrund.atproto.lru import LRU
from atrund.errors import ContentMismatch, NotFound, RemoteError, Unreachable

SHA2_256 = 0x12
DAG_CBOR = 0x71
RAW = 0x55
if TYPE_CHECKING:
    from atrund.atproto.proof import SigningKey

T = TypeVar("T")
NOT_FOUND_ERRORS = {"RecordNotFound", "RepoNotFound", "BlobNotFound", "NotFound", "RepoDeactivated", "RepoTakendown"}


def cid_of(data: bytes, codec: int = RAW) -> str:
    """The CIDv1 (sha2-256, base32) of ``data``: what a PDS names a blob of these bytes."""
    return libipld.encode_cid(bytes([1, codec, SHA2_256, 32]) + hashlib.sha256(data).digest())


def verify_cid(cid: str, data: bytes, codec: int) -> None:
    """Raise RemoteError unless ``data`` hashes to ``cid`` (sha2-256, given codec)."""
    try:
        parsed = libipld.decode_cid(cid)
    except ValueError as e:
        raise RemoteError(f"{cid!r} is not a CID: {e}") from e
    if parsed["hash"]["code"] != SHA2_256 or parsed["codec"] != codec:
        raise RemoteError(f"CID {cid} uses an unsupported codec or hash (codec {parsed['codec']:#x}, hash {parsed['hash']['code']:#x})")
    if hashlib.sha256(data).digest() != parsed["hash"]["digest"]:
        raise ContentMismatch(f"content does not hash to its CID {cid}")


def to_json_model(value: Any) -> Any:
    """DAG-CBOR as libipld decodes it (links and bytes as ``bytes``) to the JSON form of records.

    Without recursion (an explicit stack), so no depth of record can make it fail."""

    def convert(v: Any) -> Any:
        if isinstance(v, bytes):
            try:
                return {"$link": libipld.encode_cid(v)}
            except ValueError:
                return {"$bytes": base64.b64encode(v).decode().rstrip("=")}
        return v

    def copy(v: Any) -> Any:
        if isinstance(v, dict):
            out: Any = dict(v)
        elif isinstance(v, list):
            out = list(v)
        else:
            return convert(v)
        stack.append(out)
        return out

    stack: list[Any] = []
    root = copy(value)
    while stack:
        node = stack.pop()
        for key in node.keys() if isinstance(node, dict) else range(len(node)):
            node[key] = copy(node[key])
    return root


class Repos:
    def __init__(self, identities: Identities, timeout: float = 15.0) -> None:
        self.identities = identities
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
        self._http: aiohttp.ClientSession | None = None
        self._keys: LRU[str, SigningKey] = LRU(identities.cache_size)  # authors' signing keys, parsed once

    async def close(self) -> None:
        """Close the HTTP session and the identity resolver it uses."""
        if self._http is not None:
            await self._http.close()
        await self.identities.close()

    async def _get(self, did: str, method: str, params: dict[str, Any], max_bytes: int) -> tuple[bytes, str]:
        """One XRPC query against ``did``'s PDS; returns (body, content type)."""
        if self._http is None:
            self._http = addresses.http_session(self.identities.allow_private_addresses, self._timeout)
        base = await self.identities.pds(did)
        url = f"{base}/xrpc/{method}"
        query = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items() if v is not None}
        try:
            async with self._http.get(url, params=query) as resp:
                body = await read_capped(resp, max_bytes, f"{method} from {base}")
                if resp.status >= 500:
                    raise Unreachable(f"{method} at {base}: HTTP {resp.status}")
                if resp.status >= 400:
                    raise _xrpc_error(method, base, resp.status, body)
                return body, resp.headers.get("Content-Type", "")
        except aiohttp.ClientError as e:
            if refused := addresses.translate(e, f"{method} at {base}"):  # final: the DID document names a private address
                raise refused from None
            raise Unreachable(f"{method} at {base}: {type(e).__name__}: {e}") from e
        except TimeoutError as e:
            raise Unreachable(f"{method} at {base}: timed out") from e

    async def _get_json(self, did: str, method: str, params: dict[str, Any], levels_above: int) -> dict[str, Any]:
        """The JSON answer of ``method``. Its records sit ``levels_above`` levels down in it; a
        record that nests deeper than bounds.MAX_DEPTH comes back cut one level past the limit
        (bounds.loads ``cut``), so the answer's other records are read as usual and the deep one
        is refused by whoever validates it, naming where."""
        body, _ = await self._get(did, method, params, max_bytes=8 * 1024 * 1024)
        try:
            out = bounds.loads(body, f"the answer of {method}", bounds.MAX_DEPTH + levels_above, cut=True)
        except bounds.Malformed as e:
            raise RemoteError(f"{method}: the PDS answered with invalid JSON: {e}") from None
        if not isinstance(out, dict):
            raise RemoteError(f"{method}: the PDS answered with JSON that is not an object")
        return out

    async def list_records(
        self, did: str, collection: str, cursor: str | None = None, limit: int = 100, newest_first: bool = False
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of records, oldest first (or newest first), after ``cursor`` (a record key)."""
        out = await self._get_json(
            did, "com.atproto.repo.listRecords",
            {"repo": did, "collection": collection, "limit": limit, "reverse": not newest_first, "cursor": cursor},
            levels_above=3,  # {"records": [{"value": RECORD}]}
        )
        records, next_cursor = out.get("records", []), out.get("cursor")
        if not isinstance(records, list):
            raise RemoteError("com.atproto.repo.listRecords: the PDS answered without a list of records")
        return records, next_cursor if isinstance(next_cursor, str) else None

    async def get_record(self, did: str, collection: str, rkey: str) -> tuple[str, dict[str, Any]]:
        out = await self._get_json(did, "com.atproto.repo.getRecord", {"repo": did, "collection": collection, "rkey": rkey},
                                   levels_above=1)  # {"value": RECORD}
        cid, value = out.get("cid"), out.get("value")
        if not isinstance(cid, str) or not isinstance(value, dict):
            raise RemoteError(f"com.atproto.repo.getRecord for at://{did}/{collection}/{rkey}: the PDS answered without "
                              "a cid and a record")
        return cid, value

    async def get_proven_record(self, did: str, collection: str, rkey: str) -> tuple[str, dict[str, Any]]:
        """``(cid, record)`` as ``did``'s signed repo holds it now, proven from
        com.atproto.sync.getRecord's CAR exactly as a firehose frame is (atrund.atproto.proof):
        the commit's signature against ``did``'s signing key, the MST path, the block hashes.

        NotFound if the signed tree proves the record absent; ProofError if the answer does not
        prove what it claims (after one retry with a fresh DID document: a key rotation not seen
        yet looks like a bad signature). A record nested deeper than bounds.MAX_DEPTH comes
        back cut one level past the limit.
        """
        from atrund.atproto.proof import ProofError, car_root, read_car, record_proof  # the one CAR reader and prover

        body, _ = await self._get(
            did, "com.atproto.sync.getRecord", {"did": did, "collection": collection, "rkey": rkey}, max_bytes=4 * 1024 * 1024
        )
        path = f"{collection}/{rkey}"
        try:
            blocks, root = read_car(body), car_root(body)
        except ProofError as e:  # not even a CAR: a broken answer (a proxy's page), not a false proof
            raise RemoteError(f"sync.getRecord for at://{did}/{path}: not a CAR file: {e}") from None
        proven = await self.proving(did, lambda key: record_proof(blocks, root, did, path, key))
        if proven is None:
            raise NotFound(f"at://{did}/{path} is not in {did}'s signed repo")
        cid, value = proven
        if not isinstance(value, dict):
            raise RemoteError(f"sync.getRecord for at://{did}/{path}: the record at {libipld.encode_cid(cid)} is not an object")
        return libipld.encode_cid(cid), to_json_model(value)

    async def get_verified_record(self, did: str, collection: str, rkey: str, cid: str) -> dict[str, Any]:
        """The record at ``cid``, proven by get_proven_record to be what ``did``'s signed repo holds.

        Raises NotFound if the repo no longer holds that version (the record was updated or
        deleted; a PDS keeps only the current one). The caller tells those apart.
        """
        current, value = await self.get_proven_record(did, collection, rkey)
        if current != cid:
            raise NotFound(f"at://{did}/{collection}/{rkey} is no longer at CID {cid}")
        return value

    async def signing_key(self, did: str) -> SigningKey:
        """``did``'s signing key, parsed once and kept (an LRU as large as the identity caches)."""
        from atrund.atproto.proof import SigningKey

        key = self._keys.get(did)
        if key is None:
            key = SigningKey(await self.identities.signing_key(did))
            self._keys.put(did, key)
        return key

    async def proving(self, did: str, check: Callable[[SigningKey], T]) -> T:
        """``check(key)`` with ``did``'s signing key; on a ProofError, once more with a fresh DID
        document before the proof is called false (the author may have rotated the key)."""
        from atrund.atproto.proof import ProofError

        try:
            return check(await self.signing_key(did))
        except ProofError:
            self.forget(did)
            return check(await self.signing_key(did))

    def forget(self, did: str) -> None:
        """Drop ``did``'s DID document and signing key: the next read fetches them again."""
        self._keys.pop(did)
        self.identities.forget(did)

    async def get_blob(self, did: str, cid: str, max_bytes: int) -> bytes:
        """The blob's bytes, refused unless they hash to ``cid`` and fit in ``max_bytes``."""
        body, _ = await self._get(did, "com.atproto.sync.getBlob", {"did": did, "cid": cid}, max_bytes=max_bytes)
        verify_cid(cid, body, RAW)
        return body


def _xrpc_error(method: str, base: str, status: int, body: bytes) -> RemoteError:
    try:
        err = bounds.loads(body, "an error answer")
        name, message = str(err.get("error", "")), str(err.get("message", ""))
    except (bounds.Malformed, AttributeError):
        name, message = "", body[:200].decode("utf-8", "replace")
    text = f"{method} at {base}: {name or f'HTTP {status}'}" + (f": {message}" if message else "")
    if name in NOT_FOUND_ERRORS or status == 404:
        return NotFound(text)
    return RemoteError(text)
