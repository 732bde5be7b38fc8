"""The runner's memory in Postgres: the ``Store`` of atrund.state, for ``[state] url``.

The promises are SQLite's (atrund.state), kept by Postgres transactions:
- an invocation is stored (``pending``) in the transaction that moves the ingest cursor past it;
- it is marked ``running`` and committed before its bundle starts: the claim is one guarded
  UPDATE (``state = 'pending'``), and Postgres's row lock makes a second claimant find it no
  longer pending, so it runs at most once;
- its result goes into the outbox in the transaction that marks it ``done``.

The driver is psycopg 3, used synchronously on one connection in autocommit mode with explicit
transactions, like the SQLite store (calls are short and the callers expect them to return
before the next one). Claims are plain SQL on the tables below: no queue library keeps our
per-author order, our fairness and our at-most-once claim together, and the scheduler
(atrund.schedule) already owns order and fairness.

Until replicas share a database, one runner holds it at a time: a session advisory lock plays
the part of SQLite's ``flock`` on the state directory (two runners would each take the other's
running rows for a crash's leftovers).

The schema is versioned (``MIGRATIONS``, recorded in ``schema_migrations``): every open brings a
database up to date, and so does ``atrund state migrate``; a database newer than this atrund is
refused rather than misread. Migrations take a transaction-scoped advisory lock, so runners
starting together apply each one once.

psycopg's exceptions become ``StoreError`` in atrund.state's one translator. A connection that
broke (Postgres restarted, the network dropped) is closed there and opened again at the next
call: the caller holds what it could not store and tries again, as with SQLite.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from atrund.errors import StateLocked, StoreError
from atrund.state import Outgoing, Standing, Stored, translated

# Advisory lock keys (pg_advisory_lock(int, int)): one class for atrund, one key per purpose.
LOCK_CLASS = 0x61747275  # "atru"
MIGRATE_LOCK = 1
RUNNER_LOCK = 2

# (version, what it does, SQL). Append only: a version once released is never edited. Text keys
# compare bytewise (COLLATE "C"), as in SQLite: drop_standing selects a schedule's runs by range.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "invocations, outbox, cursors, inactive accounts, schedules and triggers", """
CREATE TABLE invocations (
    uri         TEXT COLLATE "C" PRIMARY KEY,
    author      TEXT NOT NULL,
    cid         TEXT NOT NULL,
    value       TEXT NOT NULL,                  -- the invocation record as JSON
    state       TEXT NOT NULL,                  -- pending | running | done | denied | withdrawn
    status      TEXT,                           -- the result status once done
    seen_at     DOUBLE PRECISION NOT NULL,
    started_at  DOUBLE PRECISION,
    finished_at DOUBLE PRECISION
);
CREATE INDEX invocations_state ON invocations(state);
CREATE TABLE outbox (
    invocation_uri TEXT COLLATE "C" PRIMARY KEY,
    rkey        TEXT NOT NULL,
    record      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try    DOUBLE PRECISION NOT NULL,
    last_error  TEXT,
    written_at  DOUBLE PRECISION
);
CREATE INDEX outbox_due ON outbox(written_at, next_try);
CREATE TABLE cursors (
    source TEXT PRIMARY KEY,
    cursor TEXT NOT NULL
);
CREATE TABLE inactive_accounts (
    did    TEXT PRIMARY KEY,
    since  DOUBLE PRECISION NOT NULL
);
CREATE TABLE standing (
    uri      TEXT COLLATE "C" PRIMARY KEY,
    kind     TEXT NOT NULL,                     -- schedule | trigger
    author   TEXT NOT NULL,
    cid      TEXT NOT NULL,
    value    TEXT NOT NULL,                     -- the record as JSON
    next_at  DOUBLE PRECISION                   -- schedules: the next tick's scheduled time (NULL: none)
);
"""),
]
LATEST = MIGRATIONS[-1][0]


def where(url: str) -> str:
    """The database a URL names, for messages: host, port and database, never credentials."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the Postgres database of state.url"
    host = parts.get("host") or "local socket"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"Postgres database {parts.get('dbname') or '(default)'} on {host}{port}"


def connect(url: str) -> psycopg.Connection:
    """A connection in autocommit mode (transactions are explicit), failing within 10 s."""
    return psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="atrund")


