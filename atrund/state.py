"""The runner's memory: embedded SQLite, one file (the default), or Postgres (atrund.pgstate).

``Store`` below is the one seam: every component takes a Store, and the composition root
(atrund.app) picks the backend from ``[state]``. Both backends keep the same promises:

What makes "nothing lost, nothing run twice" true:
- an invocation is stored (state ``pending``) before the ingest cursor moves past it;
- it is marked ``running`` and committed before its bundle starts, so after a crash it is
  never started again: a ``running`` row found at start-up gets an "interrupted" result;
- its result record goes into the outbox in the same transaction that marks it ``done``;
  the outbox is retried until the PDS accepts the write (or refuses it for good: see
  atrund.results, and atrund.quarantine for what cannot be written at all).

Faults of the store itself (a full disk, an immutable or unreadable file, an I/O error) become
``StoreError`` here, the one place sqlite3's exceptions are translated; ``failing`` says what
the last one was until a write succeeds again (/healthz shows it). Callers hold what they could
not store and try again; nothing is dropped because the store failed for a while.

The database is opened in WAL mode with ``locking_mode=EXCLUSIVE``: its WAL index then lives in
this process's memory instead of a memory-mapped ``-shm`` file. A mapped file that cannot be
written (an immutable flag, a full disk) makes the kernel send SIGBUS, which kills the process;
with the index in memory the same fault is an ordinary error. The file lock below already makes
the database private to one runner, so no other process needs the shared index. (Operators'
commands that must work while the runner runs use their own file: atrund.quarantine.)
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from atrund.errors import StateLocked, StateMoved, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    uri         TEXT PRIMARY KEY,
    author      TEXT NOT NULL,
    cid         TEXT NOT NULL,
    value       TEXT NOT NULL,        -- the invocation record as JSON
    state       TEXT NOT NULL,        -- pending | running | done | denied | withdrawn
    status      TEXT,                 -- the result status once done
    seen_at     REAL NOT NULL,
    started_at  REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS invocations_state ON invocations(state);
CREATE TABLE IF NOT EXISTS outbox (
    invocation_uri TEXT PRIMARY KEY,
    rkey        TEXT NOT NULL,
    record      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try    REAL NOT NULL,
    last_error  TEXT,
    written_at  REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(written_at, next_try);
CREATE TABLE IF NOT EXISTS cursors (
    source TEXT PRIMARY KEY,
    cursor TEXT NOT NULL
);
"""

# Added after databases existed: run at every open (CREATE ... IF NOT EXISTS), which is how an
# existing database gets it.
INACTIVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS inactive_accounts (  -- authors the network reports taken down, suspended or deactivated
    did    TEXT PRIMARY KEY,
    since  REAL NOT NULL                        -- when it was last reported inactive (the oldest go first)
);
"""


# Schedules and triggers (atrund.ticks, atrund.triggers): the records, addressed to this runner,
# that ask for runs over time. Their runs are rows of ``invocations`` like any other, keyed by
# records.tick_key / firing_key: the same claim makes a tick run at most once, across restarts.
STANDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS standing (
    uri      TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,                 -- schedule | trigger
    author   TEXT NOT NULL,
    cid      TEXT NOT NULL,
    value    TEXT NOT NULL,                 -- the record as JSON
    next_at  REAL                           -- schedules: the next tick's scheduled time (NULL: none)
);
"""

