"""Moving a runner from SQLite to Postgres: ``atrund state copy`` (docs/scaling.md).

A stopped SQLite runner's whole state goes into a Postgres database that holds none yet, in one
transaction: every table of atrund.state (invocations with their states, the ingest cursors, the
outbox, schedules and triggers, inactive accounts, logs, bundles' state) row for row, and the
access policy file's entries into migration 6's ``access_policy``. Nothing is translated: the
tables are the same on both backends (atrund.pgstate's migrations mirror atrund.state's schema),
so the replicas that open the database carry on where the runner stopped.

What makes "nothing waiting runs twice, nothing lost" true across the move:
- the source's flock is held for the whole copy, so no runner changes it meanwhile (a running
  runner is refused: StateLocked);
- the target must hold no state and no replica (CopyRefused), checked under the migrations'
  advisory lock in the copying transaction: a replica starting meanwhile waits for the commit
  and then finds the state there;
- pending rows are copied unassigned (no replica is alive during the copy): the first executing
  replica adopts them (PgState.take_over) and queues them once; a ``running`` row (a runner
  killed mid-run) is adopted the same way and recorded as interrupted, never run again, exactly
  as the SQLite runner would have at its next start; ``done`` rows stay done;
- after the commit a ``moved`` file in the state directory makes that directory refuse to open
  (StateMoved), so the old runner cannot be started again and run the same pending work.

A SQLite table this module does not know is refused rather than left behind (``TABLES``).
"""

from __future__ import annotations

import datetime
import sqlite3

import psycopg

from atrund.errors import CopyRefused, StoreError
from atrund.pgstate import LOCK_CLASS, MIGRATE_LOCK, connect, migrate, set_policy, where
from atrund.state import MOVED, State

# Every table atrund.state keeps, in the order they are copied.
TABLES = ("invocations", "outbox", "cursors", "inactive_accounts", "standing", "bundle_state", "logs")


def copy(source: State, url: str, allow: list[str], deny: list[str]) -> dict[str, int]:
    """Copy ``source`` (open: its lock held) and the policy entries into the database at ``url``,
    migrated first; returns the rows copied per table (and ``access_policy``). Then mark the
    source's directory moved."""
    tables = {name for (name,) in source.db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                                     "AND name NOT LIKE 'sqlite_%'")}
    if unknown := sorted(tables - set(TABLES)):
        raise CopyRefused(f"{source.path} has table {unknown[0]}, which this atrund does not know how to copy; "
                          "copy it with the atrund that made it")
    try:
        with connect(url) as db:
            try:
                migrate(db)
            except StoreError as e:  # a database newer than this atrund (a schema version mismatch)
                raise StoreError(f"cannot copy into the {where(url)}: {e}") from None
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, MIGRATE_LOCK))
                if held := _holding(db):
                    raise CopyRefused(f"the {where(url)} already holds atrund state (table {held} has rows)")
                copied = {table: _copy_table(source.db, db, table) for table in TABLES}
                db.execute("SELECT setval(pg_get_serial_sequence('logs', 'seq'), coalesce(max(seq), 0) + 1, false) FROM logs")
                for did in allow:
                    set_policy(db, did, "allow")
                for did in deny:  # after the allows: a DID in both is denied, as the file's lists mean
                    set_policy(db, did, "deny")
                copied["access_policy"] = len(set(allow) | set(deny))
    except psycopg.Error as e:
        raise StoreError(f"cannot copy into the {where(url)}: {type(e).__name__}: {e}") from e
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (source.path.parent / MOVED).write_text(f"copied into the {where(url)} at {stamp} by `atrund state copy`\n")
    return copied


def _holding(db: psycopg.Connection) -> str | None:
    """The first table of atrund's (besides the migrations' own) that has a row, or None."""
    names = [name for (name,) in db.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
        "AND table_type = 'BASE TABLE' AND table_name <> 'schema_migrations' ORDER BY table_name")]
    for name in names:
        if db.execute(f'SELECT EXISTS (SELECT 1 FROM "{name}")').fetchone()[0]:
            return name
    return None


def _copy_table(src: sqlite3.Connection, db: psycopg.Connection, table: str) -> int:
    """Every row of ``table``, every SQLite column by name (Postgres's own columns, such as the
    replica an invocation is assigned to, take their defaults); COPY, not one INSERT a row."""
    columns = ", ".join(row[1] for row in src.execute(f"PRAGMA table_info({table})"))
    count = 0
    with db.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as out:
        for row in src.execute(f"SELECT {columns} FROM {table}"):
            out.write_row(row)
            count += 1
    return count
