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
and the callers expect them to return before the next one). Claims are plain SQL on the tables
below: no queue library keeps our per-author order, our fairness and our at-most-once claim
together, and the scheduler (atrund.schedule) already owns order and fairness.

Replicas: any number of runners may share one database. Each names itself (``replicas``, a
heartbeat every HEARTBEAT seconds) and every invocation row says which replica queued or claimed
it. A replica silent for LEASE seconds (killed, cut off) is presumed dead: another replica adopts
its rows in one UPDATE (``take_over``), records each running one as interrupted (it is never run
again) and queues the pending ones. One replica at a time ingests (``lead``: an advisory lock).
A trigger assigns each new invocation to one executing replica, by author (migration 3: to the
replica holding the author's open work; an author with nothing open goes to a replica hot for
the bundle while it keeps up, migration 7, told by ``heartbeat``, else to the one with the least
open work, migration 8), and its NOTIFY wakes that replica (``assigned``, ``wait_for_work``). Due results are claimed with
``FOR UPDATE SKIP LOCKED`` so that two writers never take the same one. docs/scaling.md says
what this gives an operator.

The schema is versioned (``MIGRATIONS``, recorded in ``schema_migrations``): every open brings a
database up to date, and so does ``atrund state migrate``; a database newer than this atrund is
refused rather than misread. Migrations take a transaction-scoped advisory lock, so runners
starting together apply each one once.

psycopg's exceptions become ``StoreError`` in atrund.state's one translator. A connection that
broke (Postgres restarted, the network dropped) is closed there and opened again at the next
call: the caller holds what it could not store and tries again, as with SQLite.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import socket
import time
from collections.abc import Sequence

import psycopg
from psycopg.conninfo import conninfo_to_dict

from atrund.errors import StateConflict, StoreError
from atrund.state import BundleWrites, Outgoing, State, Stored, translated

# Advisory lock keys (pg_advisory_lock(int, int)): one class for atrund, one key per purpose.
LOCK_CLASS = 0x61747275  # "atru"
MIGRATE_LOCK = 1
INGEST_LOCK = 2  # held by the one replica that ingests (``lead``)

