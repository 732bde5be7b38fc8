"""The runner's memory in Postgres: the ``Store`` of atrund.state, for ``[state] url``.

The promises are SQLite's (atrund.state), kept by Postgres transactions:
- an invocation is stored (``pending``) in the transaction that moves the ingest cursor past it;
- it is marked ``running`` and committed before its bundle starts: the claim is one guarded
  UPDATE (``state = 'pending'``), and Postgres's row lock makes a second claimant find it no
  longer pending, so it runs at most once;
- its result goes into the outbox in the transaction that marks it ``done``.

The statements are SQLite's own: ``PgState`` is atrund.state's ``State`` on another connection,
whose statements are written in the SQL both speak (upserts with ON CONFLICT; ``?`` placeholders,
which ``_Connection`` turns into psycopg's ``%s``). So a method added to State serves both, once
its table is in ``MIGRATIONS`` here. The driver is psycopg 3, used synchronously on one
connection in autocommit mode with explicit transactions, like the SQLite store (calls are short
and the callers expect them to return before the next one). Claims are plain SQL on the tables below: no queue library keeps our
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

import functools

import psycopg
from psycopg.conninfo import conninfo_to_dict

from atrund.errors import StateLocked, StoreError
from atrund.state import State

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


class _Connection:
    """A psycopg connection that takes State's statements as written: ``?`` becomes ``%s`` (no
    statement of State holds a literal ``?`` or ``%``)."""

    def __init__(self, db: psycopg.Connection) -> None:
        self.raw = db

    def execute(self, sql: str, params: tuple | list = ()) -> psycopg.Cursor:
        return self.raw.execute(_placeholders(sql), params)

    def executemany(self, sql: str, rows) -> psycopg.Cursor:
        cur = self.raw.cursor()
        cur.executemany(_placeholders(sql), list(rows))
        return cur


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    return sql.replace("?", "%s")


class PgState(State):
    """The Postgres store (an atrund.state ``Store``): State's methods on a Postgres connection."""

    ERRORS = (psycopg.Error,)

    def __init__(self, url: str) -> None:  # not State's: no file, no flock
        self.url = url
        self.failing: str | None = None
        self._db: _Connection | None = None
        try:
            self._open()
        except psycopg.Error as e:
            raise StoreError(f"cannot open the {where(url)}: {type(e).__name__}: {e}") from e

    def _open(self) -> _Connection:
        """Connect, migrate and take the runner's lock; on any failure nothing stays open."""
        self._db = _Connection(connect(self.url))
        try:
            migrate(self._db.raw)
            if not self._db.execute("SELECT pg_try_advisory_lock(?, ?)", (LOCK_CLASS, RUNNER_LOCK)).fetchone()[0]:
                raise StateLocked(f"the {where(self.url)} is in use by another atrund process")
        except BaseException:
            self._drop()
            raise
        return self._db

    @property
    def db(self) -> _Connection:
        """The connection, opened again (and the runner's lock taken again) after it broke."""
        if self._db is None or self._db.raw.closed:
            try:
                return self._open()
            except StateLocked as e:  # another runner took the database while this one was cut off
                raise StoreError(str(e)) from None
        return self._db

    def failed(self, error: Exception) -> None:
        """A broken connection is closed, to be opened at the next call; a refused statement
        leaves it as it is (autocommit: no transaction stays open)."""
        if self._db is not None and (self._db.raw.broken or isinstance(error, psycopg.OperationalError)):
            self._drop()

    def _drop(self) -> None:
        if self._db is not None:
            try:
                self._db.raw.close()
            except psycopg.Error:
                pass  # already broken: closing is all that was asked
            self._db = None

    def close(self) -> None:
        self._drop()

    def _tx(self):
        return self.db.raw.transaction()
