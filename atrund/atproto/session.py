"""A logged-in account (the runner's, or an author's in the CLI): the one place that writes.

Writes go through the atproto SDK, which handles login, token refresh and blob upload. Its
exceptions are translated here, once: a 4xx means the PDS refused this write for good
(``Rejected``), anything else (network, 5xx, rate limit) is worth retrying (``Unreachable``).
A 2xx answer of the wrong shape (not JSON, missing or mistyped fields) is a plain RemoteError:
retried like any remote failure, and never taken for a fault of what was sent.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
from atproto import AsyncClient
from atproto_client.exceptions import AtProtocolError, ModelError, RequestErrorBase, UnauthorizedError
from atproto_client.request import AsyncRequest, Response

from atrund import bounds
from atrund.errors import LoginFailed, Rejected, RemoteError, Unreachable

RETRYABLE_STATUS = {408, 425, 429}


class _BadAnswer(AtProtocolError):
    """The PDS answered 2xx with a body that is not what it says it is (translated below)."""


class _Request(AsyncRequest):
    """The SDK's HTTP transport, reading a successful answer itself: the SDK would let an answer
    that says it is JSON and is not (or nests past bounds.MAX_DEPTH) out as a ValueError, which
    callers cannot tell from a record of ours that cannot be serialized."""

    async def get(self, *args: Any, **kwargs: Any) -> Response:
        return _answer(await self._send_request("GET", *args, **kwargs))

    async def post(self, *args: Any, **kwargs: Any) -> Response:
        return _answer(await self._send_request("POST", *args, **kwargs))


def _answer(response: httpx.Response) -> Response:
    content: Any = response.content
    if "application/json" in response.headers.get("content-type", "").lower():
        try:
            content = bounds.loads(content, "the answer")
        except bounds.Malformed as e:
            raise _BadAnswer(str(e)) from None
    return Response(success=True, status_code=response.status_code, content=content,
                    headers={k.lower(): v for k, v in response.headers.items()})


def _translate(what: str, e: Exception) -> RemoteError:
    status = e.response.status_code if isinstance(e, RequestErrorBase) and e.response is not None else None
    detail = str(e) or type(e).__name__
    if isinstance(e, (_BadAnswer, ModelError)):  # answered, but not with what the protocol says: maybe a proxy's page
        return RemoteError(f"{what}: the PDS answered with something other than the protocol's answer: {detail[:500]}")
    if isinstance(e, UnauthorizedError):
        return LoginFailed(f"{what}: not authorized: {detail}")
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_STATUS:
        return Rejected(f"{what}: {detail}")
    return Unreachable(f"{what}: {detail}")


@contextlib.asynccontextmanager
async def _sdk(what: str):
    try:
        yield
    except AtProtocolError as e:
        raise _translate(what, e) from e
    except (OSError, httpx.HTTPError) as e:
        # The SDK wraps only some of httpx's errors (timeouts, NetworkError): a dropped keep-alive
        # connection (RemoteProtocolError) and the like come through as they are, and are network
        # failures all the same, worth retrying, never a verdict on what was sent.
        raise Unreachable(f"{what}: {type(e).__name__}: {e}") from e


class Session:
    def __init__(self, client: AsyncClient, did: str, handle: str, pds: str) -> None:
        self.client = client
        self.did = did
        self.handle = handle
        self.pds = pds

    @classmethod
    async def login(cls, pds: str, identifier: str, password: str) -> "Session":
        client = AsyncClient(base_url=pds.rstrip("/") + "/xrpc", request=_Request())
        try:
            async with _sdk(f"login to {pds} as {identifier}"):
                await client.login(identifier, password, fetch_bsky_profile=False)
                me = await client.com.atproto.server.get_session()
        except BaseException:
            await client.request.close()  # its connection: nobody else holds the client
            raise
        return cls(client, me.did, me.handle, pds.rstrip("/"))

    @classmethod
    async def resume(cls, pds: str, kept: str) -> "Session":
        """The session ``kept`` (``export``'s string) on ``pds``, checked with the PDS (its access
        token refreshed if it expired). The refresh token rotates: whoever keeps the string must
        keep the new one (``client.on_session_change``)."""
        client = AsyncClient(base_url=pds.rstrip("/") + "/xrpc", request=_Request())
        try:
            async with _sdk(f"resume the session kept for {pds}"):
                await client.login(session_string=kept, fetch_bsky_profile=False)
                me = await client.com.atproto.server.get_session()
        except BaseException:
            await client.request.close()
            raise
        return cls(client, me.did, me.handle, pds.rstrip("/"))

    def export(self) -> str:
        """This session (its tokens) as a string ``resume`` takes: a secret, keep it mode 0600."""
        return self.client.export_session_string()

    async def close(self) -> None:
        await self.client.request.close()

    async def put_record(self, collection: str, rkey: str, record: dict[str, Any]) -> tuple[str, str]:
        async with _sdk(f"putRecord {collection}/{rkey}"):
            out = await self.client.com.atproto.repo.put_record(
                {"repo": self.did, "collection": collection, "rkey": rkey, "record": {"$type": collection, **record}}
            )
        return out.uri, out.cid

    async def create_record(self, collection: str, record: dict[str, Any]) -> tuple[str, str]:
        async with _sdk(f"createRecord {collection}"):
            out = await self.client.com.atproto.repo.create_record(
                {"repo": self.did, "collection": collection, "record": {"$type": collection, **record}}
            )
        return out.uri, out.cid

    async def apply_creates(self, collection: str, records: list[tuple[str, dict[str, Any]]]) -> None:
        """Create several records (rkey, record) in one commit; all or nothing."""
        writes = [{"$type": "com.atproto.repo.applyWrites#create", "collection": collection, "rkey": rkey,
                   "value": {"$type": collection, **record}} for rkey, record in records]
        async with _sdk(f"applyWrites {len(writes)} x {collection}"):
            await self.client.com.atproto.repo.apply_writes({"repo": self.did, "writes": writes})

    async def delete_record(self, collection: str, rkey: str) -> None:
        async with _sdk(f"deleteRecord {collection}/{rkey}"):
            await self.client.com.atproto.repo.delete_record({"repo": self.did, "collection": collection, "rkey": rkey})

    async def upload_blob(self, data: bytes, mime_type: str) -> dict[str, Any]:
        """Upload and return the blob reference as a record holds it."""
        async with _sdk("uploadBlob"):
            out = await self.client.com.atproto.repo.upload_blob(data, headers={"Content-Type": mime_type})
        return {"$type": "blob", "ref": {"$link": out.blob.cid.encode()}, "mimeType": out.blob.mime_type, "size": out.blob.size}

    async def service_token(self, audience: str, method: str) -> str:
        """A service-auth JWT from this account's PDS for calling ``method`` on ``audience`` (a DID)."""
        async with _sdk(f"getServiceAuth for {method} on {audience}"):
            out = await self.client.com.atproto.server.get_service_auth({"aud": audience, "lxm": method})
        return out.token
