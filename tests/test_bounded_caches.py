"""Every cache of remote-chosen keys is bounded: the identity caches are LRUs of
``[identity] cache_size`` entries, and the firehose's inactive accounts are at most
``atrund.ingest.inactive.LIMIT`` DIDs, kept in the state store so a restart still knows them.

The DID directory here is a real HTTP server on loopback that answers a DID document for every
did:plc it is asked about, and counts what it is asked."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import libipld
import pytest
from aiohttp import web
from loopback import serve

from atrund import config
from atrund.access import AccessPolicy
from atrund.atproto.identity import CACHE_SIZE, Identities
from atrund.atproto.lru import LRU
from atrund.atproto.repos import Repos
from atrund.config import ConfigError
from atrund.errors import IdentityError
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.ingest.inactive import InactiveAccounts
from atrund.state import State


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
    identities = Identities(directory.url, cache_size=3)
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
    identities = Identities(directory.url, cache_size=2)
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

def test_inactive_accounts_are_bounded_dropping_the_oldest_report(tmp_path):
    """Limit 3, five reports: the three newest are kept, in memory and in the store; a DID
    reported again counts as new; one reported active again is gone from both."""
    state = State(tmp_path / "s" / "atrund.db")
    try:
        inactive = InactiveAccounts(state, limit=3)
        for i in range(4):
            inactive.add(f"did:plc:a{i}")
        inactive.add("did:plc:a1")  # reported again: now the newest
        inactive.add("did:plc:a4")
        assert len(inactive) == 3 and inactive.evicted == 2
        assert [d for d in (f"did:plc:a{i}" for i in range(5)) if d in inactive] == ["did:plc:a1", "did:plc:a3", "did:plc:a4"]
        assert state.inactive_accounts() == ["did:plc:a3", "did:plc:a1", "did:plc:a4"]  # oldest report first
        inactive.discard("did:plc:a3")
        inactive.discard("did:plc:never")  # not there: nothing to do
        assert "did:plc:a3" not in inactive and state.inactive_accounts() == ["did:plc:a1", "did:plc:a4"]
    finally:
        state.close()


def _account_frame(seq: int, did: str, active: bool) -> bytes:
    return libipld.encode_dag_cbor({"op": 1, "t": "#account"}) + libipld.encode_dag_cbor(
        {"seq": seq, "did": did, "active": active, **({} if active else {"status": "takendown"})})


async def test_an_account_reported_inactive_stays_inactive_across_a_restart(tmp_path):
    """A real Firehose processes an #account active=false frame; the state store is closed (the
    runner stops) and opened again: the new Intake knows the author is inactive, and refuses
    their invocations, until an active=true frame (processed after the restart) clears it."""
    path = tmp_path / "s" / "atrund.db"
    did, runner = "did:plc:takendown", "did:plc:runner"
    policy = AccessPolicy("allowlist", frozenset({did}), frozenset())
    invocation = f"at://{did}/dev.atrun.invocation/3lfoo"

    async def run(frames: list[bytes]) -> tuple[bool, str | None]:
        state = State(path)
        repos = Repos(Identities("http://127.0.0.1:9", timeout=1))
        try:
            intake = Intake(state, runner, policy, lambda uri: None)
            known = did in intake.inactive
            await Firehose("ws://127.0.0.1:9", repos, intake).ingest(frames)
            return known, intake.verdict(invocation, {"runner": runner})
        finally:
            await repos.close()
            state.close()

    assert await run([_account_frame(1, did, False)]) == (False, None)  # not known before; refused after
    assert await run([]) == (True, None)  # restarted: still known, still refused
    assert await run([_account_frame(2, did, True)]) == (True, "pending")
    assert await run([]) == (False, "pending")


def test_an_existing_database_gets_the_inactive_table_on_open(tmp_path):
    """A state file from before the table existed (the tables the runner made then) is opened
    as usual, keeps what it held, and stores inactive accounts from then on."""
    path = tmp_path / "s" / "atrund.db"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE cursors (source TEXT PRIMARY KEY, cursor TEXT NOT NULL);"
                     "INSERT INTO cursors VALUES ('poll:did:plc:x', '3lold');")
    db.commit()
    db.close()
    state = State(path)
    try:
        assert state.cursor("poll:did:plc:x") == "3lold"
        assert state.inactive_accounts() == []
        InactiveAccounts(state).add("did:plc:x")
        assert state.inactive_accounts() == ["did:plc:x"]
    finally:
        state.close()
    state = State(path)
    try:
        assert InactiveAccounts(state, limit=5).__contains__("did:plc:x")
    finally:
        state.close()


def test_a_smaller_limit_than_the_store_holds_forgets_the_oldest_at_start(tmp_path):
    state = State(Path(tmp_path) / "s" / "atrund.db")
    try:
        big = InactiveAccounts(state, limit=10)
        for i in range(6):
            big.add(f"did:plc:b{i}")
        small = InactiveAccounts(state, limit=2)
        assert len(small) == 2 and "did:plc:b5" in small and "did:plc:b4" in small
        assert state.inactive_accounts() == ["did:plc:b4", "did:plc:b5"]
    finally:
        state.close()
