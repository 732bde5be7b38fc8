"""Who is who: DID documents (did:plc through a configurable PLC directory, did:web) and the
PDS each DID lives on, cached for a while (an author who moves PDS is picked up after the TTL).
The caches are LRUs of ``cache_size`` entries (``[identity] cache_size``): callers choose the
DIDs and handles, so the runner's memory must not grow with them.

Documents are fetched here rather than by the SDK's resolver so that what a directory or a
did:web host sends is bounded: at most MAX_DOCUMENT_BYTES, nested at most bounds.MAX_DEPTH
levels; past either, resolution fails with an IdentityError that names the limit. The SDK
still validates the document.

Every connection is guarded (atrund.atproto.addresses) unless ``allow_private_addresses``: a
DID document, a did:web host or a redirect cannot lead the runner to a private address."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import aiohttp
from atproto_core.did_doc import DidDocument
from atproto_crypto.did import parse_did_key
from atproto_identity.did.resolvers.base_resolver import AsyncBaseResolver
from atproto_identity.did.resolvers.web_resolver import _DidWebResolverBase
from atproto_identity.exceptions import AtProtocolError

from atrund import bounds
from atrund.atproto import addresses
from atrund.atproto.http import read_capped
from atrund.atproto.lru import LRU
from atrund.errors import IdentityError, NotServed, TooLarge

HANDLE = re.compile(r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?")


NEGATIVE_SECONDS = 30  # how long a handle that did not resolve stays unresolved
MAX_DOCUMENT_BYTES = 64 * 1024  # a DID document is about a kilobyte; a hostile host could send forever
MAX_ANSWER_BYTES = 64 * 1024  # a resolveHandle answer is a DID in a small object
CACHE_SIZE = 10_000  # DID documents (and, separately, handles) kept: [identity] cache_size


class Identities:
    def __init__(self, plc_url: str, cache_seconds: int = 300, timeout: float = 10.0, cache_size: int = CACHE_SIZE, *,
                 allow_private_addresses: bool = False) -> None:
        self._plc_url = plc_url.rstrip("/")
        # Read by Repos too: one switch for every read of the runner ([identity] allow_private_addresses).
        self.allow_private_addresses = allow_private_addresses
        self._ttl = cache_seconds
        self.cache_size = cache_size
        self._cache: LRU[str, tuple[float, DidDocument]] = LRU(cache_size)
        self._handles: LRU[str, tuple[float, str | None, str | None]] = LRU(cache_size)  # handle -> (when, DID, or why not)
        self._timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def document(self, did: str, refresh: bool = False) -> DidDocument:
        hit = self._cache.get(did)
        if hit and not refresh and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        try:
            body = await self._fetch(did)
        except (aiohttp.ClientError, TimeoutError, AtProtocolError, ValueError) as e:
            if refused := addresses.translate(e, f"cannot resolve {did}"):
                raise refused from None
            raise IdentityError(f"cannot resolve {did}: {type(e).__name__}: {e}") from e
        if body is None:
            raise IdentityError(f"cannot resolve {did}: no DID document")
        doc = parse_document(did, body)
        self._cache.put(did, (time.monotonic(), doc))
        return doc

    async def _fetch(self, did: str) -> bytes | None:
        """The DID document's bytes (None: the directory does not know the DID), at most
        MAX_DOCUMENT_BYTES; IdentityError past that."""
        if did.startswith("did:plc:"):
            url = f"{self._plc_url}/{did}"
        elif did.startswith("did:web:"):
            url = _DidWebResolverBase._parse_web_did(did)
        else:
            raise IdentityError(f"cannot resolve {did}: only did:plc and did:web are supported")
        if self._http is None:
            self._http = addresses.http_session(self.allow_private_addresses, aiohttp.ClientTimeout(total=self._timeout))
        async with self._http.get(url, allow_redirects=False) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise IdentityError(f"cannot resolve {did}: HTTP {resp.status} from {url}")
            try:
                return await read_capped(resp, MAX_DOCUMENT_BYTES, "the DID document")
            except TooLarge as e:
                raise IdentityError(f"cannot resolve {did}: {e}") from None

    async def pds(self, did: str) -> str:
        """The URL of ``did``'s PDS; IdentityError if its document names none, or one that is not
        an http(s) URL (the SDK reads only a string with a scheme and a host as one)."""
        doc = await self.document(did)
        endpoint = doc.get_pds_endpoint()
        if not endpoint:
            raise IdentityError(f"{did} names no PDS (#atproto_pds service with an http(s) URL) in its DID document")
        return endpoint.rstrip("/")

    async def signing_key(self, did: str, refresh: bool = False) -> str:
        """The ``did:key`` of ``did``'s atproto signing key (its ``#atproto`` verification method),
        checked to be one: IdentityError if the document names none, or one that does not parse."""
        doc = await self.document(did, refresh=refresh)
        try:
            key = doc.get_did_key()  # None for a method of a type the SDK does not know
            if key is not None:
                parse_did_key(key)
        except (AtProtocolError, ValueError) as e:
            raise IdentityError(f"{did}'s DID document names a signing key that is not a valid did:key: {e}") from None
        if key is None:
            raise IdentityError(f"{did} publishes no atproto signing key (#atproto verification method) in its DID document")
        return key

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def did_for_handle(self, handle: str, via_pds: str, admit: Callable[[str], bool] | None = None) -> str:
        """The DID ``handle`` names: asked of a PDS (com.atproto.identity.resolveHandle, which
        resolves by DNS or HTTPS, or directly for its own accounts), then confirmed by the DID
        document naming the handle back; a handle only one side claims resolves to nothing.

        ``admit``: the access policy; a DID it refuses raises NotServed before its document is
        fetched (see atrund.atproto.serviceauth)."""
        handle = handle.lower()
        if not HANDLE.fullmatch(handle):
            raise IdentityError(f"{handle!r} is not a handle or a DID")
        hit = self._handles.get(handle)
        if hit is not None:
            at, did, error = hit
            if did is not None and time.monotonic() - at < self._ttl:
                if admit is not None and not admit(did):
                    raise NotServed(did)
                return did
            if error is not None and time.monotonic() - at < NEGATIVE_SECONDS:
                raise IdentityError(error)
        try:
            did = await self._resolve_handle(handle, via_pds, admit)
        except IdentityError as e:  # remembered for a while too: a web caller must not make us ask again and again
            self._handles.put(handle, (time.monotonic(), None, str(e)))
            raise
        self._handles.put(handle, (time.monotonic(), did, None))
        return did

    async def _resolve_handle(self, handle: str, via_pds: str, admit: Callable[[str], bool] | None) -> str:
        did = await resolve_handle(handle, via_pds, self._timeout, allow_private_addresses=self.allow_private_addresses)
        if admit is not None and not admit(did):
            raise NotServed(did)
        doc = await self.document(did)
        if (doc.get_handle() or "").lower() != handle:
            raise IdentityError(f"handle {handle} names {did}, but that DID document does not claim the handle back")
        return did

    def forget(self, did: str) -> None:
        self._cache.pop(did)


def parse_document(did: str, body: bytes) -> DidDocument:
    """``did``'s DID document from the bytes its directory or host sent; IdentityError naming what
    is wrong: not JSON, nested deeper than bounds.MAX_DEPTH (naming where), or not a DID
    document of ``did`` (the SDK's validation)."""
    try:
        value = bounds.loads(body, "the DID document")
    except bounds.Malformed as e:
        raise IdentityError(f"cannot resolve {did}: {e}") from None
    if not isinstance(value, dict):
        raise IdentityError(f"cannot resolve {did}: the DID document is not a JSON object")
    try:
        return AsyncBaseResolver.validate_did_doc(did, value)
    except (AtProtocolError, ValueError) as e:  # the SDK's own, and pydantic's ValidationError
        raise IdentityError(f"cannot resolve {did}: {type(e).__name__}: {e}") from None


async def resolve_handle(handle: str, pds: str, timeout: float = 10.0, *, allow_private_addresses: bool = False) -> str:
    """The DID a handle names, as ``pds`` resolves it (com.atproto.identity.resolveHandle; any PDS
    answers for any handle, and a local one also for its own ``.test`` handles)."""
    url = f"{pds.rstrip('/')}/xrpc/com.atproto.identity.resolveHandle"
    try:
        async with addresses.http_session(allow_private_addresses, aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(url, params={"handle": handle.removeprefix("@")}) as resp:
                raw = await read_capped(resp, MAX_ANSWER_BYTES, "the answer of resolveHandle")
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        if refused := addresses.translate(e, f"cannot resolve handle {handle} at {pds}"):
            raise refused from None
        raise IdentityError(f"cannot resolve handle {handle} at {pds}: {type(e).__name__}: {e}") from e
    except TooLarge as e:
        raise IdentityError(f"cannot resolve handle {handle} at {pds}: {e}") from None
    try:
        body = bounds.loads(raw, "the answer of resolveHandle")
    except bounds.Malformed as e:
        raise IdentityError(f"cannot resolve handle {handle} at {pds}: HTTP {resp.status}, {e}") from None
    did = body.get("did") if isinstance(body, dict) else None
    if resp.status != 200 or not isinstance(did, str) or not did.startswith("did:"):
        why = body.get("message") if isinstance(body, dict) else None
        raise IdentityError(f"cannot resolve handle {handle} at {pds}: {why or f'HTTP {resp.status}'}")
    return did
