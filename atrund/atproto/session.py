"""A logged-in account (the runner's, or an author's in the CLI): the one place that writes.

Writes go through the atproto SDK, which handles login, token refresh and blob upload. Its
exceptions are translated here, once: a 4xx means the PDS refused this write for good
(``Rejected``), anything else (network, 5xx, rate limit) is worth retrying (``Unreachable``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
from atproto import AsyncClient
from atproto_client.exceptions import AtProtocolError, RequestErrorBase, UnauthorizedError

from atrund.errors import LoginFailed, Rejected, RemoteError, Unreachable


RETRYABLE_STATUS = {408, 425, 429}


def _translate(what: str, e: Exception) -> RemoteError:
    status = e.response.status_code if isinstance(e, RequestErrorBase) and e.response is not None else None
    detail = str(e) or type(e).__name__
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
        client = AsyncClient(base_url=pds.rstrip("/") + "/xrpc")
        async with _sdk(f"login to {pds} as {identifier}"):
            await client.login(identifier, password, fetch_bsky_profile=False)
            me = await client.com.atproto.server.get_session()
        return cls(client, me.did, me.handle, pds.rstrip("/"))

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
