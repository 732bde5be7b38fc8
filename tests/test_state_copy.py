"""Moving a runner from SQLite to Postgres (`atrund state copy`, atrund.pgcopy): a real SQLite
runner leaves done and pending invocations, results, bundle state, a schedule and policy edits;
its state is copied into a new database and two Postgres replicas carry on. What waited runs
exactly once, what was done is not run again, and the bundle's state reads back the same."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import psycopg
from conftest import atrund, serve_config, serve_subprocess, wait_result
from test_replicas import _stop
from test_schedules import iso

from atrund import client
from atrund.errors import CopyRefused, StateLocked, StateMoved, StoreError
from atrund.pgcopy import TABLES
from atrund.pgstate import LATEST
from atrund.state import State

# Each run appends its key to RUNS (one line per execution), counts itself in its bundle's state
# and keeps its key there, then sleeps: the count carries across the move or the test fails.
COUNTING = """import time
def main(args, ctx):
    with open({runs!r}, 'a') as f:
        f.write(args['k'] + '\\n')
    n = (ctx.state.get('n') or 0) + 1
    print('run', n)
    ctx.state.set('n', n)
    ctx.state.set('ran-' + args['k'], n)
    time.sleep(args['ms'] / 1000)
    return {{'k': args['k'], 'n': n}}