# (version, what it does, SQL), in order. Append only: a version once released is never edited.
# Text keys compare bytewise (COLLATE "C"), as in SQLite: drop_standing selects a schedule's runs
# by range. Versions may have gaps while work on them lands apart (``migrate`` applies each one a
# database lacks, not only those above its newest).
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
    (2, "replicas: heartbeats, and who queued or runs each invocation", """
CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,              -- host-pid-random, new at every start
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
-- The replica that stored a pending invocation (and queued it) or claimed it: each session
-- names itself in the atrund.replica setting, so State's statements need not know.
ALTER TABLE invocations ADD COLUMN replica TEXT DEFAULT current_setting('atrund.replica', true);
CREATE INDEX invocations_open ON invocations(replica) WHERE state IN ('pending', 'running');
"""),
    (3, "roles, and each new invocation assigned to one executing replica (by author) with a NOTIFY", """
ALTER TABLE replicas ADD COLUMN roles TEXT NOT NULL DEFAULT 'ingest,execute,gateway';
CREATE INDEX invocations_author_open ON invocations(author) WHERE state IN ('pending', 'running');
-- An author's new invocation goes to the live executing replica that already holds one of its
-- open invocations (so one replica's scheduler keeps that author's order, concurrency and rate),
-- else to one picked by a hash of the author; with none alive, it stays with the replica that
-- stored it until one takes it over. The NOTIFY (sent at commit) wakes the owner.
CREATE FUNCTION atrund_assign() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    live TEXT[];
    holder TEXT;
BEGIN
    IF NEW.state <> 'pending' THEN
        RETURN NEW;
    END IF;
    SELECT array_agg(id ORDER BY id) INTO live FROM replicas
     WHERE 'execute' = ANY(string_to_array(roles, ',')) AND heartbeat_at > clock_timestamp() - interval '10 seconds';
    IF live IS NOT NULL THEN
        SELECT replica INTO holder FROM invocations
         WHERE author = NEW.author AND state IN ('pending', 'running') AND replica = ANY(live) LIMIT 1;
        NEW.replica := coalesce(holder, live[1 + (hashtext(NEW.author) & 2147483647) % array_length(live, 1)]);
    END IF;
    PERFORM pg_notify('atrund_work', coalesce(NEW.replica, ''));
    RETURN NEW;
END $$;
CREATE TRIGGER invocations_assign BEFORE INSERT ON invocations FOR EACH ROW EXECUTE FUNCTION atrund_assign();
"""),
    (4, "logs: what runs printed (atrund.logbook)", """
CREATE TABLE logs (
    seq      BIGSERIAL PRIMARY KEY,              -- the order entries were kept: a tail's cursor
    id       TEXT NOT NULL,                      -- an invocation's URI (or tick/firing key), or a request id
    bundle   TEXT NOT NULL,
    invoker  TEXT,
    kind     TEXT NOT NULL,                      -- record | schedule | trigger | xrpc | http
    at       DOUBLE PRECISION NOT NULL,
    status   TEXT NOT NULL,
    error    TEXT,
    output   TEXT
);
CREATE INDEX logs_id ON logs(id);
CREATE INDEX logs_bundle ON logs(bundle, seq);
CREATE INDEX logs_at ON logs(at);
"""),
    (5, "bundles' key-value state (atrund.kv)", """
CREATE TABLE bundle_state (
    author TEXT NOT NULL,                       -- the bundle author's DID
    bundle TEXT NOT NULL,                       -- the bundle record's rkey
    key    TEXT COLLATE "C" NOT NULL,           -- code point order, as SQLite's bytewise compare
    value  TEXT NOT NULL,                       -- JSON
    PRIMARY KEY (author, bundle, key)
);
"""),
    (6, "what replicas share: the access policy, used XRPC tokens, bundle-state namespace locks", """
-- `atrund access allow|deny` (atrund.access.StoredPolicy): one verdict per DID; ``seq`` moves at
-- every edit, so a replica sees a change by reading max(seq) (its once-a-second check).
CREATE SEQUENCE access_policy_seq;
CREATE TABLE access_policy (
    did     TEXT PRIMARY KEY,
    verdict TEXT NOT NULL CHECK (verdict IN ('allow', 'deny')),
    seq     BIGINT NOT NULL DEFAULT nextval('access_policy_seq')
);
-- Single-use service-auth tokens (atrund.atproto.serviceauth): a jti is refused once it is here,
-- whichever replica it was used on; a row goes once its token has expired.
CREATE TABLE used_tokens (
    jti     TEXT PRIMARY KEY,
    expires DOUBLE PRECISION NOT NULL
);
CREATE INDEX used_tokens_expires ON used_tokens(expires);
-- A bundle-state namespace's lock (atrund.kv), held by one run of the fleet: ``holder`` is that
-- run's token, checked (and the row deleted) in the transaction that commits its writes. A lock
-- whose replica is dead, or held past ``until``, may be taken by another run.
CREATE TABLE bundle_state_locks (
    author  TEXT NOT NULL,
    bundle  TEXT NOT NULL,
    holder  TEXT NOT NULL,
    replica TEXT NOT NULL,
    until   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (author, bundle)
);
"""),
    (7, "hot routing: an author with nothing open goes to a replica hot for the bundle, unless it lags", """
-- The bundle record CIDs a replica holds hot workers for (atrund.execute.pool), told with its
-- heartbeats and whenever one becomes hot; empty when it keeps them to itself (runner.hot_affinity).
ALTER TABLE replicas ADD COLUMN hot TEXT[] NOT NULL DEFAULT '{}';
CREATE INDEX invocations_waiting ON invocations(replica, seen_at) WHERE state = 'pending';
-- Migration 3's assignment, with one step between "the replica holding the author's open work"
-- and "a hash of the author": a live executing replica hot for the invocation's bundle, if it
-- keeps up (nothing of its has waited more than a second, by the clock that stored them). An
-- author's invocations still go to one replica at a time, so order and limits hold; a hot
-- replica that lags gets no more new authors, which go where the hash puts them.
CREATE OR REPLACE FUNCTION atrund_assign() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    live TEXT[];
    warm TEXT[];
    holder TEXT;
BEGIN
    IF NEW.state <> 'pending' THEN
        RETURN NEW;
    END IF;
    SELECT array_agg(id ORDER BY id) INTO live FROM replicas
     WHERE 'execute' = ANY(string_to_array(roles, ',')) AND heartbeat_at > clock_timestamp() - interval '10 seconds';
    IF live IS NOT NULL THEN
        SELECT replica INTO holder FROM invocations
         WHERE author = NEW.author AND state IN ('pending', 'running') AND replica = ANY(live) LIMIT 1;
        IF holder IS NULL THEN
            SELECT array_agg(r.id ORDER BY r.id) INTO warm FROM replicas r
             WHERE r.id = ANY(live) AND (NEW.value::jsonb -> 'bundle' ->> 'cid') = ANY(r.hot)
               AND NOT EXISTS (SELECT 1 FROM invocations w WHERE w.replica = r.id AND w.state = 'pending'
                                AND w.seen_at < NEW.seen_at - 1.0);
            holder := coalesce(warm[1 + (hashtext(NEW.author) & 2147483647) % array_length(warm, 1)],
                               live[1 + (hashtext(NEW.author) & 2147483647) % array_length(live, 1)]);
        END IF;
        NEW.replica := holder;
    END IF;
    PERFORM pg_notify('atrund_work', coalesce(NEW.replica, ''));
    RETURN NEW;
END $$;
"""),
    (8, "even assignment: an author with nothing open goes to the replica with the least open work", """
-- Migration 7's assignment with its last step changed: an author with nothing open, whose bundle
-- no keeping-up replica is hot for, goes to the live executing replica holding the fewest open
-- (pending or running) invocations, ties broken by the hash of the author (the replica the hash
-- picks, then the next ones in id order). The bare hash left shares uneven (12 authors over 3
-- replicas: 6/4/2, and a replica with 2 authors of per-author concurrency 1 fills 2 of its
-- slots); a replica already given a flood gets no new authors while another has less.
CREATE OR REPLACE FUNCTION atrund_assign() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    live TEXT[];
    warm TEXT[];
    holder TEXT;
    size INTEGER;
    slot INTEGER;
BEGIN
    IF NEW.state <> 'pending' THEN
        RETURN NEW;
    END IF;
    SELECT array_agg(id ORDER BY id) INTO live FROM replicas
     WHERE 'execute' = ANY(string_to_array(roles, ',')) AND heartbeat_at > clock_timestamp() - interval '10 seconds';
    IF live IS NOT NULL THEN
        size := array_length(live, 1);
        slot := (hashtext(NEW.author) & 2147483647) % size;
        SELECT replica INTO holder FROM invocations
         WHERE author = NEW.author AND state IN ('pending', 'running') AND replica = ANY(live) LIMIT 1;
        IF holder IS NULL THEN
            SELECT array_agg(r.id ORDER BY r.id) INTO warm FROM replicas r
             WHERE r.id = ANY(live) AND (NEW.value::jsonb -> 'bundle' ->> 'cid') = ANY(r.hot)
               AND NOT EXISTS (SELECT 1 FROM invocations w WHERE w.replica = r.id AND w.state = 'pending'
                                AND w.seen_at < NEW.seen_at - 1.0);
            holder := warm[1 + (hashtext(NEW.author) & 2147483647) % array_length(warm, 1)];
        END IF;
        IF holder IS NULL THEN
            SELECT l.id INTO holder FROM unnest(live) WITH ORDINALITY AS l(id, n)
             ORDER BY (SELECT count(*) FROM invocations i WHERE i.replica = l.id AND i.state IN ('pending', 'running')),
                      (l.n - 1 - slot + size) % size
             LIMIT 1;
        END IF;
        NEW.replica := holder;
    END IF;
    PERFORM pg_notify('atrund_work', coalesce(NEW.replica, ''));
    RETURN NEW;
END $$;
"""),
]
LATEST = MIGRATIONS[-1][0]
ROLES = ("ingest", "execute", "gateway")
WORK_POLL = 2.0  # seconds an executing replica waits for a NOTIFY before it looks for work anyway
LEAD_CHECK = 1.0  # seconds between a standby's tries to take ingest leadership (failover within ~1 s)
LEASE = 10.0  # seconds without a heartbeat after which a replica's invocations are taken over (and migrations 3, 7 and 8's)
AFFINITY_WAIT = 1.0  # seconds a hot replica's oldest waiting invocation may wait before new authors go elsewhere (migration 7's)
HEARTBEAT = 2.0  # seconds between heartbeats (and looks for what a dead replica left)
OUTBOX_CLAIM = 30.0  # seconds a replica holds due results while it writes them
TOKEN_PRUNE = 30.0  # seconds between deletions of expired used tokens (per replica)
CLOCK_MARGIN = 60.0  # seconds a used token is kept past its last acceptable moment: replicas' clocks differ a little


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
        applied = {v for (v,) in db.execute("SELECT version FROM schema_migrations")}
        before = max(applied, default=0)
        unknown = applied - {version for version, _, _ in MIGRATIONS}
        if unknown:
            what = "newer than this atrund knows" if max(unknown) > LATEST else "which this atrund does not know"
            raise StoreError(f"the state database has schema version {max(unknown)}, {what} (it knows up to {LATEST}); "
                             "run the newer atrund, or restore a backup taken before it migrated")
        for version, description, sql in MIGRATIONS:
            if version not in applied:
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


