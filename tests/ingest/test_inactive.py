"""The firehose's inactive accounts are bounded (at most ``atrund.ingest.inactive.LIMIT`` DIDs,
the oldest report dropped first) and kept in the state store, so a restart still knows them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import libipld

from atrund.access import AccessPolicy
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.ingest.inactive import InactiveAccounts
from atrund.state import State


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
        repos = Repos(Identities("http://127.0.0.1:9", timeout=1, allow_private_addresses=True))
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
