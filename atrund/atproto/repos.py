"""Reading other people's repos: records, record blocks and blobs, from the PDS their DID names.

Reads go over plain aiohttp rather than the SDK's client because they need what the SDK does
not offer: a hard cap on the bytes a remote PDS may send (a hostile PDS can stream forever),
and errors sorted into "not found" (final) versus "unreachable" (retry). Everything that
proves content (CID and CAR decoding) is the SDK's and libipld's.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import aiohttp
import libipld

from atrund import bounds
from atrund.atproto import addresses
from atrund.atproto.http import read_capped
from atrund.atproto.identity import Identities
from atrund.errors import ContentMismatch, NotFound, RemoteError, Unreachable

SHA2_256 = 0x12
DAG_CBOR = 0x71
RAW = 0x55
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

    async def get_verified_record(self, did: str, collection: str, rkey: str, cid: str) -> dict[str, Any]:
        """The record at ``cid``, proven by hashing its block from com.atproto.sync.getRecord.

        Raises NotFound if the repo no longer holds that version (the record was updated or
        deleted; a PDS keeps only the current one). The caller tells those apart. A record
        nested deeper than bounds.MAX_DEPTH comes back cut one level past the limit.
        """
        from atrund.atproto.proof import ProofError, read_car  # the one CAR reader; proof imports nothing of ours

        body, _ = await self._get(
            did, "com.atproto.sync.getRecord", {"did": did, "collection": collection, "rkey": rkey}, max_bytes=4 * 1024 * 1024
        )
        where = f"sync.getRecord for at://{did}/{collection}/{rkey}"
        try:
            # Blocks are read raw and only the record's is decoded: a CAR's other blocks (the
            # proof) are not ours to decode, and its header says nothing we need.
            blocks = read_car(body)
            wanted = libipld.decode_multibase(cid)[1] if cid.startswith("b") else None
        except (ProofError, ValueError) as e:
            raise RemoteError(f"{where}: not a CAR file: {e}") from None
        raw = blocks.get(wanted) if wanted is not None else None
        if raw is None:
            raise NotFound(f"at://{did}/{collection}/{rkey} is no longer at CID {cid}")
        verify_cid(cid, raw, DAG_CBOR)
        try:
            block = bounds.decode_dag_cbor(raw, f"the record at {cid}", cut=True)
        except bounds.Malformed as e:
            raise RemoteError(f"{where}: {e}") from None
        if not isinstance(block, dict):
            raise RemoteError(f"{where}: the record at {cid} is not an object")
        return to_json_model(block)

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