def fleet(db: psycopg.Connection, me: str | None = None) -> dict:
    """The replicas (roles, heartbeat age, who leads ingest, what each holds) and the queue depth
    per author: ``atrund status -c`` and /healthz. Read-only: reading it joins no fleet."""
    leader = db.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.granted", (LOCK_CLASS, INGEST_LOCK)).fetchone()
    rows = db.execute(
        "SELECT r.id, r.host, r.pid, r.roles, extract(epoch FROM clock_timestamp() - r.heartbeat_at), "
        "count(i.uri) FILTER (WHERE i.state = 'running'), count(i.uri) FILTER (WHERE i.state = 'pending') "
        "FROM replicas r LEFT JOIN invocations i ON i.replica = r.id AND i.state IN ('pending', 'running') "
        "GROUP BY r.id ORDER BY r.started_at").fetchall()
    replicas = [{"replica": rid, "host": host, "pid": pid, "roles": roles.split(","), "heartbeat_age_s": round(float(age), 1),
                 "alive": float(age) < LEASE, "ingest_leader": leader is not None and leader[0] == f"atrund {rid}"[:63],
                 "running": running, "pending": pending, **({"self": True} if rid == me else {})}
                for rid, host, pid, roles, age, running, pending in rows]
    queues = [{"author": author, "pending": pending, "running": running} for author, pending, running in db.execute(
        "SELECT author, count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'running') "
        "FROM invocations WHERE state IN ('pending', 'running') GROUP BY author ORDER BY 2 DESC, author")]
    return {"replicas": replicas, "queues": queues}


