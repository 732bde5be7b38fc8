"""Bundles' durable key-value state: what a run reads and writes, and when it commits.

One namespace per bundle on this runner: (the bundle author's DID, the bundle record's rkey),
shared by every version (CID) of the bundle and by every way it runs (invocations, schedules,
triggers, the gateway, XRPC), whoever invoked it. The bundle's own code decides what its callers
may do with it (docs/threat-model.md).

A run's state calls arrive from its worker (atrund.execute.pool relays them, protocol §7.6) and
are answered by its ``Session``:
- reads see the committed state plus the run's own writes;
- writes are buffered in memory and reach the store only with the run's outcome: in the
  transaction that marks an invocation done and queues its result (State.finish), or, for a
  gateway or XRPC run, in a transaction of their own once it has answered. A run that fails,
  times out, crashes or is interrupted commits nothing;
- serialisable per namespace: a run takes its namespace's lock at its first state call and
  keeps it until its writes are committed (or dropped). Runs of one namespace that use state run
  their state-using parts one after another; runs that make no state call take no lock. With
  one lock per run there is no deadlock; a run waiting for the lock waits within its deadline;
- across replicas (a Postgres state they share) the lock is the fleet's: after this runner's
  own lock (which orders its runs without asking the store), a run takes the namespace's lock
  row in the store (``Store.hold_namespace``; tried again every few milliseconds while another
  replica's run holds it), and its commit checks that it still holds it and lets it go in the
  same transaction: a run whose lock was taken meanwhile (its replica presumed dead, or held
  past ``hold`` seconds) commits nothing (StateConflict). On SQLite the store has nothing to
  take: one runner per file, and its own lock is the whole lock. The lock is not fair across
  replicas: a run of another replica waits, within its deadline, for a free moment;
- quotas (config ``[bundle_state]``): a call past one fails inside the bundle
  (StateQuotaExceeded), and the run then fails and commits nothing, whatever the bundle does
  with the error.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import structlog

from atrund.atproto.uri import AtUri
from atrund.config import BundleStateSection
from atrund.errors import StoreError
from atrund.execute.protocol import StateCall, StateReply
from atrund.records import data_problem
from atrund.state import BundleWrites, Store

log = structlog.get_logger("atrund.kv")

MAX_KEY_BYTES = 512
DEFAULT_LIST = 100
QUOTA = "StateQuotaExceeded"
HOLD_RETRY = (0.002, 0.05)  # seconds between tries for a lock another replica holds: the first, the most


class BundleState:
    """The runner's side of every bundle's state: namespace locks, quotas, sessions."""

    def __init__(self, store: Store, quotas: BundleStateSection, hold: float = 360.0) -> None:
        """``hold``: seconds a run may hold a namespace's lock in a shared store at most (longer
        than any run may last): past it, a lock left by a stalled run may be taken."""
        self.store = store
        self.quotas = quotas
        self.hold = hold
        self._locks: dict[tuple[str, str], _Lock] = {}

    def session(self, bundle_uri: str) -> Session:
        """A run's view of the namespace of the bundle at ``bundle_uri``."""
        at = AtUri.parse(bundle_uri)
        return Session(self, at.did, at.rkey)

    def commit_alone(self, session: Session) -> None:
        """Commit a gateway or XRPC run's writes in a transaction of their own, then release its
        lock (also when the store fails: StoreError passes through)."""
        committed = False
        try:
            if (writes := session.writes()) is not None:
                self.store.commit_bundle_state(writes)
                committed = True
        finally:
            session.release(committed)

    def read(self, author: str, bundle: str, key: str | None = None, prefix: str = "", limit: int | None = DEFAULT_LIST,
             cursor: str | None = None) -> tuple[list[tuple[str, Any]], str | None]:
        """Committed entries of a namespace, for its author and its operator: the one ``key``, or
        those that start with ``prefix`` after ``cursor`` (at most ``limit``; None: all), and the
        cursor of the next page (None at the end). Values decoded from their JSON text."""
        if key is not None:
            text = self.store.state_value(author, bundle, key)
            return ([] if text is None else [(key, json.loads(text))]), None
        rows = self.store.state_keys(author, bundle, prefix, cursor, None if limit is None else limit + 1)
        more = limit is not None and len(rows) > limit
        rows = rows[:limit] if limit is not None else rows
        return [(k, json.loads(v)) for k, v in rows], (rows[-1][0] if more else None)

    async def _acquire(self, ns: tuple[str, str]) -> str:
        """Take the namespace's lock: this runner's, then the store's; returns the run's token
        (its ``holder`` in the store). Cancelled (its run's deadline), it holds neither."""
        lock = self._locks.get(ns)
        if lock is None:
            lock = self._locks[ns] = _Lock()
        lock.users += 1
        try:
            await lock.lock.acquire()
        except BaseException:
            self._leave(ns, lock)
            raise
        holder = secrets.token_hex(8)
        try:
            delay = HOLD_RETRY[0]
            while not self.store.hold_namespace(*ns, holder, self.hold):
                await asyncio.sleep(delay)
                delay = min(delay * 2, HOLD_RETRY[1])
        except BaseException:
            self._release(ns, None)
            raise
        return holder

    def _release(self, ns: tuple[str, str], holder: str | None) -> None:
        """Let the namespace go: the store's lock (unless ``holder`` is None: a commit let it go
        already, or it was never taken), then this runner's."""
        try:
            if holder is not None:
                self.store.free_namespace(*ns, holder)
        except StoreError as e:  # it is let go when its time is up, or its replica's lease
            log.warning("a bundle-state lock could not be let go; it lapses by itself", author=ns[0], bundle=ns[1],
                        error=str(e))
        finally:
            lock = self._locks[ns]
            lock.lock.release()
            self._leave(ns, lock)

    def _leave(self, ns: tuple[str, str], lock: _Lock) -> None:
        lock.users -= 1
        if lock.users == 0:
            del self._locks[ns]


