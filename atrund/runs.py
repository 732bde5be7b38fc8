"""The invocations a runner records: queued, run at most once, and answered with a result record.

``Runs`` owns their bookkeeping around the pipeline (atrund.pipeline):
- the queue: the scheduler's fairness and limits, and the check, just before one starts, that
  its author has not deleted or replaced it meanwhile (``still_posted``);
- the claim (pending -> running, in the state store) that makes a run happen at most once;
- the record: the outcome becomes a result record queued on the outbox, in one transaction with
  "done" and with what the run wrote to its bundle's state (atrund.kv); an outcome the store
  cannot take yet is held (its namespace stays locked) and recorded once it answers;
- what a stop leaves: at the next start (``recover``), or at the shutdown deadline
  (``interrupt_running``), an invocation that was running gets an "interrupted" result; it is
  never started again.

Everything that can go wrong here ends in a result record that says what happened, except a
denied author (no record, by design).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from pydantic import ValidationError

from atrund.access import AccessPolicy
from atrund.atproto.repos import Repos
from atrund.atproto.uri import AtUri, authority
from atrund.config import LimitsSection
from atrund.errors import AtrundError, NotFound, StateConflict
from atrund.kv import Session
from atrund.logbook import LogBook
from atrund.metrics import Meters
from atrund.pipeline import Outcome, Pipeline, outcome_of
from atrund.records import INVOCATION, ORIGIN_MARK, Metrics, StrongRef, origin_record, result_rkey, unix_time
from atrund.results import ResultWriter, build
from atrund.schedule import Scheduler
from atrund.state import Store, Stored, StoreError

log = structlog.get_logger("atrund.runs")

STILL_POSTED_TIMEOUT = 3.0  # seconds
STALE_AFTER = 2.0  # seconds: older invocations are checked for deletion just before they start
STORE_RETRY = 2.0  # seconds before an invocation the state store could not claim is tried again
INTERRUPTED = ("interrupted: the runner stopped while this invocation was running; it was not started again "
               "(invocations run at most once)")


class Runs:
    def __init__(self, pipeline: Pipeline, state: Store, writer: ResultWriter, policy: AccessPolicy, repos: Repos,
                 meters: Meters, concurrency: int, limits: LimitsSection, logbook: LogBook, hot_affinity: bool = True) -> None:
        """``hot_affinity``: on a shared store, tell the fleet which bundles this replica holds hot
        workers for, so that new work for them comes here (runner.hot_affinity)."""
        self.pipeline = pipeline
        self.logbook = logbook
        self.state = state
        self.writer = writer
        self.policy = policy
        self.repos = repos
        self.meters = meters
        self.scheduler = Scheduler(self._guarded, self._reject_backlog, concurrency, limits.per_author_concurrency,
                                   limits.per_author_per_minute, limits.per_author_burst, limits.per_author_backlog,
                                   check=self.still_posted)
        # Outcomes the state store could not take yet: (invocation, status, result record, state writes).
        self.held: list[tuple[Stored, str, dict[str, Any] | None, Session | None]] = []
        self._held_wake = asyncio.Event()
        self.denied = 0  # access withdrawn while they waited (ingest counts the ones denied on arrival)
        self.queued: set[str] = set()  # a shared store: the assigned invocations this replica's scheduler holds
        self.hot_affinity = hot_affinity
        self.told_hot: set[str] = set()  # the bundle CIDs the fleet was last told this replica is hot for

    def submit(self, uri: str) -> None:
        """Queue a stored, pending invocation (or a schedule's tick, a trigger's firing: their keys
        start with their record's URI); the scheduler decides when it runs.

        On a store replicas share, the replica the store assigned it to queues it instead
        (``take_assigned``, woken by the store): nothing to do here."""
        if not self.state.shared:
            self._enqueue(uri)

    def _enqueue(self, uri: str) -> None:
        self.scheduler.submit(authority(origin_record(uri)), uri)

    def queue_assigned(self) -> None:
        """Queue the pending invocations the shared store assigned to this replica and that its
        scheduler does not hold yet (an author's are all assigned to one replica at a time, so
        its scheduler keeps that author's order, concurrency and rate for the whole fleet)."""
        for uri in self.state.assigned():
            if uri not in self.queued:
                self.queued.add(uri)
                self._enqueue(uri)

    async def take_assigned(self, wait: Callable[[float], Awaitable[None]], interval: float) -> None:
        """The executing replica's loop: queue what is assigned to it, then ``wait`` for the
        store's wake-up (a NOTIFY), or ``interval`` seconds at most."""
        while True:
            try:
                self.queue_assigned()
            except StoreError as e:
                log.warning("state store failed; assigned invocations are looked for again", error=str(e), retry_in_s=interval)
            await wait(interval)

    # -- start and stop ------------------------------------------------------------------

    def recover(self) -> None:
        """Finish what a previous run of the runner left (or, on a shared store, a replica that
        stopped or died): never start anything twice."""
        running, pending = self.state.take_over()
        for inv in running:
            log.warning("invocation was running when the runner stopped; not running it again", uri=inv.uri)
            self._interrupt(inv)
        for inv in pending:
            self.submit(inv.uri)

    async def keep_lease(self, interval: float) -> None:
        """On a store replicas share (atrund.pgstate): say this replica is alive, and take over
        what dead ones left, every ``interval`` seconds. A store that fails for a while only
        delays both (past the lease, others take this replica's work: its results then lose
        to their "interrupted" ones, and nothing runs twice)."""
        while True:
            try:
                self._heartbeat()
                self.recover()
            except StoreError as e:
                log.warning("state store failed; heartbeat and take-over tried again", error=str(e), retry_in_s=interval)
            await asyncio.sleep(interval)

    def _heartbeat(self) -> None:
        hot = self.pipeline.hot_bundles() if self.hot_affinity else []
        self.state.heartbeat(hot)
        self.told_hot = set(hot)

    def tell_hot(self) -> None:
        """After a run: a bundle that became hot here is told at once, not at the next heartbeat,
        so that the next new author's invocation of it can already come here."""
        if not (self.state.shared and self.hot_affinity) or self.told_hot.issuperset(self.pipeline.hot_bundles()):
            return
        try:
            self._heartbeat()
        except StoreError:
            pass  # the heartbeat loop tells it, and reports the store

    async def drain(self, grace: float) -> None:
        """Start nothing more (what waits stays pending for the next start); let running
        invocations finish for ``grace`` seconds; then cancel the rest and record each as
        interrupted, so that its result is written before the runner exits."""
        cancelled = await self.scheduler.stop(grace)
        self.store_held()
        if cancelled:
            self.interrupt_running()
        if self.held:
            log.error("outcomes not recorded: the state store still fails; these invocations will read as interrupted",
                      count=len(self.held), uris=[inv.uri for inv, *_ in self.held][:20])
            for *_, session in self.held:
                if session is not None:
                    session.release()

    def interrupt_running(self) -> None:
        """The shutdown deadline passed: every invocation still marked running (and not held,
        finished) gets its interrupted result now rather than at the next start."""
        held = {inv.uri for inv, *_ in self.held}
        try:
            running = [inv for inv in self.state.with_state("running") if inv.uri not in held
                       and (inv.uri in self.queued or not self.state.shared)]  # replicas: only this one's
        except StoreError as e:
            log.error("cannot read the invocations still running; they are recorded as interrupted at the next start",
                      error=str(e))
            return
        for inv in running:
            log.warning("invocation still running at the shutdown deadline; stopped, not run again", uri=inv.uri)
            self._interrupt(inv)

    def _interrupt(self, inv: Stored) -> None:
        self._finish(inv, Outcome("error", error=INTERRUPTED))

    # -- one invocation ------------------------------------------------------------------

    def _reject_backlog(self, uri: str, why: str) -> None:
        self.queued.discard(uri)
        try:
            stored = self.state.pending(uri)
        except StoreError as e:
            self._store_later(uri, e)
            return
        if stored is not None:
            self._finish(stored, Outcome("rejected", error=why))

    async def _guarded(self, uri: str) -> None:
        try:
            await self._run(uri)
        finally:
            self.queued.discard(uri)  # replicas: no longer held here (done, or pending again for the next look)
            self.tell_hot()

    async def _run(self, uri: str) -> None:
        try:
            stored = self.state.pending(uri)
            if stored is None:
                return
            if not self.policy.allows(stored.author):  # access was withdrawn while it waited: as if it came now
                if self.state.deny(uri):
                    self.denied += 1
                    log.warning("invocation denied by access policy (withdrawn while it waited)", uri=uri, mode=self.policy.mode)
                return
        except StoreError as e:
            self._store_later(uri, e)
            return
        self.meters.ingested(stored.value.get("createdAt") if isinstance(stored.value, dict) else None, stored.seen_at)
        try:
            out = await self.pipeline.invocation(stored.value, author=stored.author, queued_since=stored.seen_at,
                                                 claim=lambda: self._claim(stored))
            if out is not None:  # None: not claimed (it is not pending any more)
                self._finish(stored, out)
        except StoreError as e:  # it could not be claimed: nothing started; it stays pending
            self._store_later(uri, e)
        except Exception as e:  # a bug of ours must still end in a result, not a silent loss
            log.exception("internal error while handling an invocation", uri=uri)
            self._finish(stored, outcome_of(e))

    def _claim(self, stored: Stored) -> bool:
        """Claim it to run (pending -> running, committed): False if it is not pending any more.
        The time it waited since it was stored is the claim lag (/metrics, /healthz)."""
        claimed = self.state.mark_running(stored.uri)
        if claimed:
            self.meters.claimed(time.time() - stored.seen_at)
        return claimed

    def _store_later(self, uri: str, e: StoreError) -> None:
        """The store failed before the invocation started: it stays pending (in the store, if the
        store took it at all) and is queued again shortly, never dropped from the live queue."""
        log.warning("state store failed before an invocation started; queued again", uri=uri, error=str(e),
                    retry_in_s=STORE_RETRY)
        asyncio.get_running_loop().call_later(STORE_RETRY, self.submit, uri)

    async def still_posted(self, uri: str) -> bool:
        """Is a stale invocation still in its author's repo, unchanged? One repo.getRecord, when
        it is next in line for its author (the scheduler's check, outside the execution slots):
        an invocation its author deleted (or edited) while it waited is withdrawn (no run, no
        result), whichever way it came in.

        Stale: it waited in our queue, or was already old when we first saw it (a replay after
        a restart, a poll backlog), by more than STALE_AFTER. A fresh one is not checked: the
        check costs a PDS round trip per invocation, and in firehose mode a delete that follows
        at once arrives on the stream and withdraws it there. If the author's PDS does not
        answer in time it runs anyway: what was accepted was proven to be the author's, and a
        PDS that is down must not hold up the queue."""
        try:
            inv = self.state.pending(uri)
        except StoreError:
            return True  # the claim (mark_running) decides, and requeues if the store still fails
        if inv is None:
            return False
        if ORIGIN_MARK in uri:  # a tick or a firing: its schedule's or trigger's delete withdraws it (atrund.standing)
            return True
        created = unix_time(inv.value.get("createdAt")) if isinstance(inv.value, dict) else None
        if created is None:
            created = 0.0  # unreadable: treat as old
        if time.time() - inv.seen_at <= STALE_AFTER and inv.seen_at - created <= STALE_AFTER:
            return True
        at = AtUri.parse(inv.uri)
        try:
            # repo.getRecord, not the proof-carrying sync.getRecord: what we hold was proven to be
            # the author's already; this only asks whether it is still there at the same CID.
            cid, value = await asyncio.wait_for(self.repos.get_record(at.did, INVOCATION, at.rkey), STILL_POSTED_TIMEOUT)
        except NotFound:
            cid, value = None, None
        except (AtrundError, TimeoutError) as e:
            log.info("could not check that the invocation is still posted; running it", uri=inv.uri, error=str(e) or "timeout")
            return True
        if cid == inv.cid:
            return True
        try:
            if cid is not None:  # changed in place, or deleted and created again: one key, one run
                self.refuse_reused(inv.uri, inv.author, cid, value)
            elif self.state.withdraw(inv.uri):
                log.info("invocation withdrawn by its author before it ran (deleted); not run", uri=inv.uri)
        except StoreError:
            return True  # still pending in the store: the claim decides, and requeues
        return False

    def refuse_reused(self, uri: str, author: str, cid: str, value: Any) -> None:
        """A record key seen again at a new CID before its invocation ran (edited, or deleted and
        created again). A record key is one invocation, run at most once, so neither version runs:
        the key gets a ``rejected`` result about the new version that says why, instead of silence
        or a result about a version the author replaced (docs/protocol.md, "one key, one run")."""
        inv_ref = StrongRef(uri=uri, cid=cid)
        error = ("this record key held another invocation before (it was changed, or deleted and created again, before "
                 "it ran); a record key is one invocation and runs at most once, so neither version runs: post the "
                 "invocation as a new record (atrund invoke always does)")
        record = build(inv_ref, _bundle_ref(value if isinstance(value, dict) else {}, inv_ref), "rejected", error=error,
                       metrics=Metrics()).to_record()
        if self.state.refuse_reused(uri, cid, value, "rejected", result_rkey(uri), record):
            log.info("invocation", uri=uri, author=author, status="rejected", error_type="KeyReused", error=error)
            self.meters.finished("record", "rejected", None, None, None)
            self.writer.wake()

    # -- the record ----------------------------------------------------------------------

    def _finish(self, inv: Stored, out: Outcome) -> None:
        metrics = out.metrics or Metrics()
        metrics.total_ms = max(0, int((time.time() - inv.seen_at) * 1000))
        inv_ref, origin, wanted = _answers(inv)
        # build() turns an answer no record can hold into an error result that says why: the log,
        # the meters and the state record the status the result has, not the one asked for.
        result = build(inv_ref, out.bundle or _bundle_ref(inv.value, inv_ref or origin["ref"]), out.status, metrics=metrics,
                       data=out.data, error=out.error, response=out.response, origin=origin["fields"] if origin else None)
        # The canonical line before the commit: a kill just after the commit must not lose it.
        log.info("invocation", uri=inv.uri, author=inv.author, status=result.status,
                 bundle=(out.bundle.cid if out.bundle else None), runtime=metrics.runtime, isolation=metrics.isolation,
                 queued_ms=metrics.queued_ms, exec_ms=metrics.execution_time_ms, total_ms=metrics.total_ms,
                 error_type=out.error_type, error=result.error)
        if out.output:
            log.debug("invocation output", uri=inv.uri, output=out.output)
        kind = origin["source"] if origin else "record"
        self.logbook.note(inv.uri, result.bundle.uri, inv.author, kind, result.status, result.error, out.output)
        self.meters.finished(kind, result.status, metrics.runtime, metrics.execution_time_ms, metrics.total_ms / 1000)
        keep = wanted == "all" or (wanted == "errors" and result.status != "success")
        if result.status != "success":
            out.release_state()  # build() refused the answer: nothing of the run commits
        self.held.append((inv, result.status, result.to_record() if keep else None, out.state))
        out.state = None  # the held entry owns it now
        self.store_held()

    def store_held(self) -> None:
        """Record held outcomes (done + result queued, in one transaction each), oldest first. One
        the store cannot take stays held, and the held-outcomes loop tries again: a finished run is
        never relabelled "interrupted" because the store failed for a while."""
        while self.held:
            inv, status, record, session = self.held[0]
            try:
                done = self.state.finish(inv.uri, status, result_rkey(inv.uri), record, session.writes() if session else None)
            except StateConflict as e:
                # Replicas: its bundle-state lock was taken before it committed (atrund.kv), so its
                # answer may rest on state another run has changed: it ends as an error instead.
                self.held.pop(0)
                if session is not None:
                    session.release()
                log.error("outcome not recorded: its bundle-state lock was lost; recorded as an error", uri=inv.uri,
                          error=str(e))
                self._finish(inv, Outcome("error", error=str(e), error_type="StateConflict"))
                return
            except StoreError as e:
                log.warning("outcome held: the state store failed; it is recorded once the store answers", uri=inv.uri,
                            error=str(e), held=len(self.held))
                self._held_wake.set()
                return
            self.held.pop(0)
            if not done:  # replicas: another recorded it as interrupted while this one was cut off
                log.warning("outcome not kept: the invocation already has its result (this replica was presumed dead)",
                            uri=inv.uri, status=status)
            if session is not None:
                session.release(committed=done)
            self.writer.wake()

    async def record_held(self) -> None:
        """The held-outcomes loop: try the store again, with backoff, while outcomes are held."""
        delay = 1.0
        while True:
            await self._held_wake.wait()
            self._held_wake.clear()
            while self.held:
                await asyncio.sleep(delay)
                self.store_held()
                delay = min(delay * 2, 30.0) if self.held else 1.0


def _answers(inv: Stored) -> tuple[StrongRef | None, dict[str, Any] | None, str]:
    """What a run's result answers: (the invocation record, or None and the schedule or trigger
    with the fields its result carries; which results are written: all, errors or none). A key
    with ORIGIN_MARK is a tick or a firing the runner stored itself (atrund.ticks,
    atrund.triggers): no invocation record's URI holds that mark, so no author can ask for this."""
    if ORIGIN_MARK not in inv.uri:
        return StrongRef(uri=inv.uri, cid=inv.cid), None, "all"
    told = inv.value.get("origin") if isinstance(inv.value, dict) else None
    told = told if isinstance(told, dict) else {}
    kind = "schedule" if "schedule" in told else "trigger"
    ref = StrongRef.model_validate(told.get(kind) or {"uri": origin_record(inv.uri), "cid": inv.cid})
    fields = {k: v for k, v in told.items() if k != "results"}
    fields[kind] = ref
    return None, {"ref": ref, "source": kind, "fields": fields}, told.get("results") or "all"


def _bundle_ref(value: dict, fallback: StrongRef) -> StrongRef:
    """The invocation's bundle reference if it is readable, else the invocation's own (documented)."""
    try:
        return StrongRef.model_validate(value.get("bundle"))
    except ValidationError:
        return fallback