def fleet_of(url: str) -> dict:
    """``fleet`` of the database at ``url``, on a connection of its own."""
    try:
        with connect(url) as db:
            return fleet(db)
    except psycopg.Error as e:
        raise StoreError(f"cannot read the fleet from the {where(url)}: {type(e).__name__}: {e}") from e


# -- the access policy (migration 6): what `atrund access` edits, one verdict per DID ----------

def policy_stamp(db: psycopg.Connection) -> int:
    """What changes at every edit of the policy (the largest ``seq``): a replica re-reads the
    entries only when it moved."""
    return db.execute("SELECT coalesce(max(seq), 0) FROM access_policy").fetchone()[0]


def policy_entries(db: psycopg.Connection) -> tuple[list[str], list[str]]:
    """The allowed DIDs and the denied DIDs."""
    rows = db.execute("SELECT did, verdict FROM access_policy ORDER BY did").fetchall()
    return [did for did, verdict in rows if verdict == "allow"], [did for did, verdict in rows if verdict == "deny"]


def set_policy(db: psycopg.Connection, did: str, verdict: str) -> None:
    """``did`` is allowed or denied from now on (in place of its earlier verdict)."""
    db.execute("INSERT INTO access_policy(did, verdict) VALUES (%s, %s) "
               "ON CONFLICT (did) DO UPDATE SET verdict = excluded.verdict, seq = excluded.seq", (did, verdict))