@dataclass
class _Lock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting: the entry goes when none are left


class _Refused(Exception):
    """A state call fails inside the bundle with this message and error type."""

    def __init__(self, message: str, error_type: str = "StateError") -> None:
        super().__init__(message)
        self.error_type = error_type


class Session:
    """One run's state: its buffered writes, its count of calls, its hold on the namespace."""

    def __init__(self, owner: BundleState, author: str, bundle: str) -> None:
        self.owner = owner
        self.author, self.bundle = author, bundle
        self.buffer: dict[str, str | None] = {}  # key -> JSON text written by this run, None: deleted
        self.ops = 0
        self.failure: str | None = None  # a quota was passed: the run fails, nothing commits
        self.usage: tuple[int, int] | None = None  # (keys, bytes) as this run's writes leave them
        self.held = False  # holds the namespace's lock
        self.holder: str | None = None  # this run's token in the store's lock

    def writes(self) -> BundleWrites | None:
        """What this run commits, if it wrote anything and passed no quota."""
        if not self.buffer or self.failure is not None:
            return None
        return BundleWrites(self.author, self.bundle, dict(self.buffer), self.holder)

    def release(self, committed: bool = False) -> None:
        """Let the next run of this namespace go; the buffer is dropped. Idempotent.
        ``committed``: the writes were committed, and the commit let the store's lock go."""
        self.buffer.clear()
        if self.held:
            self.held = False
            self.owner._release((self.author, self.bundle), None if committed else self.holder)

    async def call(self, call: StateCall) -> StateReply:
        """Answer one state call of the run."""
        try:
            if self.failure is not None:
                raise _Refused(f"{self.failure} (earlier in this run: nothing of it commits)", QUOTA)
            self.ops += 1
            if self.ops > self.owner.quotas.max_ops_per_run:
                self._over(f"more than {self.owner.quotas.max_ops_per_run} state calls in one run (bundle_state.max_ops_per_run)")
            if not self.held:
                self.holder = await self.owner._acquire((self.author, self.bundle))
                self.held = True
            return self._answer(call)
        except _Refused as e:
            return StateReply(ok=False, error=str(e), error_type=e.error_type)
        except StoreError as e:
            return StateReply(ok=False, error=f"the runner's state store failed: {e}", error_type="StateUnavailable")

    def _over(self, why: str) -> None:
        self.failure = f"state quota exceeded: {why}"
        raise _Refused(self.failure, QUOTA)

    def _answer(self, call: StateCall) -> StateReply:
        if call.state == "list":
            keys, cursor = self._list(call.prefix or "", call.limit or DEFAULT_LIST, call.cursor)
            return StateReply(ok=True, keys=keys, cursor=cursor)
        key = _check_key(call.key)
        if call.state == "get":
            text = self._current(key)
            return StateReply(ok=True, value=None if text is None else json.loads(text))
        if call.state == "set":
            self._set(key, _value_text(call.value))
        else:
            self._set(key, None)
        return StateReply(ok=True)

    def _current(self, key: str) -> str | None:
        if key in self.buffer:
            return self.buffer[key]
        return self.owner.store.state_value(self.author, self.bundle, key)

    def _set(self, key: str, text: str | None) -> None:
        q = self.owner.quotas
        if text is not None and len(text.encode()) > q.max_value_bytes:
            self._over(f"the value of {key!r} is {len(text.encode())} bytes; the limit is {q.max_value_bytes} "
                       "(bundle_state.max_value_bytes)")
        if self.usage is None:
            self.usage = self.owner.store.state_usage(self.author, self.bundle)
        before = self._current(key)
        keys, size = self.usage
        if before is not None:
            keys, size = keys - 1, size - _entry_bytes(key, before)
        if text is not None:
            keys, size = keys + 1, size + _entry_bytes(key, text)
            if keys > q.max_keys:
                self._over(f"the namespace would hold more than {q.max_keys} keys (bundle_state.max_keys)")
            if size > q.max_bytes:
                self._over(f"the namespace would hold more than {q.max_bytes} bytes (bundle_state.max_bytes)")
        self.usage = (keys, size)
        self.buffer[key] = text

    def _list(self, prefix: str, limit: int, cursor: str | None) -> tuple[list[str], str | None]:
        """Keys that start with ``prefix``, after ``cursor`` (the last key of the page before),
        committed or written by this run and not deleted by it, in code point order."""
        if prefix:
            _check_key(prefix, "prefix")
        if cursor is not None:
            _check_key(cursor, "cursor")
        deleted = sum(1 for v in self.buffer.values() if v is None)
        committed = [k for k, _ in self.owner.store.state_keys(self.author, self.bundle, prefix, cursor, limit + 1 + deleted)]
        mine = [k for k in self.buffer if k.startswith(prefix) and (cursor is None or k > cursor)]
        merged = sorted({*committed, *mine} - {k for k, v in self.buffer.items() if v is None})
        # Past the committed page's end, keys of ours may still be below committed keys not read:
        # the page stops where what was read of the store stops, unless the store had no more.
        if len(committed) == limit + 1 + deleted:
            merged = [k for k in merged if k <= committed[-1]]
        page = merged[:limit]
        more = len(merged) > limit or len(committed) == limit + 1 + deleted
        return page, (page[-1] if more and page else None)


def _entry_bytes(key: str, text: str) -> int:
    return len(key.encode()) + len(text.encode())


def _check_key(key: Any, what: str = "key") -> str:
    if not isinstance(key, str) or not key:
        raise _Refused(f"a {what} must be a non-empty string")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise _Refused(f"the {what} is not valid Unicode (a lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise _Refused(f"the {what} is {size} bytes; a key may have at most {MAX_KEY_BYTES} (UTF-8)")
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise _Refused(f"the {what} holds a control character")
    return key


def _value_text(value: Any) -> str:
    """A value as the JSON text stored, if the AT data model can hold it (no floats, no null)."""
    if value is None:
        raise _Refused("a value cannot be null: delete the key instead")
    if problem := data_problem(value, "value", record=True):
        raise _Refused(f"the value {problem}")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