# What runs printed and why they failed (atrund.logbook): read by the bundle's author and the
# invoker through dev.atrun.getLogs, deleted past [logs] retention_hours and max_entries.
LOGS_SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order entries were kept: a tail's cursor
    id       TEXT NOT NULL,                      -- an invocation's URI (or tick/firing key), or a request id
    bundle   TEXT NOT NULL,                      -- the bundle's AT URI
    invoker  TEXT,                               -- who asked; NULL for an anonymous HTTP request
    kind     TEXT NOT NULL,                      -- record | schedule | trigger | xrpc | http
    at       REAL NOT NULL,
    status   TEXT NOT NULL,
    error    TEXT,
    output   TEXT
);
CREATE INDEX IF NOT EXISTS logs_id ON logs(id);
CREATE INDEX IF NOT EXISTS logs_bundle ON logs(bundle, seq);
CREATE INDEX IF NOT EXISTS logs_at ON logs(at);
"""


# Bundles' durable key-value state (atrund.kv): one namespace per (author DID, bundle rkey). A
# run's writes are applied in the transaction that stores its outcome (``finish``), or in one of
# their own (``commit_bundle_state``: gateway and XRPC runs, which store no outcome).
MOVED = "moved"  # in the state directory once `atrund state copy` has copied it into Postgres (atrund.pgcopy)

BUNDLE_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundle_state (
    author TEXT NOT NULL,                   -- the bundle author's DID
    bundle TEXT NOT NULL,                   -- the bundle record's rkey
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,                   -- JSON
    PRIMARY KEY (author, bundle, key)
) WITHOUT ROWID;
"""


def translated(method):
    """The backend's exceptions (its class's ``ERRORS``) as StoreError, and ``failing`` kept
    current: the one place they are translated, for both backends. A successful call clears
    ``failing`` (reads too: a store that answers reads but not writes reports again at the next
    write)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            out = method(self, *args, **kwargs)
        except self.ERRORS as e:
            self.failing = f"{method.__name__}: {type(e).__name__}: {e}"
            self.failed(e)
            raise StoreError(f"the state store failed ({self.failing})") from e
        if self.failing is not None and method.__name__ not in READS:
            self.failing = None
        return out

    return call


READS = {"take_over", "cursor", "with_state", "pending", "status_of", "counts", "due", "next_due_in", "outbox_figures",
         "inactive_accounts", "standing", "logs", "state_value", "state_keys", "state_usage", "policy_stamp", "policy_entries"}


@dataclass(frozen=True)
class Stored:
    uri: str
    author: str
    cid: str
    value: dict[str, Any]
    seen_at: float


@dataclass(frozen=True)
class Standing:
    """A schedule or trigger record addressed to this runner, as last ingested."""

    uri: str
    author: str
    cid: str
    value: dict[str, Any]
    next_at: float | None = None


@dataclass(frozen=True)
class BundleWrites:
    """What one run wrote to its bundle's state: key -> JSON text, or None for a delete."""

    author: str
    bundle: str
    items: dict[str, str | None]
    holder: str | None = None  # the run's hold on the namespace, checked at commit where replicas share it (pgstate)


@dataclass(frozen=True)
class LogEntry:
    """One run's output and outcome, kept for its bundle's author and its invoker."""

    id: str
    bundle: str
    invoker: str | None
    kind: str
    at: float
    status: str
    error: str | None = None
    output: str | None = None
    seq: int | None = None  # given by the store


@dataclass(frozen=True)
class Outgoing:
    invocation_uri: str
    rkey: str
    record: dict[str, Any]
    attempts: int


