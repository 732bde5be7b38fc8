"""The state store's promises, on both backends (SQLite, and a real Postgres the tests start):
an invocation is stored with the cursor that carried it, ``running`` is committed before a run
starts (and survives the process being killed), a result enters the outbox once, in the
transaction that marks it done. Postgres's own parts follow: versioned migrations, replicas
taking over what a dead one left, result claims, reconnecting after the server
restarts, and ``atrund state migrate``."""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
import time

import pytest

from atrund import config
from atrund.app import open_state
from atrund.errors import ConfigError, StoreError
from atrund.state import Standing
from tests.conftest import ROOT, atrund

A, B, C = "at://did:plc:a/dev.atrun.invocation/1", "at://did:plc:a/dev.atrun.invocation/2", "at://did:plc:a/dev.atrun.invocation/3"


def _cfg(tmp_path, state_section: dict) -> config.Config:
    return config.parse({"runner": {"pds": "http://127.0.0.1:1", "identifier": "r.test"},
                         "state": {"dir": str(tmp_path / "state"), **state_section}})


@pytest.fixture
def open_store(tmp_path, state_section):
    """Open the store ``[state]`` names (the app's own choice), as often as a test needs: each
    opening is closed before the next (one runner at a time) and at teardown."""
    opened = []

    def make(close_only: bool = False):
        while opened:
            opened.pop().close()
        if not close_only:
            opened.append(open_state(_cfg(tmp_path, state_section)))
            return opened[-1]

    yield make
    make(close_only=True)


def test_a_page_is_stored_with_its_cursor_or_not_at_all(open_store):
    store = open_store()
    assert store.accept_page("poll:a", "c1", [(A, "did:plc:a", "cid1", {"n": 1}, "pending")]) == [A]
    with pytest.raises(TypeError):  # the second row cannot be stored: neither it, the first, nor the cursor is
        store.accept_page("poll:a", "c2", [(B, "did:plc:a", "cid2", {"n": 2}, "pending"),
                                           (C, "did:plc:a", "cid3", {"n": object()}, "pending")])
    assert store.cursor("poll:a") == "c1"
    assert store.status_of(B) is None and store.status_of(C) is None
    # seen again: not new; a reused key (another CID) while pending is reported; withdrawn in the same page
    reused = []
    assert store.accept_page("poll:a", "c3", [(A, "did:plc:a", "cidX", {"n": 1}, "pending"),
                                              (B, "did:plc:a", "cid2", {"n": 2}, "pending")], [B], reused) == []
    assert [r[0] for r in reused] == [A] and store.status_of(B) == ("withdrawn", None)
    store = open_store()  # what was committed is what the next opening reads
    assert store.cursor("poll:a") == "c3" and [s.uri for s in store.with_state("pending")] == [A]
    assert store.pending(A).value == {"n": 1}