def migrate(db: psycopg.Connection) -> tuple[int, int]:
    """Apply the migrations this database lacks, each in its own transaction; returns the version
    before and after. Runners starting together wait for each other on the advisory lock."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, MIGRATE_LOCK))
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                   "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        before = db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
        if before > LATEST:
            raise StoreError(f"the state database is at schema version {before}, newer than this atrund knows "
                             f"({LATEST}); run the newer atrund, or restore a backup taken before it migrated")
        for version, description, sql in MIGRATIONS:
            if version > before:
                db.execute(sql)
                db.execute("INSERT INTO schema_migrations(version, description) VALUES (%s, %s)", (version, description))
    return before, max(before, LATEST)


def migrate_url(url: str) -> tuple[int, int]:
    """``atrund state migrate``: bring the database at ``url`` up to date (it may be in use)."""
    try:
        with connect(url) as db:
            return migrate(db)
    except psycopg.Error as e:
        raise StoreError(f"cannot migrate the {where(url)}: {type(e).__name__}: {e}") from e


class PgState:
    """The Postgres store (an atrund.state ``Store``)."""

    ERRORS = (psycopg.Error,)

    def __init__(self, url: str) -> None:
        self.url = url
        self.failing: str | None = None
        self._db: psycopg.Connection | None = None
        try:
            self._open()
        except psycopg.Error as e:
            raise StoreError(f"cannot open the {where(url)}: {type(e).__name__}: {e}") from e

    def _open(self) -> psycopg.Connection:
        """Connect, migrate and take the runner's lock; on any failure nothing stays open."""
        db = self._db = connect(self.url)
        try:
            migrate(db)
            if not db.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, RUNNER_LOCK)).fetchone()[0]:
                raise StateLocked(f"the {where(self.url)} is in use by another atrund process")
        except BaseException:
            self._drop()
            raise
        return db

    @property
    def db(self) -> psycopg.Connection:
        """The connection, opened again (and the runner's lock taken again) after it broke."""
        if self._db is None or self._db.closed:
            try:
                return self._open()
            except StateLocked as e:  # another runner took the database while this one was cut off
                raise StoreError(str(e)) from None
        return self._db

    def failed(self, error: Exception) -> None:
        """A broken connection is closed, to be opened at the next call; a refused statement
        leaves it as it is (autocommit: no transaction stays open)."""
        if self._db is not None and (self._db.broken or isinstance(error, psycopg.OperationalError)):
            self._drop()

    def _drop(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except psycopg.Error:
                pass  # already broken: closing is all that was asked
            self._db = None

    def close(self) -> None:
        self._drop()

    # -- invocations ---------------------------------------------------------------------

    @translated
    def accept(self, uri: str, author: str, cid: str, value: dict[str, Any], state: str = "pending") -> bool:
        """Remember an invocation; False if it was seen before (whatever became of it)."""
        cur = self.db.execute(
            "INSERT INTO invocations(uri, author, cid, value, state, seen_at) VALUES (%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (uri) DO NOTHING", (uri, author, cid, json.dumps(value), state, time.time()))
        return cur.rowcount == 1

    @translated
    def accept_page(self, source: str, cursor: str | None, rows: list[tuple[str, str, str, dict, str]],
                    withdrawn: list[str] = (), reused: list[tuple[str, str, str, dict]] | None = None) -> list[str]:
        """As atrund.state.State.accept_page: the page and the cursor past it, in one transaction."""
        new = []
        with self.db.transaction():
            for uri, author, cid, value, state in rows:
                if self.accept(uri, author, cid, value, state):
                    new.append(uri)
                elif reused is not None and state == "pending":
                    known = self.db.execute("SELECT cid, state FROM invocations WHERE uri = %s", (uri,)).fetchone()
                    if known is not None and known[0] != cid and known[1] in ("pending", "withdrawn"):
                        reused.append((uri, author, cid, value))
            gone = {uri for uri in withdrawn if self._withdraw(uri)}
            if cursor is not None:
                self.db.execute("INSERT INTO cursors(source, cursor) VALUES (%s, %s) "
                                "ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor", (source, cursor))
        return [uri for uri in new if uri not in gone]

    @translated
    def withdraw(self, uri: str) -> bool:
        return self._withdraw(uri)

    def _withdraw(self, uri: str) -> bool:
        return self._leave_pending(uri, "withdrawn", "finished_at")

    def _leave_pending(self, uri: str, state: str, stamp: str | None = None) -> bool:
        """Every claim on a pending invocation goes through this one guarded UPDATE: a row another
        transaction claimed meanwhile is re-read after its lock and is no longer pending."""
        sets, values = ("state = %s", [state]) if stamp is None else (f"state = %s, {stamp} = %s", [state, time.time()])
        cur = self.db.execute(f"UPDATE invocations SET {sets} WHERE uri = %s AND state = 'pending'", (*values, uri))
        return cur.rowcount == 1

    @translated
    def forget_cursor(self, source: str) -> None:
        self.db.execute("DELETE FROM cursors WHERE source = %s", (source,))

    @translated
    def cursor(self, source: str) -> str | None:
        row = self.db.execute("SELECT cursor FROM cursors WHERE source = %s", (source,)).fetchone()
        return row[0] if row else None

    @translated
    def with_state(self, state: str) -> list[Stored]:
        rows = self.db.execute("SELECT uri, author, cid, value, seen_at FROM invocations WHERE state = %s "
                               "ORDER BY seen_at", (state,)).fetchall()
        return [Stored(uri, author, cid, json.loads(value), seen) for uri, author, cid, value, seen in rows]

    @translated
    def pending(self, uri: str) -> Stored | None:
        row = self.db.execute("SELECT uri, author, cid, value, seen_at FROM invocations WHERE uri = %s AND state = 'pending'",
                              (uri,)).fetchone()
        return Stored(row[0], row[1], row[2], json.loads(row[3]), row[4]) if row else None

    @translated
    def mark_running(self, uri: str) -> bool:
        return self._leave_pending(uri, "running", "started_at")

    @translated
    def deny(self, uri: str) -> bool:
        return self._leave_pending(uri, "denied")

    @translated
    def finish(self, uri: str, status: str, rkey: str, record: dict[str, Any] | None) -> bool:
        """Done and its result queued, in one transaction; only once (False after the first)."""
        now = time.time()
        with self.db.transaction():
            cur = self.db.execute("UPDATE invocations SET state = 'done', status = %s, finished_at = %s "
                                  "WHERE uri = %s AND state IN ('pending', 'running')", (status, now, uri))
            if cur.rowcount != 1:
                return False
            if record is not None:
                self.db.execute("INSERT INTO outbox(invocation_uri, rkey, record, next_try) VALUES (%s,%s,%s,%s)",
                                (uri, rkey, json.dumps(record), now))
        return True

    @translated
    def refuse_reused(self, uri: str, cid: str, value: dict[str, Any], status: str, rkey: str,
                      record: dict[str, Any]) -> bool:
        now = time.time()
        with self.db.transaction():
            cur = self.db.execute(
                "UPDATE invocations SET cid = %s, value = %s, state = 'done', status = %s, finished_at = %s "
                "WHERE uri = %s AND state IN ('pending', 'withdrawn')", (cid, json.dumps(value), status, now, uri))
            if cur.rowcount != 1:
                return False
            self._queue(uri, rkey, record, now)
        return True

    @translated
    def status_of(self, uri: str) -> tuple[str, str | None] | None:
        row = self.db.execute("SELECT state, status FROM invocations WHERE uri = %s", (uri,)).fetchone()
        return (row[0], row[1]) if row else None

    @translated
    def counts(self) -> dict[str, int]:
        out = dict(self.db.execute("SELECT state, count(*) FROM invocations GROUP BY state").fetchall())
        out["unwritten"] = self.db.execute("SELECT count(*) FROM outbox WHERE written_at IS NULL").fetchone()[0]
        return out

    # -- schedules and triggers ----------------------------------------------------------

    @translated
    def standing(self, kind: str) -> list[Standing]:
        rows = self.db.execute("SELECT uri, author, cid, value, next_at FROM standing WHERE kind = %s ORDER BY uri", (kind,))
        return [Standing(uri, author, cid, json.loads(value), next_at) for uri, author, cid, value, next_at in rows]

    @translated
    def keep_standing(self, kind: str, item: Standing) -> None:
        self.db.execute(
            "INSERT INTO standing(uri, kind, author, cid, value, next_at) VALUES (%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (uri) DO UPDATE SET kind = excluded.kind, author = excluded.author, cid = excluded.cid, "
            "value = excluded.value, next_at = excluded.next_at",
            (item.uri, kind, item.author, item.cid, json.dumps(item.value), item.next_at))

    @translated
    def drop_standing(self, uri: str) -> int:
        with self.db.transaction():
            self.db.execute("DELETE FROM standing WHERE uri = %s", (uri,))
            cur = self.db.execute("UPDATE invocations SET state = 'withdrawn', finished_at = %s "
                                  "WHERE uri >= %s AND uri < %s AND state = 'pending'", (time.time(), uri + "#", uri + "$"))
            return cur.rowcount

    @translated
    def add_ticks(self, ticks: list[tuple[Standing, str, dict[str, Any], float | None]]) -> list[str]:
        new = []
        with self.db.transaction():
            for schedule, key, value, next_at in ticks:
                if self.accept(key, schedule.author, schedule.cid, value):
                    new.append(key)
                self.db.execute("UPDATE standing SET next_at = %s WHERE uri = %s AND cid = %s",
                                (next_at, schedule.uri, schedule.cid))
        return new

    @translated
    def move_schedule(self, uri: str, cid: str, next_at: float | None) -> None:
        self.db.execute("UPDATE standing SET next_at = %s WHERE uri = %s AND cid = %s", (next_at, uri, cid))

    # -- inactive accounts ---------------------------------------------------------------

    @translated
    def inactive_accounts(self) -> list[str]:
        return [did for (did,) in self.db.execute("SELECT did FROM inactive_accounts ORDER BY since, did")]

    @translated
    def set_inactive(self, did: str, evict: list[str] = ()) -> None:
        with self.db.transaction():
            self.db.execute("INSERT INTO inactive_accounts(did, since) VALUES (%s, %s) "
                            "ON CONFLICT (did) DO UPDATE SET since = excluded.since", (did, time.time()))
            self._forget_inactive(evict)

    @translated
    def forget_inactive(self, dids: list[str]) -> None:
        self._forget_inactive(dids)

    def _forget_inactive(self, dids: list[str]) -> None:
        if dids:
            self.db.execute("DELETE FROM inactive_accounts WHERE did = ANY(%s)", (list(dids),))

    # -- outbox --------------------------------------------------------------------------

    @translated
    def due(self, limit: int = 50) -> list[Outgoing]:
        rows = self.db.execute("SELECT invocation_uri, rkey, record, attempts FROM outbox "
                               "WHERE written_at IS NULL AND next_try <= %s ORDER BY next_try LIMIT %s",
                               (time.time(), limit)).fetchall()
        return [Outgoing(uri, rkey, json.loads(rec), attempts) for uri, rkey, rec, attempts in rows]

    @translated
    def next_due_in(self) -> float | None:
        row = self.db.execute("SELECT min(next_try) FROM outbox WHERE written_at IS NULL").fetchone()
        return None if row[0] is None else max(0.0, row[0] - time.time())

    @translated
    def written(self, *invocation_uris: str) -> None:
        if invocation_uris:
            self.db.execute("UPDATE outbox SET written_at = %s WHERE invocation_uri = ANY(%s)",
                            (time.time(), list(invocation_uris)))

    @translated
    def outbox_figures(self) -> tuple[int, float | None]:
        count, oldest = self.db.execute(
            "SELECT count(*), min(i.finished_at) FROM outbox o JOIN invocations i ON i.uri = o.invocation_uri "
            "WHERE o.written_at IS NULL").fetchone()
        return count, (None if oldest is None else max(0.0, time.time() - oldest))

    @translated
    def unqueue_result(self, invocation_uri: str) -> None:
        self.db.execute("DELETE FROM outbox WHERE invocation_uri = %s AND written_at IS NULL", (invocation_uri,))

    @translated
    def requeue_result(self, invocation_uri: str, rkey: str, record: dict[str, Any]) -> None:
        self._queue(invocation_uri, rkey, record, time.time())

    def _queue(self, invocation_uri: str, rkey: str, record: dict[str, Any], now: float) -> None:
        """A result on the outbox, due now, replacing any earlier one (attempts and error reset),
        as SQLite's INSERT OR REPLACE does."""
        self.db.execute(
            "INSERT INTO outbox(invocation_uri, rkey, record, next_try) VALUES (%s,%s,%s,%s) "
            "ON CONFLICT (invocation_uri) DO UPDATE SET rkey = excluded.rkey, record = excluded.record, "
            "next_try = excluded.next_try, attempts = 0, last_error = NULL, written_at = NULL",
            (invocation_uri, rkey, json.dumps(record), now))

    @translated
    def retry_later(self, invocation_uri: str, error: str, delay: float, record: dict[str, Any] | None = None) -> None:
        self.db.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_try = %s, last_error = %s, record = coalesce(%s, record) "
            "WHERE invocation_uri = %s",
            (time.time() + delay, error, None if record is None else json.dumps(record), invocation_uri))

