"""Quarantine: items the runner could not process, kept for an operator instead of retried forever.

A loop that reads remote input must never be stopped, for good, by one item: a firehose frame
that cannot be processed, a listed record that breaks the poller, a result the PDS refuses even
as an error result. Such an item is moved here with the reason and the time, the loop moves on
(the cursor passes it, the outbox forgets it), and ``atrund quarantine list|retry|drop`` lets an
operator look at it, put it back, or drop it. This is a dead-letter queue, as Cloudflare Queues
and SQS have, and as indigo's firehose consumer keeps for repos that fail to validate.

Kinds and what "retry" does (the running daemon applies a retry within a few seconds, or at its
next start):

    result      a result record not written: back onto the outbox, written as it is
    frame       a firehose frame (base64) not processed: processed again, as if just received
    record      a listed invocation record the poller could not take: taken again

Its own SQLite file beside the state database, in rollback-journal mode (no memory-mapped index):
the operator's command opens it while the runner runs (the state database is private to the
runner), and it is written rarely.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atrund.errors import QuarantineError

KINDS = ("result", "frame", "record")
MAX_ITEM_BYTES = 4 * 1024 * 1024  # what is kept of one item (a frame is at most 8 MiB; the rest is said, not kept)

SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind      TEXT NOT NULL,          -- result | frame | record
    key       TEXT NOT NULL,          -- what it is about: an invocation URI, a firehose seq
    item      TEXT NOT NULL,          -- JSON: what is needed to retry it
    reason    TEXT NOT NULL,
    attempts  INTEGER NOT NULL,
    at        REAL NOT NULL,
    retry     INTEGER NOT NULL DEFAULT 0   -- an operator asked for a retry; the daemon takes it
);
"""


@dataclass(frozen=True)
class Held:
    id: int
    kind: str
    key: str
    item: Any
    reason: str
    attempts: int
    at: float

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "key": self.key, "reason": self.reason, "attempts": self.attempts,
                "quarantinedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))}


class Quarantine:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=5)
            self.db.execute("PRAGMA journal_mode=DELETE")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise QuarantineError(f"cannot open the quarantine at {path}: {e}") from e
        self.path = path

    def close(self) -> None:
        self.db.close()

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, args)
        except sqlite3.Error as e:
            raise QuarantineError(f"the quarantine at {self.path} failed: {e}") from e

    def add(self, kind: str, key: str, item: Any, reason: str, attempts: int = 1) -> int:
        assert kind in KINDS, kind
        text = json.dumps(item, ensure_ascii=True)
        if len(text) > MAX_ITEM_BYTES:
            text = json.dumps({"truncated": True, "bytes": len(text)})
        cur = self._run("INSERT INTO quarantine(kind, key, item, reason, attempts, at) VALUES (?,?,?,?,?,?)",
                        (kind, key, text, reason[:2000], attempts, time.time()))
        return int(cur.lastrowid)

    def list(self, kind: str | None = None) -> list[Held]:
        rows = self._run("SELECT id, kind, key, item, reason, attempts, at FROM quarantine "
                         + ("WHERE kind = ? " if kind else "") + "ORDER BY id", (kind,) if kind else ()).fetchall()
        return [Held(i, k, key, json.loads(item), reason, attempts, at) for i, k, key, item, reason, attempts, at in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._run("SELECT kind, count(*) FROM quarantine GROUP BY kind").fetchall())

    def ask_retry(self, ids: list[int] | None) -> int:
        """Mark items (all if ``ids`` is None) to be taken back by the daemon; returns how many."""
        if ids is None:
            return self._run("UPDATE quarantine SET retry = 1").rowcount
        return sum(self._run("UPDATE quarantine SET retry = 1 WHERE id = ?", (i,)).rowcount for i in ids)

    def drop(self, ids: list[int] | None) -> int:
        if ids is None:
            return self._run("DELETE FROM quarantine").rowcount
        return sum(self._run("DELETE FROM quarantine WHERE id = ?", (i,)).rowcount for i in ids)

    def take_retries(self, limit: int = 1000) -> list[Held]:
        """Items an operator asked to retry (at most ``limit``), removed from the quarantine: the
        caller retries them, and puts back (``add``) one that fails again or that it could not try."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            rows = self.db.execute("SELECT id, kind, key, item, reason, attempts, at FROM quarantine WHERE retry = 1 "
                                   "ORDER BY id LIMIT ?", (limit,)).fetchall()
            self.db.executemany("DELETE FROM quarantine WHERE id = ?", [(row[0],) for row in rows])
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise QuarantineError(f"the quarantine at {self.path} failed: {e}") from e
        return [Held(i, k, key, json.loads(item), reason, attempts, at) for i, k, key, item, reason, attempts, at in rows]