"""


def test_every_table_of_the_sqlite_store_is_copied(tmp_path):
    """A table added to atrund.state must be added to atrund.pgcopy.TABLES (or the copy refuses it)."""
    store = State(tmp_path / "atrund.sqlite3")
    try:
        tables = {name for (name,) in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                                        "AND name NOT LIKE 'sqlite_%'")}
    finally:
        store.close()
    assert tables == set(TABLES)


def _rows(db_path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(db_path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()  # not only the transaction: an open reader would keep the copy from locking the file


async def _lines_until(path: Path, count: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < count:
        assert time.monotonic() < deadline, f"{path} has fewer than {count} lines after {timeout} s"
        await asyncio.sleep(0.05)
    return path.read_text().splitlines()


async def test_a_sqlite_runner_copied_into_postgres_runs_what_waited_once_and_nothing_again(
        stack, new_account, author, reader, tmp_path, pg_url, postgres):
    runner = new_account("mover")
    runs = tmp_path / "runs.txt"
    bundle = await author.publish(COUNTING.format(runs=str(runs)))
    rkey = bundle["uri"].rsplit("/", 1)[1]
    home = tmp_path / "sqlite"
    home.mkdir()
    cfg = serve_config(home, stack, runner, author)
    db_path = home / "atrund-state" / "atrund.sqlite3"  # the default state.dir, beside the configuration
    sqlite_runner = serve_subprocess(cfg, home / "serve.log")
    try:
        # a schedule addressed to the runner (an hour away: it is copied, not run), ingested with
        # the invocation below at the latest
        schedule, _ = await client.create_schedule(author.session, author.repos, bundle["uri"], runner.did, "main",
                                                   cid=bundle["cid"], interval_seconds=3600, start_at=iso(time.time() + 3600),
                                                   args={"k": "tick", "ms": 0})
        # done: one run, its result on the PDS
        done = (await client.invoke_many(author.session, bundle, runner.did, "main", [{"k": "done", "ms": 0}]))[0]
        assert (await wait_result(reader, runner.did, done, timeout=60))["status"] == "success"
        # one author, one at a time: w0 runs (3 s) while w1..w3 wait; the runner stops meanwhile
        keys = ["w0", "w1", "w2", "w3"]
        waiting = dict(zip(keys, await client.invoke_many(author.session, bundle, runner.did, "main",
                                                          [{"k": k, "ms": 3000} for k in keys]), strict=True))
        assert (await _lines_until(runs, 2))[-1] == "w0"
        running = atrund("state", "copy", "-c", str(cfg), "--to", pg_url)
        assert running.returncode == StateLocked.exit_code and "stop it" in running.stderr, running.stderr
        assert "Traceback" not in running.stderr
        assert atrund("access", "deny", "-c", str(cfg), "did:plc:blockedblockedblocked1").returncode == 0
    finally:
        _stop([sqlite_runner])
    states = dict(_rows(db_path, "SELECT value, state FROM invocations"))
    pending = {json.loads(v)["args"]["k"] for v, s in states.items() if s == "pending"}
    assert pending and pending <= {"w1", "w2", "w3"}, states.values()
    before = {table: _rows(db_path, f"SELECT count(*) FROM {table}")[0][0] for table in TABLES}
    sqlite_state = dict(_rows(db_path, "SELECT key, value FROM bundle_state"))
    assert before["outbox"] >= 1 and before["standing"] == 1 and before["logs"] >= 1, before

    # refused: a database that holds state, and one newer than this atrund
    used = postgres.create(f"{pg_url.rsplit('/', 1)[1]}used")
    with psycopg.connect(used, autocommit=True) as db:
        from atrund.pgstate import migrate
        migrate(db)
        db.execute("INSERT INTO cursors(source, cursor) VALUES ('firehose', '1')")
    refused = atrund("state", "copy", "-c", str(cfg), "--to", used)
    assert refused.returncode == CopyRefused.exit_code and "already holds atrund state (table cursors" in refused.stderr, \
        refused.stderr
    newer = postgres.create(f"{pg_url.rsplit('/', 1)[1]}newer")
    with psycopg.connect(newer, autocommit=True) as db:
        migrate(db)
        db.execute("INSERT INTO schema_migrations(version, description) VALUES (%s, 'from the future')", (LATEST + 1,))
    refused = atrund("state", "copy", "-c", str(cfg), "--to", newer)
    assert refused.returncode == StoreError.exit_code and f"schema version {LATEST + 1}" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (home / "atrund-state" / "moved").exists()

    copied = atrund("state", "copy", "-c", str(cfg), "--to", pg_url)
    assert copied.returncode == 0, copied.stderr
    assert (home / "atrund-state" / "moved").exists()
    again = atrund("state", "list", "-c", str(cfg), "--author", author.account.did, "--bundle", rkey)
    assert again.returncode == StateMoved.exit_code and "was moved" in again.stderr, again.stderr
    with psycopg.connect(pg_url, autocommit=True) as db:
        after = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}
        assert after == before
        assert db.execute("SELECT did, verdict FROM access_policy").fetchall() == [("did:plc:blockedblockedblocked1", "deny")]
        assert dict(db.execute("SELECT key, value FROM bundle_state").fetchall()) == sqlite_state
        assert db.execute("SELECT max(seq) FROM logs").fetchone()[0] < db.execute("SELECT nextval('logs_seq_seq')").fetchone()[0]
        assert db.execute("SELECT count(*) FROM invocations WHERE replica IS NOT NULL").fetchone()[0] == 0

    # two Postgres replicas carry on
    procs = []
    for n in range(2):
        replica = tmp_path / f"replica{n}"
        replica.mkdir()
        procs.append(serve_subprocess(serve_config(replica, stack, runner, author, state={"url": pg_url}), replica / "serve.log"))
    try:
        results = {k: await wait_result(reader, runner.did, uri, timeout=90) for k, uri in waiting.items()}
        executions = runs.read_text().splitlines()
        assert sorted(executions) == ["done", "w0", "w1", "w2", "w3"], executions  # each once: nothing again
        assert all(r["status"] == "success" for r in results.values()), results
        counted = sorted(r["data"]["n"] for r in results.values())
        assert counted == [2, 3, 4, 5], counted  # the count went on from SQLite's: its state was there
        state_cfg = tmp_path / "replica0" / "config.toml"
        n = atrund("state", "get", "-c", str(state_cfg), "--author", author.account.did, "--bundle", rkey, "n")
        assert n.returncode == 0 and json.loads(n.stdout) == 5, n.stdout + n.stderr
        with psycopg.connect(pg_url, autocommit=True) as db:
            assert db.execute("SELECT next_at FROM standing WHERE uri = %s", (schedule,)).fetchone()[0] is not None
    finally:
        _stop(procs)
