"""Reading a remote answer with a cap on its size: a hostile PDS, directory or did:web host can
send forever, so every body the AT client reads goes through here."""

from __future__ import annotations

import aiohttp

from atrund.errors import TooLarge


async def read_capped(resp: aiohttp.ClientResponse, max_bytes: int, what: str) -> bytes:
    """The body of ``resp``; TooLarge (naming ``what`` and the limit) past ``max_bytes``."""
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise TooLarge(f"{what} is larger than the limit of {max_bytes} bytes ({resp.content_length} bytes)")
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        buf += chunk
        if len(buf) > max_bytes:
            raise TooLarge(f"{what} is larger than the limit of {max_bytes} bytes")
    return bytes(buf)