class Store(Protocol):
    """What every component may ask of the state store: SQLite's ``State`` below and Postgres's
    ``atrund.pgstate.PgState`` both implement exactly this (tests/test_store.py runs the same
    checks on both). ``failing`` names the last fault until a write succeeds again."""

    failing: str | None
    shared: bool  # replicas share it: heartbeat and take_over run in a loop, not only at start

    def close(self) -> None: ...
    def heartbeat(self, hot: Sequence[str] = ()) -> None: ...
    def lead(self) -> bool: ...
    def figures(self) -> dict: ...
    def assigned(self) -> list[str]: ...
    async def wait_for_work(self, timeout: float) -> None: ...
    def take_over(self) -> tuple[list[Stored], list[Stored]]: ...
    def accept(self, uri: str, author: str, cid: str, value: dict[str, Any], state: str = "pending") -> bool: ...
    def accept_page(self, source: str, cursor: str | None, rows: list[tuple[str, str, str, dict, str]],
                    withdrawn: list[str] = (), reused: list[tuple[str, str, str, dict]] | None = None) -> list[str]: ...
    def withdraw(self, uri: str) -> bool: ...
    def forget_cursor(self, source: str) -> None: ...
    def cursor(self, source: str) -> str | None: ...
    def with_state(self, state: str) -> list[Stored]: ...
    def pending(self, uri: str) -> Stored | None: ...
    def mark_running(self, uri: str) -> bool: ...
    def deny(self, uri: str) -> bool: ...
    def finish(self, uri: str, status: str, rkey: str, record: dict[str, Any] | None,
               writes: BundleWrites | None = None) -> bool: ...
    def refuse_reused(self, uri: str, cid: str, value: dict[str, Any], status: str, rkey: str,
                      record: dict[str, Any]) -> bool: ...
    def status_of(self, uri: str) -> tuple[str, str | None] | None: ...
    def counts(self) -> dict[str, int]: ...
    def standing(self, kind: str) -> list[Standing]: ...
    def keep_standing(self, kind: str, item: Standing) -> None: ...
    def drop_standing(self, uri: str) -> int: ...
    def add_ticks(self, ticks: list[tuple[Standing, str, dict[str, Any], float | None]]) -> list[str]: ...
    def move_schedule(self, uri: str, cid: str, next_at: float | None) -> None: ...
    def inactive_accounts(self) -> list[str]: ...
    def set_inactive(self, did: str, evict: list[str] = ()) -> None: ...
    def forget_inactive(self, dids: list[str]) -> None: ...
    def due(self, limit: int = 50) -> list[Outgoing]: ...
    def next_due_in(self) -> float | None: ...
    def written(self, *invocation_uris: str) -> None: ...
    def outbox_figures(self) -> tuple[int, float | None]: ...
    def unqueue_result(self, invocation_uri: str) -> None: ...
    def requeue_result(self, invocation_uri: str, rkey: str, record: dict[str, Any]) -> None: ...
    def retry_later(self, invocation_uri: str, error: str, delay: float, record: dict[str, Any] | None = None) -> None: ...
    def keep_logs(self, entries: list[LogEntry]) -> None: ...
    def logs(self, *, id: str | None = None, bundle: str | None = None, after: int | None = None,
             limit: int = 50) -> list[LogEntry]: ...
    def forget_logs(self, before: float, keep: int) -> int: ...
    def state_value(self, author: str, bundle: str, key: str) -> str | None: ...
    def state_keys(self, author: str, bundle: str, prefix: str = "", after: str | None = None,
                   limit: int | None = None) -> list[tuple[str, str]]: ...
    def state_usage(self, author: str, bundle: str) -> tuple[int, int]: ...
    def commit_bundle_state(self, writes: BundleWrites) -> None: ...
    def drop_bundle_state(self, author: str, bundle: str, keys: list[str] | None = None) -> int: ...
    def hold_namespace(self, author: str, bundle: str, holder: str, seconds: float) -> bool: ...
    def free_namespace(self, author: str, bundle: str, holder: str) -> None: ...
    def replicas_with(self, role: str) -> int: ...


