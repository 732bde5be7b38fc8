"""The identity caches are bounded: LRUs of ``[identity] cache_size`` entries (DID documents and
handles), so no number of remote-chosen keys grows the runner's memory.

The DID directory here is a real HTTP server on loopback that answers a DID document for every
did:plc it is asked about, and counts what it is asked."""

from __future__ import annotations

import pytest
from aiohttp import web
from loopback import serve

from atrund import config
from atrund.atproto.identity import CACHE_SIZE, Identities
from atrund.atproto.lru import LRU
from atrund.config import ConfigError
from atrund.errors import IdentityError


class Directory:
    """A PLC directory on loopback: every did:plc has a document; ``asked`` lists the requests.
    Its resolveHandle refuses every handle (400), as a PDS does for one it cannot resolve."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def start(self) -> Directory:
        async def doc(request: web.Request) -> web.Response:
            did = request.match_info["did"]
            self.asked.append(did)
            return web.json_response({"id": did, "service": [
                {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "http://127.0.0.1:1"}]})

        async def resolve(request: web.Request) -> web.Response:
            self.asked.append(request.query["handle"])
            return web.json_response({"error": "InvalidRequest", "message": "Unable to resolve handle"}, status=400)

        app = web.Application()
        app.router.add_get("/xrpc/com.atproto.identity.resolveHandle", resolve)
        app.router.add_get("/{did}", doc)
        self._runner, self.url = await serve(app)
        return self


@pytest.fixture
async def directory():
    d = await Directory().start()
    yield d
    await d._runner.cleanup()


async def test_the_did_document_cache_holds_at_most_cache_size_and_drops_the_least_recently_used(directory):
    """With cache_size 3: five DIDs resolved leave three cached; the one used most recently
    before the overflow is still answered from the cache (no request), the oldest is asked again."""
    identities = Identities(directory.url, cache_size=3, allow_private_addresses=True)
    try:
        dids = [f"did:plc:cache{i}" for i in range(5)]
        for did in dids[:3]:
            await identities.document(did)
        await identities.document(dids[0])  # a hit: now the most recently used
        assert directory.asked == dids[:3]
        for did in dids[3:]:
            await identities.document(did)
        assert len(identities._cache) == 3
        assert dids[0] in identities._cache and dids[1] not in identities._cache and dids[2] not in identities._cache
        directory.asked.clear()
        await identities.document(dids[0])
        await identities.document(dids[1])
        assert directory.asked == [dids[1]]  # dids[0] from the cache; dids[1] had been dropped
    finally:
        await identities.close()


async def test_the_handle_cache_is_bounded_too(directory):
    """Handles that do not resolve are remembered (so a caller cannot make us ask again at once),
    but at most cache_size of them."""
    identities = Identities(directory.url, cache_size=2, allow_private_addresses=True)
    try:
        for i in range(5):
            with pytest.raises(IdentityError):
                await identities.did_for_handle(f"h{i}.test", directory.url)
        assert len(identities._handles) == 2
        directory.asked.clear()
        with pytest.raises(IdentityError):
            await identities.did_for_handle("h4.test", directory.url)  # remembered: not asked again
        assert directory.asked == []
    finally:
        await identities.close()


def test_an_lru_of_size_n_never_holds_more_than_n():
    cache: LRU[int, int] = LRU(100)
    for i in range(10_000):
        cache.put(i, i)
        cache.get(0)  # kept alive by use
        assert len(cache) <= 100
    assert 0 in cache and 9_999 in cache and 100 not in cache
    with pytest.raises(ValueError):
        LRU(0)


def test_identity_cache_size_is_configured_with_a_documented_default(tmp_path):
    """``[identity] cache_size``: 10000 unless set; below 1 is a ConfigError naming the key."""
    base = '[runner]\npds = "http://localhost:2583"\nidentifier = "runner.test"\n'
    path = tmp_path / "config.toml"
    path.write_text(base)
    assert config.load(path).identity.cache_size == CACHE_SIZE == 10_000
    path.write_text(base + "[identity]\ncache_size = 50\n")
    assert config.load(path).identity.cache_size == 50
    path.write_text(base + "[identity]\ncache_size = 0\n")
    with pytest.raises(ConfigError, match="identity.cache_size"):
        config.load(path)


# -- inactive accounts -------------------------------------------------------------------------------