def test_a_claim_is_committed_before_the_run_and_survives_a_kill(open_store, tmp_path, state_section):
    """A separate process opens the store, claims the invocation and is killed (SIGKILL) before
    it can close anything: the claim is there, so the next start records it as interrupted."""
    store = open_store()
    store.accept(A, "did:plc:a", "cid1", {"n": 1})
    open_store(close_only=True)
    script = textwrap.dedent(f"""
        import os, signal
        from atrund import config
        from atrund.app import open_state
        cfg = config.parse({{"runner": {{"pds": "http://127.0.0.1:1", "identifier": "r.test"}},
                            "state": {{"dir": {str(tmp_path / "state")!r}, **{state_section!r}}}}})
        store = open_state(cfg)
        assert store.mark_running({A!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    store = open_store()
    assert [s.uri for s in store.with_state("running")] == [A]
    assert not store.mark_running(A), "a running invocation is never claimed again"
    assert store.pending(A) is None


def test_a_result_enters_the_outbox_once_with_done(open_store):
    store = open_store()
    for uri in (A, B):
        store.accept(uri, "did:plc:a", "cid", {})
    assert store.mark_running(A) and not store.mark_running(A)
    assert store.finish(A, "success", "rk-a", {"status": "success"})
    assert not store.finish(A, "error", "rk-a", {"status": "error"}), "only the first result counts"
    assert store.finish(B, "rejected", "rk-b", None)  # no record asked for: done, nothing to write
    assert store.status_of(A) == ("done", "success") and store.status_of(B) == ("done", "rejected")
    due = store.due()
    assert [(o.invocation_uri, o.rkey, o.record) for o in due] == [(A, "rk-a", {"status": "success"})]
    assert store.counts() == {"done": 2, "unwritten": 1}
    assert store.outbox_figures()[0] == 1
    store.retry_later(A, "PDS down", 60)
    assert store.due() == [] and 59 < store.next_due_in() <= 60
    store.requeue_result(A, "rk-a", {"status": "success", "again": True})  # an operator's retry: due now, attempts reset
    (again,) = store.due()
    assert again.attempts == 0 and again.record["again"] is True
    store.written(A)
    assert store.due() == [] and store.next_due_in() is None and store.counts()["unwritten"] == 0
    store.unqueue_result(A)  # already written: stays
    assert store.outbox_figures() == (0, None)


def test_reused_keys_denials_schedules_and_inactive_accounts(open_store):
    store = open_store()
    store.accept(A, "did:plc:a", "cid1", {})
    assert store.refuse_reused(A, "cid2", {"v": 2}, "rejected", "rk", {"status": "rejected"})
    assert not store.refuse_reused(A, "cid3", {}, "rejected", "rk", {})
    store.accept(B, "did:plc:a", "cid", {})
    assert store.deny(B) and store.status_of(B) == ("denied", None)
    schedule = Standing("at://did:plc:a/dev.atrun.schedule/s", "did:plc:a", "scid", {"cron": "* * * * *"}, 10.0)
    store.keep_standing("schedule", schedule)
    assert store.add_ticks([(schedule, schedule.uri + "#1", {"t": 1}, 20.0)]) == [schedule.uri + "#1"]
    assert store.add_ticks([(schedule, schedule.uri + "#1", {"t": 1}, 30.0)]) == [], "a tick is stored once"
    assert store.standing("schedule")[0].next_at == 30.0
    store.move_schedule(schedule.uri, "scid", 40.0)
    store.accept(schedule.uri + "x", "did:plc:a", "c", {})  # not one of its runs: outside the key range
    assert store.drop_standing(schedule.uri) == 1 and store.standing("schedule") == []
    assert store.status_of(schedule.uri + "x") == ("pending", None)
    store.set_inactive("did:plc:x")
    store.set_inactive("did:plc:y")
    store.set_inactive("did:plc:z", evict=["did:plc:x"])
    assert store.inactive_accounts() == ["did:plc:y", "did:plc:z"]
    store.forget_inactive(["did:plc:y"])
    assert store.inactive_accounts() == ["did:plc:z"]
    store.forget_cursor("nothing")
    assert store.cursor("nothing") is None


def test_logs_are_kept_in_order_read_by_run_or_bundle_and_forgotten(open_store):
    from atrund.state import LogEntry

    store = open_store()
    store.keep_logs([LogEntry(f"{A}{n}", "at://b/bundle/1", None, "record", 100.0 + n, "success", output=f"out {n}")
                     for n in range(5)])
    newest = store.logs(bundle="at://b/bundle/1", limit=2)
    assert [e.output for e in newest] == ["out 3", "out 4"] and newest[0].seq < newest[1].seq
    assert [e.output for e in store.logs(bundle="at://b/bundle/1", after=newest[0].seq)] == ["out 4"]
    assert [e.id for e in store.logs(id=f"{A}2")] == [f"{A}2"]
    assert store.forget_logs(before=101.0, keep=3) == 2  # the oldest by time, then all but the newest 3
    assert [e.output for e in store.logs(bundle="at://b/bundle/1")] == ["out 2", "out 3", "out 4"]


def test_bundle_state_commits_with_the_outcome_in_code_point_order(open_store):
    from atrund.state import BundleWrites

    store = open_store()
    store.accept(A, "did:plc:a", "c", {})
    writes = BundleWrites("did:plc:a", "b1", {"b": '"2"', "a": '"1"', "\u00e9": '"3"', "z": None})
    assert store.finish(A, "success", "rk", {"status": "success"}, writes)
    assert not store.finish(A, "success", "rk", {}, BundleWrites("did:plc:a", "b1", {"a": '"no"'})), "only once"
    assert store.state_value("did:plc:a", "b1", "a") == '"1"'
    assert [k for k, _ in store.state_keys("did:plc:a", "b1")] == ["a", "b", "\u00e9"]
    assert [k for k, _ in store.state_keys("did:plc:a", "b1", after="a", limit=1)] == ["b"]
    assert store.state_usage("did:plc:a", "b1") == (3, 1 + 3 + 1 + 3 + 2 + 3)
    store.commit_bundle_state(BundleWrites("did:plc:a", "b1", {"a": '"again"', "b": None}))
    assert store.state_value("did:plc:a", "b1", "a") == '"again"' and store.state_value("did:plc:a", "b1", "b") is None
    assert store.drop_bundle_state("did:plc:a", "b1", ["a"]) == 1 and store.drop_bundle_state("did:plc:a", "b1") == 1


# -- Postgres's own ------------------------------------------------------------------------

def test_postgres_migrations_are_versioned_and_applied_once(pg_url):
    import psycopg

    from atrund.pgstate import LATEST, MIGRATIONS, PgState, migrate_url

    assert migrate_url(pg_url) == (0, LATEST)
    assert migrate_url(pg_url) == (LATEST, LATEST)
    with psycopg.connect(pg_url, autocommit=True) as db:
        assert [v for (v,) in db.execute("SELECT version FROM schema_migrations ORDER BY version")] == [v for v, _, _ in MIGRATIONS]
        # a version below the newest that this database lacks (they may land apart) is applied too
        db.execute("DELETE FROM schema_migrations WHERE version = 5")
        db.execute("DROP TABLE bundle_state")
    assert migrate_url(pg_url) == (LATEST, LATEST)
    with psycopg.connect(pg_url, autocommit=True) as db:
        assert db.execute("SELECT count(*) FROM bundle_state").fetchone() == (0,)
        db.execute("INSERT INTO schema_migrations(version, description) VALUES (%s, 'from the future')", (LATEST + 1,))
    with pytest.raises(StoreError, match="newer than this atrund knows"):
        PgState(pg_url)


def test_replicas_take_over_what_a_dead_replica_left_once(pg_url):
    """A replica killed (SIGKILL) with one invocation running and one pending: once its lease
    runs out, exactly one other replica adopts both (the running one to be recorded as
    interrupted, the pending one to be queued); before that, nobody touches them."""
    from atrund.pgstate import PgState

    script = textwrap.dedent(f"""
        import os, signal
        from atrund.pgstate import PgState
        store = PgState({pg_url!r})
        store.accept({A!r}, "did:plc:a", "c", {{}})
        store.accept({B!r}, "did:plc:a", "c", {{}})
        assert store.mark_running({A!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    one, two = PgState(pg_url, lease=1.5), PgState(pg_url, lease=1.5)
    try:
        assert one.take_over() == ([], []), "the dead replica's lease has not run out yet"
        time.sleep(1.6)
        one.heartbeat()
        two.heartbeat()  # (a running replica beats every HEARTBEAT seconds, well within its lease)
        running, pending = one.take_over()
        assert [s.uri for s in running] == [A] and [s.uri for s in pending] == [B]
        assert two.take_over() == ([], []) and one.take_over() == ([], []), "adopted once"
        assert one.finish(A, "error", "rk", {"status": "error"}) and not two.finish(A, "error", "rk", {"status": "error"})
        assert two.mark_running(B) and not one.mark_running(B)
        fleet = {r["replica"]: r for r in one.fleet()["replicas"]}
        assert set(fleet) == {one.replica, two.replica} and fleet[two.replica]["running"] == 1
        assert fleet[one.replica]["self"] and fleet[one.replica]["alive"]
        two.close()  # a clean stop leaves the fleet: what it held is taken at the next look, no lease to wait for
        assert [s.uri for s in one.take_over()[0]] == [B]
    finally:
        one.close()
        two.close()


def test_replicas_writing_results_never_take_the_same_one(pg_url):
    from atrund.pgstate import PgState

    one, two = PgState(pg_url), PgState(pg_url)
    try:
        for n in range(10):
            uri = f"{A}{n}"
            one.accept(uri, "did:plc:a", "c", {})
            one.finish(uri, "success", f"rk{n}", {"n": n})
        first, second = one.due(limit=6), two.due(limit=6)
        assert len(first) == 6 and len(second) == 4
        assert not {o.invocation_uri for o in first} & {o.invocation_uri for o in second}
        assert one.due() == [] and two.due() == [], "claimed while their writers write them"
        one.retry_later(first[0].invocation_uri, "PDS down", 0)
        assert [o.invocation_uri for o in two.due()] == [first[0].invocation_uri], "a failed write is due again for anyone"
    finally:
        one.close()
        two.close()


def test_replicas_share_used_tokens_the_access_policy_and_bundle_state_locks(pg_url):
    """Migration 6: a token's jti is used once across replicas (and forgotten after its time);
    the access policy an operator's command edits is what every replica reads; a namespace's
    lock is held by one run of the fleet, taken from a replica only when it is dead or past its
    time, and a commit of a run that lost it keeps nothing (StateConflict)."""
    import psycopg

    from atrund.access import StoredPolicy, policy_at
    from atrund.errors import StateConflict
    from atrund.pgstate import CLOCK_MARGIN, PgState
    from atrund.state import BundleWrites

    edits = policy_at(None, pg_url)
    assert edits.read().allow == frozenset() and edits.stamp() == 0, "a database not migrated yet has no entries"
    one, two = PgState(pg_url, lease=1.5), PgState(pg_url, lease=1.5)
    try:
        now = time.time()
        assert one.tokens_since() == two.tokens_since() <= now
        assert one.use_token("jti-1", now + 60) and not two.use_token("jti-1", now + 60) and not one.use_token("jti-1", now + 60)
        assert two.use_token("jti-old", now - CLOCK_MARGIN - 1)
        one._tokens_pruned = 0.0  # as TOKEN_PRUNE seconds later
        assert one.use_token("jti-2", now + 60)
        with psycopg.connect(pg_url, autocommit=True) as db:
            assert {j for (j,) in db.execute("SELECT jti FROM used_tokens")} == {"jti-1", "jti-2"}, "past its time: gone"

        seen = [StoredPolicy(one), StoredPolicy(two)]
        stamp = seen[0].stamp()
        edits.allow("did:plc:x")
        edits.deny("did:plc:y")
        assert seen[0].stamp() != stamp and seen[0].stamp() == seen[1].stamp()
        assert seen[1].read().allow == {"did:plc:x"} and seen[0].read().deny == {"did:plc:y"}
        edits.deny("did:plc:x")
        assert seen[1].read().allow == frozenset() and seen[1].read().deny == {"did:plc:x", "did:plc:y"}

        assert one.hold_namespace("did:plc:a", "b", "run-1", 60) and not two.hold_namespace("did:plc:a", "b", "run-2", 60)
        one.commit_bundle_state(BundleWrites("did:plc:a", "b", {"n": "1"}, "run-1"))  # the commit lets it go
        assert two.hold_namespace("did:plc:a", "b", "run-2", 0.2)
        assert not one.hold_namespace("did:plc:a", "b", "run-3", 60)
        time.sleep(0.3)
        assert one.hold_namespace("did:plc:a", "b", "run-3", 60), "held past its time: taken"
        with pytest.raises(StateConflict):
            two.commit_bundle_state(BundleWrites("did:plc:a", "b", {"n": "-1"}, "run-2"))
        assert one.state_keys("did:plc:a", "b") == [("n", "1")], "the run that lost its lock committed nothing"
        one.close()  # its replica gone: its lock is free for another
        assert two.hold_namespace("did:plc:a", "b", "run-4", 60)
        two.free_namespace("did:plc:a", "b", "run-4")
        assert two.hold_namespace("did:plc:a", "b", "run-5", 60)
    finally:
        one.close()
        two.close()


def test_a_new_author_goes_to_a_replica_hot_for_the_bundle_while_it_keeps_up(pg_url):
    """Migration 7: an author with nothing open is assigned to a live replica that said it holds
    hot workers for the invocation's bundle; an author with open work stays where it is; a hot
    replica whose oldest waiting invocation waited past AFFINITY_WAIT gets no preference (the
    least open work decides, as for a bundle nobody is hot for: migration 8)."""
    import psycopg

    from atrund.pgstate import AFFINITY_WAIT, PgState

    cold, hot = PgState(pg_url), PgState(pg_url)
    authors = [f"did:plc:author{n}" for n in range(16)]

    def invoke(author: str, cid: str, n: int) -> str:
        uri = f"at://{author}/dev.atrun.invocation/{cid}{n}"
        cold.accept(uri, author, "c", {"bundle": {"uri": "at://did:plc:b/dev.atrun.bundle/b", "cid": cid}})
        with psycopg.connect(pg_url, autocommit=True) as db:
            return db.execute("SELECT replica FROM invocations WHERE uri = %s", (uri,)).fetchone()[0]

    try:
        cold.heartbeat()
        hot.heartbeat(["bafyhot"])
        by_hash = {author: invoke(author, "bafycold", 0) for author in authors}
        assert collections.Counter(by_hash.values()) == {cold.replica: 8, hot.replica: 8}, \
            "a bundle nobody is hot for: the least open work spreads authors evenly"
        for author in authors:  # open work holds them where they were put, hot or not
            assert invoke(author, "bafyhot", 1) == by_hash[author]
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute("UPDATE invocations SET state = 'done'")
            assert [invoke(author, "bafyhot", 2) for author in authors] == [hot.replica] * 16, "nothing open: the hot one"
            db.execute("UPDATE invocations SET state = 'done'")
            db.execute("UPDATE invocations SET state = 'pending', seen_at = seen_at - %s WHERE uri = %s",
                       (AFFINITY_WAIT + 1, f"at://{authors[0]}/dev.atrun.invocation/bafyhot2"))  # one waits: it lags
        lagging = collections.Counter(invoke(author, "bafyhot", 3) for author in authors[1:])
        assert lagging == {cold.replica: 8, hot.replica: 7}, "the lagging hot replica is one like any other"
        hot.heartbeat([])  # told it holds none (runner.hot_affinity = false, or they idled out)
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute("UPDATE invocations SET state = 'done'")
        assert {author: invoke(author, "bafyhot", 4) for author in authors} == by_hash
    finally:
        cold.close()
        hot.close()


def test_an_author_with_nothing_open_goes_to_the_replica_with_the_least_open_work(pg_url):
    """Migration 8: with nothing hot, a new author goes to the live executing replica holding the
    fewest open invocations, ties broken by the hash of the author: 12 authors over 3 replicas
    split 4/4/4 (the bare hash of migration 3 gives uneven shares), a replica given a flood gets no
    new authors while the others hold less, and with nothing open anywhere the hash decides."""
    import psycopg

    from atrund.pgstate import PgState

    replicas = [PgState(pg_url) for _ in range(3)]
    feed = replicas[0]

    def invoke(author: str, n: int) -> str:
        uri = f"at://{author}/dev.atrun.invocation/k{n}"
        feed.accept(uri, author, "c", {"bundle": {"uri": "at://did:plc:b/dev.atrun.bundle/b", "cid": "bafycold"}})
        with psycopg.connect(pg_url, autocommit=True) as db:
            return db.execute("SELECT replica FROM invocations WHERE uri = %s", (uri,)).fetchone()[0]

    def finish_all() -> None:
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute("UPDATE invocations SET state = 'done'")

    try:
        for r in replicas:
            r.heartbeat()
        ids = sorted(r.replica for r in replicas)
        authors = [f"did:plc:even{n}" for n in range(12)]
        with psycopg.connect(pg_url, autocommit=True) as db:
            hashed = {a: ids[db.execute("SELECT (hashtext(%s) & 2147483647) %% 3", (a,)).fetchone()[0]] for a in authors}
        assert len(set(collections.Counter(hashed.values()).values())) > 1, "these authors' bare hash is uneven"
        shares = collections.Counter(invoke(a, 0) for a in authors)
        assert sorted(shares.values()) == [4, 4, 4], shares
        finish_all()
        assert {a: invoke(a, 1) for a in authors[:1]} == {authors[0]: hashed[authors[0]]}, "nothing open: the hash"
        flooded = hashed[authors[0]]
        assert {invoke(authors[0], n) for n in range(2, 12)} == {flooded}, "an author's work stays where it is open"
        newcomers = collections.Counter(invoke(f"did:plc:new{n}", 0) for n in range(6))
        assert flooded not in newcomers and sorted(newcomers.values()) == [3, 3], newcomers
        alone = {}
        for a in authors:
            finish_all()
            alone[a] = invoke(a, 20)
        assert alone == hashed, "nothing open anywhere: the hash"
    finally:
        for r in replicas:
            r.close()


def test_postgres_restarting_is_a_store_fault_that_heals(pg_url, postgres):
    from atrund.pgstate import PgState

    store = PgState(pg_url)
    try:
        store.accept(A, "did:plc:a", "cid", {})
        postgres.restart()
        with pytest.raises(StoreError):  # the connection died with the server: reported, not a crash
            store.mark_running(A)
        assert store.failing is not None
        assert store.mark_running(A), "the next call reconnects, and the claim was not made twice"
        assert store.failing is None and store.status_of(A) == ("running", None)
    finally:
        store.close()


def test_a_state_url_with_a_password_or_another_scheme_is_refused():
    base = {"runner": {"pds": "http://127.0.0.1:1", "identifier": "r.test"}}
    with pytest.raises(ConfigError, match="state.url.*password") as e:
        config.parse({**base, "state": {"url": "postgresql://u:hunter2@db/atrund"}})
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError, match="state.url.*password"):
        config.parse({**base, "state": {"url": "postgresql://db/atrund?password=hunter2"}})
    with pytest.raises(ConfigError, match="state.url.*not a postgresql:// URL"):
        config.parse({**base, "state": {"url": "mysql://db/atrund"}})
    assert config.parse({**base, "state": {"url": "postgresql:///atrund?host=/run/postgresql"}}).state.url
    with pytest.raises(ConfigError, match="access.policy_file: with state.url"):  # the policy is in the database then
        config.parse({**base, "state": {"url": "postgresql:///atrund"}, "access": {"policy_file": "/etc/atrund/access.json"}})


def test_state_migrate_command(pg_url, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[runner]\npds = "http://127.0.0.1:1"\nidentifier = "r.test"\n[state]\ndir = "{tmp_path}"\nurl = "{pg_url}"\n')
    first = atrund("state", "migrate", "-c", str(cfg))
    assert first.returncode == 0 and "migrated from version 0 to" in first.stderr, first.stderr
    again = atrund("state", "migrate", "-c", str(cfg))
    assert again.returncode == 0 and "already at version" in again.stderr, again.stderr
    down = cfg.read_text().replace(pg_url, pg_url.rsplit(":", 1)[0] + ":1/none")
    cfg.write_text(down)
    failed = atrund("state", "migrate", "-c", str(cfg))
    assert failed.returncode == StoreError.exit_code and "cannot migrate" in failed.stderr and "Traceback" not in failed.stderr