class PolicyAt:
    """The access policy in the database at ``url``, for operators' commands (`atrund access
    allow|deny|list`, `check-config`): a connection of its own per call, which joins no fleet.
    An edit first brings the database up to date, as ``serve`` does; a read of a database that
    has no policy yet (not migrated) finds no entries. psycopg's errors become StoreError naming
    the database."""

    def __init__(self, url: str) -> None:
        self.url = url

    def policy_stamp(self) -> int:
        return self._read(policy_stamp, 0)

    def policy_entries(self) -> tuple[list[str], list[str]]:
        return self._read(policy_entries, ([], []))

    def _read(self, fn, empty):
        try:
            with connect(self.url) as db:
                return fn(db)
        except psycopg.errors.UndefinedTable:  # not migrated yet: no policy entries
            return empty
        except psycopg.Error as e:
            raise StoreError(f"cannot read the access policy in the {where(self.url)}: {type(e).__name__}: {e}") from e

    def set_policy(self, did: str, verdict: str) -> None:
        try:
            with connect(self.url) as db:
                migrate(db)
                set_policy(db, did, verdict)
        except psycopg.Error as e:
            raise StoreError(f"cannot change the access policy in the {where(self.url)}: {type(e).__name__}: {e}") from e


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
    """The Postgres store (an atrund.state ``Store``): State's methods on a Postgres connection,
    shared by replicas (see "Replicas" above)."""

    ERRORS = (psycopg.Error,)
    shared = True

    def __init__(self, url: str, lease: float = LEASE, roles: tuple[str, ...] | list[str] = ROLES) -> None:
        # not State's __init__: no file, no flock
        self.url = url
        self.lease = lease
        self.roles = tuple(roles)
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.failing: str | None = None
        self._db: _Connection | None = None
        self._lead: psycopg.Connection | None = None  # the ingest lock's own connection (``lead``)
        self._leading = False
        self._beaten: float | None = None  # time.monotonic() of the last heartbeat
        self._listen: psycopg.AsyncConnection | None = None  # LISTEN atrund_work (``wait_for_work``)
        self._live: dict[str, int] = {}  # live replicas per role, this one included, as of the last heartbeat
        self._tokens_since = 0.0  # when the fleet began to remember used tokens (migration 6 applied)
        self._tokens_pruned = 0.0
        try:
            self._open()
        except psycopg.Error as e:
            raise StoreError(f"cannot open the {where(url)}: {type(e).__name__}: {e}") from e

    def _open(self) -> _Connection:
        """Connect, migrate and name this replica (in the session and in ``replicas``); on any
        failure nothing stays open."""
        self._db = _Connection(connect(self.url))
        try:
            migrate(self._db.raw)
            self._tokens_since = float(self._db.execute(
                "SELECT extract(epoch FROM applied_at) FROM schema_migrations WHERE version = 6").fetchone()[0])
            self._db.execute("SELECT set_config('atrund.replica', ?, false)", (self.replica,))
            self._beat()
        except BaseException:
            self._drop()
            raise
        return self._db

    @property
    def db(self) -> _Connection:
        """The connection, opened again after it broke."""
        if self._db is None or self._db.raw.closed:
            return self._open()
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
        """A clean stop: this replica leaves the fleet, so what it leaves pending is taken over
        at the other replicas' next look rather than after the lease."""
        try:
            if self._db is not None and not self._db.raw.closed:
                self._db.execute("DELETE FROM replicas WHERE id = ?", (self.replica,))
        except psycopg.Error:
            pass  # then the lease runs out instead
        self._drop()
        self._resign()
        if self._listen is not None and not self._listen.closed:
            # the async connection's socket, closed without its event loop (close() runs after it)
            self._listen.pgconn.finish()
        self._listen = None

    def _tx(self):
        return self.db.raw.transaction()

    # -- replicas ------------------------------------------------------------------------

    def _beat(self, hot: Sequence[str] = ()) -> None:
        self.db.execute("INSERT INTO replicas(id, host, pid, roles, hot) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET heartbeat_at = clock_timestamp(), hot = excluded.hot",
                        (self.replica, socket.gethostname(), os.getpid(), ",".join(self.roles), list(hot)))

    @translated
    def heartbeat(self, hot: Sequence[str] = ()) -> None:
        """This replica is alive (every HEARTBEAT seconds; Postgres's clock, not ours), and holds
        hot workers for the bundles (record CIDs) ``hot`` lists: migration 7 sends new authors'
        work for them here while it keeps up. Also counts the live replicas of each role
        (``replicas_with``)."""
        self._beat(hot)
        self._beaten = time.monotonic()
        live: dict[str, int] = {}
        for (roles,) in self.db.execute("SELECT roles FROM replicas WHERE heartbeat_at > clock_timestamp() - "
                                        "make_interval(secs => ?)", (self.lease,)):
            for role in roles.split(","):
                live[role] = live.get(role, 0) + 1
        self._live = live

    def replicas_with(self, role: str) -> int:
        """Live replicas with ``role``, as of the last heartbeat (at least 1: this one). No round
        trip: the gateway asks at every request (its per-replica share of the rate)."""
        return max(1, self._live.get(role, 0))

    def figures(self) -> dict:
        """/healthz's ``replica``: who this is, whether it leads ingest, how fresh its lease is,
        and one round trip to Postgres (None: it did not answer)."""
        try:
            began = time.monotonic()
            self.db.execute("SELECT 1")
            rtt = round((time.monotonic() - began) * 1000, 2)
        except psycopg.Error:
            rtt = None
        return {"id": self.replica, "roles": list(self.roles), "ingestLeader": self._leading,
                "leaseAgeSeconds": None if self._beaten is None else round(time.monotonic() - self._beaten, 3),
                "leaseSeconds": self.lease, "postgresRoundTripMs": rtt}

    def lead(self) -> bool:
        """Hold, or try to take, ingest leadership: one replica at a time ingests (polls, follows
        the firehose), elected by a session advisory lock on a connection of its own, so that
        the lock lives exactly as long as that connection. A leader that dies loses its session
        and so the lock; a standby's next try (every LEAD_CHECK) takes it and resumes from the
        stored cursors. A leader cut off by the network keeps its session, as Postgres sees it,
        until TCP gives up (hours without keepalives): once its lease has lapsed (presumed dead,
        its work taken over), a standby ends that session (``_depose``) and leads. False on any
        fault: not leading is the safe answer."""
        try:
            if self._lead is None or self._lead.closed:
                self._lead = psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                                             application_name=f"atrund {self.replica}"[:63])
                self._leading = False
            if self._leading:
                self._lead.execute("SELECT 1")  # still connected: still the holder
            else:
                self._leading = self._lead.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                                   (LOCK_CLASS, INGEST_LOCK)).fetchone()[0]
                if not self._leading:
                    self._depose()
            return self._leading
        except psycopg.Error:
            self._resign()
            return False

    def _depose(self) -> None:
        """End the session holding the ingest lock if no live replica owns it (its lease lapsed:
        a leader cut off whose session Postgres still keeps); the next try takes the lock. A
        deposed leader that comes back finds its lead connection closed and stands by."""
        self._lead.execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.granted AND NOT EXISTS "
            "(SELECT 1 FROM replicas r WHERE a.application_name = left('atrund ' || r.id, 63) "
            "AND r.heartbeat_at > clock_timestamp() - make_interval(secs => %s))", (LOCK_CLASS, INGEST_LOCK, self.lease))

    def _resign(self) -> None:
        if self._lead is not None:
            try:
                self._lead.close()  # the lock goes with the session
            except psycopg.Error:
                pass
            self._lead = None
        self._leading = False

    @translated
    def take_over(self) -> tuple[list[Stored], list[Stored]]:
        """Adopt what replicas without a heartbeat for ``lease`` seconds (or stopped) left: their
        running invocations (to be recorded as interrupted: never run again) and, if this
        replica executes, their pending ones and those held by a live replica that does not
        execute (to be queued here). One UPDATE: a row another replica adopts first is re-read
        after its lock, finds a live owner, and is not taken twice."""
        with self._tx():
            rows = self.db.execute(
                "UPDATE invocations i SET replica = ? WHERE state IN ('pending', 'running') AND replica IS DISTINCT FROM ? "
                "AND (state = 'running' OR ?) AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = i.replica "
                "AND r.heartbeat_at > clock_timestamp() - make_interval(secs => ?) "
                "AND (i.state = 'running' OR 'execute' = ANY(string_to_array(r.roles, ',')))) "
                "RETURNING uri, author, cid, value, seen_at, state",
                (self.replica, self.replica, "execute" in self.roles, self.lease)).fetchall()
            # the dead leave the fleet (atrund status) with nothing left to their name
            self.db.execute("DELETE FROM replicas WHERE id <> ? AND heartbeat_at <= clock_timestamp() - make_interval(secs => ?)",
                            (self.replica, self.lease))
        rows.sort(key=lambda row: row[4])
        running = [Stored(u, a, c, json.loads(v), t) for u, a, c, v, t, state in rows if state == "running"]
        pending = [Stored(u, a, c, json.loads(v), t) for u, a, c, v, t, state in rows if state == "pending"]
        return running, pending

    @translated
    def assigned(self) -> list[str]:
        """The pending invocations assigned to this replica (by migration 3's trigger, or taken
        over), oldest first: the executing replica queues those it has not queued yet."""
        return [uri for (uri,) in self.db.execute(
            "SELECT uri FROM invocations WHERE replica = ? AND state = 'pending' ORDER BY seen_at", (self.replica,))]

    async def wait_for_work(self, timeout: float) -> None:
        """Return at the next NOTIFY of new work for anyone (or after ``timeout``): LISTEN on an
        async connection of its own. A connection fault is a plain wait (the caller looks
        anyway, every ``timeout``); the next call connects again."""
        try:
            if self._listen is None or self._listen.closed:
                self._listen = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5)
                await self._listen.execute("LISTEN atrund_work")
            async for _ in self._listen.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error:
            if self._listen is not None:
                await self._listen.close()
            self._listen = None
            await asyncio.sleep(timeout)

    # -- what replicas share (migration 6) ------------------------------------------------

    @translated
    def policy_stamp(self) -> int:
        return policy_stamp(self.db.raw)

    @translated
    def policy_entries(self) -> tuple[list[str], list[str]]:
        return policy_entries(self.db.raw)

    @translated
    def set_policy(self, did: str, verdict: str) -> None:
        set_policy(self.db.raw, did, verdict)

    def tokens_since(self) -> float:
        """Tokens issued before this may have been used where the fleet did not remember them
        (before migration 6): they are refused."""
        return self._tokens_since

    @translated
    def use_token(self, jti: str, until: float) -> bool:
        """Use a single-use token's ``jti`` (acceptable until ``until``); False if any replica used
        it before. Rows past their time (and CLOCK_MARGIN) are deleted every TOKEN_PRUNE seconds."""
        now = time.time()
        if now - self._tokens_pruned > TOKEN_PRUNE:
            self._tokens_pruned = now
            self.db.execute("DELETE FROM used_tokens WHERE expires < ?", (now - CLOCK_MARGIN,))
        cur = self.db.execute("INSERT INTO used_tokens(jti, expires) VALUES (?, ?) ON CONFLICT (jti) DO NOTHING", (jti, until))
        return cur.rowcount == 1

    @translated
    def hold_namespace(self, author: str, bundle: str, holder: str, seconds: float) -> bool:
        """Take a bundle-state namespace's lock for the run ``holder`` names, for at most
        ``seconds``; False if another run of the fleet holds it (its replica alive, its time not
        up). The caller tries again while its run may wait (atrund.kv)."""
        cur = self.db.execute(
            "INSERT INTO bundle_state_locks(author, bundle, holder, replica, until) "
            "VALUES (?, ?, ?, ?, clock_timestamp() + make_interval(secs => ?)) "
            "ON CONFLICT (author, bundle) DO UPDATE SET holder = excluded.holder, replica = excluded.replica, "
            "until = excluded.until WHERE bundle_state_locks.until < clock_timestamp() OR NOT EXISTS (SELECT 1 "
            "FROM replicas r WHERE r.id = bundle_state_locks.replica AND r.heartbeat_at > clock_timestamp() - "
            "make_interval(secs => ?))", (author, bundle, holder, self.replica, seconds, self.lease))
        return cur.rowcount == 1

    @translated
    def free_namespace(self, author: str, bundle: str, holder: str) -> None:
        """Let the lock go, if ``holder`` still holds it (a run that commits nothing)."""
        self.db.execute("DELETE FROM bundle_state_locks WHERE author = ? AND bundle = ? AND holder = ?", (author, bundle, holder))

    def _apply(self, writes: BundleWrites) -> None:
        """The version check: writes commit only if their run still holds the namespace's lock,
        which goes in the same transaction. A run whose lock was taken (its replica presumed dead,
        or past its time) may have read what another run has changed since: StateConflict, and
        nothing of the transaction commits."""
        if writes.holder is not None:
            cur = self.db.execute("DELETE FROM bundle_state_locks WHERE author = ? AND bundle = ? AND holder = ?",
                                  (writes.author, writes.bundle, writes.holder))
            if cur.rowcount != 1:
                raise StateConflict(f"the state of bundle {writes.bundle} of {writes.author} was locked by another run "
                                    "before this one committed; its writes are not kept")
        super()._apply(writes)

    @translated
    def state_usage(self, author: str, bundle: str) -> tuple[int, int]:
        """As State's, in Postgres's words (octet_length: UTF-8 bytes)."""
        keys, size = self.db.execute(
            "SELECT count(*), coalesce(sum(octet_length(key) + octet_length(value)), 0) FROM bundle_state "
            "WHERE author = ? AND bundle = ?", (author, bundle)).fetchone()
        return keys, int(size)

    @translated
    def mark_running(self, uri: str) -> bool:
        """Claim a pending invocation, as this replica (whoever queued it)."""
        cur = self.db.execute("UPDATE invocations SET state = 'running', started_at = ?, replica = ? "
                              "WHERE uri = ? AND state = 'pending'", (time.time(), self.replica, uri))
        return cur.rowcount == 1

    @translated
    def due(self, limit: int = 50) -> list[Outgoing]:
        """Claim due results for OUTBOX_CLAIM seconds (SKIP LOCKED: replicas writing at once take
        different ones); ``written`` or ``retry_later`` settles each. A replica that dies holding
        some leaves them due again after the claim, and putRecord of the same record is harmless."""
        now = time.time()
        rows = self.db.execute(
            "UPDATE outbox SET next_try = ? WHERE invocation_uri IN (SELECT invocation_uri FROM outbox "
            "WHERE written_at IS NULL AND next_try <= ? ORDER BY next_try LIMIT ? FOR UPDATE SKIP LOCKED) "
            "RETURNING invocation_uri, rkey, record, attempts", (now + OUTBOX_CLAIM, now, limit)).fetchall()
        return [Outgoing(uri, rkey, json.loads(rec), attempts) for uri, rkey, rec, attempts in rows]

    @translated
    def fleet(self) -> dict:
        """The fleet as ``fleet`` reads it, this replica marked."""
        return fleet(self.db.raw, self.replica)