class State:
    """The SQLite store (a ``Store``): one file in the state directory, one runner at a time.

    Its statements are in the SQL SQLite and Postgres both speak (ON CONFLICT upserts, ``?``
    placeholders): atrund.pgstate.PgState runs these same methods on a Postgres connection, so
    the two backends cannot drift apart. Keep new statements to that common SQL."""

    ERRORS = (sqlite3.Error,)
    shared = False  # one runner per file (the flock below)

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One runner per state directory: two would each believe the other's running rows were
        # interrupted by a crash.
        self._lock = os.open(path.parent / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StateLocked(f"{path.parent} is in use by another atrund process") from None
        if (path.parent / MOVED).exists():
            # its pending work belongs to the Postgres database now: running it here would run it twice
            os.close(self._lock)
            raise StateMoved(f"{path.parent} was moved: {(path.parent / MOVED).read_text().strip()}")
        self.path = path
        self.failing: str | None = None
        try:
            self.db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no memory-mapped -shm (see above)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed "running" must survive a power cut
            for schema in (SCHEMA, INACTIVE_SCHEMA, STANDING_SCHEMA, BUNDLE_STATE_SCHEMA, LOGS_SCHEMA):
                self.db.executescript(schema)
        except sqlite3.Error as e:  # another program holds the file (a sqlite3 shell, a backup), or it is no database
            if getattr(self, "db", None) is not None:
                self.db.close()
            os.close(self._lock)
            locked = "locked" in str(e)
            raise StoreError(f"cannot open the state database {path}: {e}"
                             + (" (another program, such as a sqlite3 shell or a backup, holds it)" if locked else "")) from None

    def close(self) -> None:
        self.db.close()
        os.close(self._lock)

    def failed(self, error: Exception) -> None:
        """Nothing to repair after a fault: the file is opened once, and the next call tries again."""

    def heartbeat(self, hot: Sequence[str] = ()) -> None:
        """Nothing to say: no other runner shares this file."""

    def lead(self) -> bool:
        """This runner is the only one: it always ingests."""
        return True

    def figures(self) -> dict:
        """No replica figures: /healthz says ``replica: null``."""
        return {}

    def assigned(self) -> list[str]:
        """Nothing is assigned: ingest queues what it stores (Runs.submit)."""
        return []

    async def wait_for_work(self, timeout: float) -> None:
        await asyncio.sleep(timeout)

    def replicas_with(self, role: str) -> int:
        """This runner is the only one with any role (the gateway's rate is all its own)."""
        return 1

    def hold_namespace(self, author: str, bundle: str, holder: str, seconds: float) -> bool:
        """Nothing to hold in the store: one runner per file, and its own lock (atrund.kv) is the
        whole of a namespace's lock."""
        return True

    def free_namespace(self, author: str, bundle: str, holder: str) -> None:
        """Nothing was held in the store (``hold_namespace``)."""

    @translated
    def take_over(self) -> tuple[list[Stored], list[Stored]]:
        """What a previous run of this runner left: the invocations it was running (recorded as
        interrupted, never run again) and those it had not started (queued again). With one
        runner per file, that is every running and every pending one, read at start."""
        return self.with_state("running"), self.with_state("pending")

    # -- invocations ---------------------------------------------------------------------

    @translated
    def accept(self, uri: str, author: str, cid: str, value: dict[str, Any], state: str = "pending") -> bool:
        """Remember an invocation; False if it was seen before (whatever became of it)."""
        cur = self.db.execute(
            "INSERT INTO invocations(uri, author, cid, value, state, seen_at) VALUES (?,?,?,?,?,?) ON CONFLICT (uri) DO NOTHING",
            (uri, author, cid, json.dumps(value), state, time.time()),
        )
        return cur.rowcount == 1

    @translated
    def accept_page(self, source: str, cursor: str | None, rows: list[tuple[str, str, str, dict, str]],
                    withdrawn: list[str] = (), reused: list[tuple[str, str, str, dict]] | None = None) -> list[str]:
        """Store a page of invocations, withdraw the deleted ones, and move the source's cursor
        past it, atomically. Returns the URIs that were new (and not withdrawn in the same page).

        ``reused`` collects (uri, author, cid, value) of rows whose record key was seen before at
        another CID while that invocation had not run (pending, or withdrawn by a delete): the
        caller refuses them (see refuse_reused).
        """
        new = []
        with self._tx():
            for uri, author, cid, value, state in rows:
                if self.accept(uri, author, cid, value, state):
                    new.append(uri)
                elif reused is not None and state == "pending":
                    known = self.db.execute("SELECT cid, state FROM invocations WHERE uri = ?", (uri,)).fetchone()
                    if known is not None and known[0] != cid and known[1] in ("pending", "withdrawn"):
                        reused.append((uri, author, cid, value))
            gone = {uri for uri in withdrawn if self._withdraw(uri)}
            if cursor is not None:
                self.db.execute("INSERT INTO cursors(source, cursor) VALUES (?, ?) "
                                "ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor", (source, cursor))
        return [uri for uri in new if uri not in gone]

    @translated
    def withdraw(self, uri: str) -> bool:
        """The author deleted (or changed) a pending invocation: it will not run, and gets no result."""
        with self._tx():
            return self._withdraw(uri)

    def _withdraw(self, uri: str) -> bool:
        return self._leave_pending(uri, "withdrawn", "finished_at")

    def _leave_pending(self, uri: str, state: str, stamp: str | None = None) -> bool:
        """Move a pending invocation to ``state`` (and set the ``stamp`` column to now); False if
        it is not pending. Every claim on a pending invocation goes through this one guarded UPDATE."""
        sets, values = ("state = ?", [state]) if stamp is None else (f"state = ?, {stamp} = ?", [state, time.time()])
        cur = self.db.execute(f"UPDATE invocations SET {sets} WHERE uri = ? AND state = 'pending'", (*values, uri))
        return cur.rowcount == 1

    @translated
    def forget_cursor(self, source: str) -> None:
        self.db.execute("DELETE FROM cursors WHERE source = ?", (source,))

    @translated
    def cursor(self, source: str) -> str | None:
        row = self.db.execute("SELECT cursor FROM cursors WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    @translated
    def with_state(self, state: str) -> list[Stored]:
        rows = self.db.execute(
            "SELECT uri, author, cid, value, seen_at FROM invocations WHERE state = ? ORDER BY seen_at", (state,)
        ).fetchall()
        return [Stored(uri, author, cid, json.loads(value), seen) for uri, author, cid, value, seen in rows]

    @translated
    def pending(self, uri: str) -> Stored | None:
        row = self.db.execute(
            "SELECT uri, author, cid, value, seen_at FROM invocations WHERE uri = ? AND state = 'pending'", (uri,)
        ).fetchone()
        return Stored(row[0], row[1], row[2], json.loads(row[3]), row[4]) if row else None

    @translated
    def mark_running(self, uri: str) -> bool:
        """Claim a pending invocation for execution; False if it is not pending (never run twice)."""
        return self._leave_pending(uri, "running", "started_at")

    @translated
    def deny(self, uri: str) -> bool:
        """A pending invocation whose author lost access before it started: never run, no result."""
        return self._leave_pending(uri, "denied")

    @translated
    def finish(self, uri: str, status: str, rkey: str, record: dict[str, Any] | None,
               writes: BundleWrites | None = None) -> bool:
        """Mark an invocation done, queue its result record (None: no result is written, as a
        trigger's ``results`` may ask) and apply what the run wrote to its bundle's state, in
        one transaction.

        Only once: an invocation that is already done keeps its first result (False), and its
        ``writes`` are not applied.
        """
        now = time.time()
        with self._tx():
            cur = self.db.execute(
                "UPDATE invocations SET state = 'done', status = ?, finished_at = ? WHERE uri = ? AND state IN ('pending', 'running')",
                (status, now, uri),
            )
            if cur.rowcount != 1:
                return False
            if record is not None:
                self.db.execute(
                    "INSERT INTO outbox(invocation_uri, rkey, record, next_try) VALUES (?,?,?,?)",
                    (uri, rkey, json.dumps(record), now),
                )
            if writes is not None:
                self._apply(writes)
        return True

    @translated
    def refuse_reused(self, uri: str, cid: str, value: dict[str, Any], status: str, rkey: str,
                      record: dict[str, Any]) -> bool:
        """A record key used again (a new CID) before its invocation ran: it becomes done with this
        result (the new version's), in one transaction; False if it has started meanwhile."""
        now = time.time()
        with self._tx():
            cur = self.db.execute(
                "UPDATE invocations SET cid = ?, value = ?, state = 'done', status = ?, finished_at = ? "
                "WHERE uri = ? AND state IN ('pending', 'withdrawn')", (cid, json.dumps(value), status, now, uri))
            if cur.rowcount != 1:
                return False
            self._queue(uri, rkey, record, now)
        return True

    @translated
    def status_of(self, uri: str) -> tuple[str, str | None] | None:
        row = self.db.execute("SELECT state, status FROM invocations WHERE uri = ?", (uri,)).fetchone()
        return (row[0], row[1]) if row else None

    @translated
    def counts(self) -> dict[str, int]:
        out = dict(self.db.execute("SELECT state, count(*) FROM invocations GROUP BY state").fetchall())
        out["unwritten"] = self.db.execute("SELECT count(*) FROM outbox WHERE written_at IS NULL").fetchone()[0]
        return out

    # -- schedules and triggers (atrund.ticks, atrund.triggers) ----------------------------

    @translated
    def standing(self, kind: str) -> list[Standing]:
        rows = self.db.execute("SELECT uri, author, cid, value, next_at FROM standing WHERE kind = ? ORDER BY uri", (kind,))
        return [Standing(uri, author, cid, json.loads(value), next_at) for uri, author, cid, value, next_at in rows]

    @translated
    def keep_standing(self, kind: str, item: Standing) -> None:
        """Remember a schedule or trigger (a new one, or a new version of one)."""
        self.db.execute("INSERT INTO standing(uri, kind, author, cid, value, next_at) VALUES (?,?,?,?,?,?) "
                        "ON CONFLICT (uri) DO UPDATE SET kind = excluded.kind, author = excluded.author, cid = excluded.cid, "
                        "value = excluded.value, next_at = excluded.next_at",
                        (item.uri, kind, item.author, item.cid, json.dumps(item.value), item.next_at))

    @translated
    def drop_standing(self, uri: str) -> int:
        """Forget a schedule or trigger (deleted, or no longer served), and withdraw its runs that
        have not started, in one transaction; returns how many were withdrawn."""
        with self._tx():
            self.db.execute("DELETE FROM standing WHERE uri = ?", (uri,))
            cur = self.db.execute("UPDATE invocations SET state = 'withdrawn', finished_at = ? "
                                  "WHERE uri >= ? AND uri < ? AND state = 'pending'", (time.time(), uri + "#", uri + "$"))
            return cur.rowcount

    @translated
    def add_ticks(self, ticks: list[tuple[Standing, str, dict[str, Any], float | None]]) -> list[str]:
        """Store ticks (schedule, key, value, the schedule's next tick) as pending runs and move
        each schedule on, in one transaction (one fsync however many ticks fall due together).
        Returns the keys that were new: a tick stored before is not stored again (it runs at
        most once)."""
        new = []
        with self._tx():
            for schedule, key, value, next_at in ticks:
                if self.accept(key, schedule.author, schedule.cid, value):
                    new.append(key)
                self.db.execute("UPDATE standing SET next_at = ? WHERE uri = ? AND cid = ?",
                                (next_at, schedule.uri, schedule.cid))
        return new

    @translated
    def move_schedule(self, uri: str, cid: str, next_at: float | None) -> None:
        """Skip a schedule's ticks up to ``next_at`` without running them (catchUp none, a refused schedule)."""
        self.db.execute("UPDATE standing SET next_at = ? WHERE uri = ? AND cid = ?", (next_at, uri, cid))

    # -- bundles' state (atrund.kv) -------------------------------------------------------

    @translated
    def state_value(self, author: str, bundle: str, key: str) -> str | None:
        """The committed value of a key (JSON text), or None."""
        row = self.db.execute("SELECT value FROM bundle_state WHERE author = ? AND bundle = ? AND key = ?",
                              (author, bundle, key)).fetchone()
        return row[0] if row else None

    @translated
    def state_keys(self, author: str, bundle: str, prefix: str = "", after: str | None = None,
                   limit: int | None = None) -> list[tuple[str, str]]:
        """Committed (key, value) pairs that start with ``prefix``, after ``after``, in key order
        (code point order: SQLite compares the UTF-8 bytes); at most ``limit``."""
        sql = "SELECT key, value FROM bundle_state WHERE author = ? AND bundle = ? AND key >= ?"
        params: list[Any] = [author, bundle, max(prefix, after or "")]
        if after is not None:
            sql += " AND key > ?"
            params.append(after)
        if (end := _prefix_end(prefix)) is not None:
            sql += " AND key < ?"
            params.append(end)
        sql += " ORDER BY key"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self.db.execute(sql, params).fetchall()

    @translated
    def state_usage(self, author: str, bundle: str) -> tuple[int, int]:
        """Keys in a namespace and their bytes (keys and values, UTF-8)."""
        keys, size = self.db.execute(
            "SELECT count(*), total(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))) FROM bundle_state "
            "WHERE author = ? AND bundle = ?", (author, bundle)).fetchone()
        return keys, int(size)

    @translated
    def commit_bundle_state(self, writes: BundleWrites) -> None:
        """Apply a run's writes in a transaction of their own (a gateway or XRPC run)."""
        with self._tx():
            self._apply(writes)

    @translated
    def drop_bundle_state(self, author: str, bundle: str, keys: list[str] | None = None) -> int:
        """Delete ``keys`` of a namespace (None: all of it); returns how many were deleted."""
        with self._tx():
            if keys is None:
                return self.db.execute("DELETE FROM bundle_state WHERE author = ? AND bundle = ?", (author, bundle)).rowcount
            return sum(self.db.execute("DELETE FROM bundle_state WHERE author = ? AND bundle = ? AND key = ?",
                                       (author, bundle, key)).rowcount for key in keys)

    def _apply(self, writes: BundleWrites) -> None:
        ns = (writes.author, writes.bundle)
        self.db.executemany("INSERT INTO bundle_state(author, bundle, key, value) VALUES (?,?,?,?) "
                            "ON CONFLICT (author, bundle, key) DO UPDATE SET value = excluded.value",
                            [(*ns, k, v) for k, v in writes.items.items() if v is not None])
        self.db.executemany("DELETE FROM bundle_state WHERE author = ? AND bundle = ? AND key = ?",
                            [(*ns, k) for k, v in writes.items.items() if v is None])

    # -- inactive accounts (atrund.ingest.inactive) ---------------------------------------

    @translated
    def inactive_accounts(self) -> list[str]:
        """The DIDs reported inactive, oldest report first."""
        return [did for (did,) in self.db.execute("SELECT did FROM inactive_accounts ORDER BY since, did")]

    @translated
    def set_inactive(self, did: str, evict: list[str] = ()) -> None:
        """Remember ``did`` as inactive (now) and forget ``evict``, in one transaction."""
        with self._tx():
            self.db.execute("INSERT INTO inactive_accounts(did, since) VALUES (?, ?) "
                            "ON CONFLICT (did) DO UPDATE SET since = excluded.since", (did, time.time()))
            self.db.executemany("DELETE FROM inactive_accounts WHERE did = ?", [(d,) for d in evict])

    @translated
    def forget_inactive(self, dids: list[str]) -> None:
        """``dids`` are active again (or forgotten to stay under the limit)."""
        with self._tx():
            self.db.executemany("DELETE FROM inactive_accounts WHERE did = ?", [(d,) for d in dids])

    # -- outbox --------------------------------------------------------------------------

    @translated
    def due(self, limit: int = 50) -> list[Outgoing]:
        rows = self.db.execute(
            "SELECT invocation_uri, rkey, record, attempts FROM outbox WHERE written_at IS NULL AND next_try <= ? "
            "ORDER BY next_try LIMIT ?",
            (time.time(), limit),
        ).fetchall()
        return [Outgoing(uri, rkey, json.loads(rec), attempts) for uri, rkey, rec, attempts in rows]

    @translated
    def next_due_in(self) -> float | None:
        row = self.db.execute("SELECT min(next_try) FROM outbox WHERE written_at IS NULL").fetchone()
        return None if row[0] is None else max(0.0, row[0] - time.time())

    @translated
    def written(self, *invocation_uris: str) -> None:
        """These results are on the PDS: one transaction for a whole batch (one sync, not one each)."""
        now = time.time()
        with self._tx():
            self.db.executemany("UPDATE outbox SET written_at = ? WHERE invocation_uri = ?", [(now, u) for u in invocation_uris])

    @translated
    def outbox_figures(self) -> tuple[int, float | None]:
        """How many results wait to be written, and how long the oldest has waited (seconds)."""
        count, oldest = self.db.execute(
            "SELECT count(*), min(i.finished_at) FROM outbox o JOIN invocations i ON i.uri = o.invocation_uri "
            "WHERE o.written_at IS NULL"
        ).fetchone()
        return count, (None if oldest is None else max(0.0, time.time() - oldest))

    @translated
    def unqueue_result(self, invocation_uri: str) -> None:
        """Take a result off the outbox for good (it is in quarantine now: atrund.quarantine)."""
        self.db.execute("DELETE FROM outbox WHERE invocation_uri = ? AND written_at IS NULL", (invocation_uri,))

    @translated
    def requeue_result(self, invocation_uri: str, rkey: str, record: dict[str, Any]) -> None:
        """Put a result back on the outbox, due now (an operator's ``atrund quarantine retry``)."""
        self._queue(invocation_uri, rkey, record, time.time())

    def _queue(self, invocation_uri: str, rkey: str, record: dict[str, Any], now: float) -> None:
        """A result on the outbox, due now, in place of any earlier one (attempts, error and
        written time start again)."""
        self.db.execute(
            "INSERT INTO outbox(invocation_uri, rkey, record, next_try) VALUES (?,?,?,?) "
            "ON CONFLICT (invocation_uri) DO UPDATE SET rkey = excluded.rkey, record = excluded.record, "
            "next_try = excluded.next_try, attempts = 0, last_error = NULL, written_at = NULL",
            (invocation_uri, rkey, json.dumps(record), now),
        )

    @translated
    def retry_later(self, invocation_uri: str, error: str, delay: float, record: dict[str, Any] | None = None) -> None:
        if record is None:
            self.db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_try = ?, last_error = ? WHERE invocation_uri = ?",
                (time.time() + delay, error, invocation_uri),
            )
        else:
            self.db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_try = ?, last_error = ?, record = ? WHERE invocation_uri = ?",
                (time.time() + delay, error, json.dumps(record), invocation_uri),
            )

    # -- logs ----------------------------------------------------------------------------

    @translated
    def keep_logs(self, entries: list[LogEntry]) -> None:
        """A batch of entries, in one transaction."""
        with self._tx():
            self.db.executemany(
                "INSERT INTO logs(id, bundle, invoker, kind, at, status, error, output) VALUES (?,?,?,?,?,?,?,?)",
                [(e.id, e.bundle, e.invoker, e.kind, e.at, e.status, e.error, e.output) for e in entries])

    @translated
    def logs(self, *, id: str | None = None, bundle: str | None = None, after: int | None = None,
             limit: int = 50) -> list[LogEntry]:
        """The entries of one run (``id``) or of one bundle, oldest first: those kept after the
        cursor ``after``, or without one the newest ``limit``."""
        where, arg = ("id = ?", id) if id is not None else ("bundle = ?", bundle)
        columns = "id, bundle, invoker, kind, at, status, error, output, seq"
        if after is None:
            rows = self.db.execute(f"SELECT {columns} FROM logs WHERE {where} ORDER BY seq DESC LIMIT ?", (arg, limit)).fetchall()
            rows.reverse()
        else:
            rows = self.db.execute(f"SELECT {columns} FROM logs WHERE {where} AND seq > ? ORDER BY seq LIMIT ?",
                                   (arg, after, limit)).fetchall()
        return [LogEntry(*row) for row in rows]

    @translated
    def forget_logs(self, before: float, keep: int) -> int:
        """Delete entries older than ``before``, and all but the newest ``keep``; how many went."""
        with self._tx():
            gone = self.db.execute("DELETE FROM logs WHERE at < ?", (before,)).rowcount
            gone += self.db.execute("DELETE FROM logs WHERE seq <= (SELECT max(seq) FROM logs) - ?", (keep,)).rowcount
        return gone

    # -- helpers -------------------------------------------------------------------------

    def _tx(self):
        return _Transaction(self.db)


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound)."""
    while prefix and prefix[-1] == "\U0010ffff":
        prefix = prefix[:-1]
    if not prefix:
        return None
    following = ord(prefix[-1]) + 1
    return prefix[:-1] + chr(0xE000 if 0xD800 <= following <= 0xDFFF else following)  # surrogates are no keys' code points


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:  # a failed BEGIN or COMMIT may have ended it already
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the first error is the one worth reporting
