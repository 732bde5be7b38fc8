"""Result records: built from an outcome, queued in SQLite, written with putRecord.

The record key is derived from the invocation URI (records.result_rkey), so a second write of
the same result replaces it with identical content: retries are harmless. A write the PDS
refuses for good (4xx) is replaced once by an error result saying why, so the author still
learns the outcome; network failures are retried with jittered backoff until they succeed.
Nothing is retried forever (see ResultWriter).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import structlog
from pydantic import ValidationError

from atrund import bounds
from atrund.atproto.session import Rejected, Session
from atrund.errors import AtrundError, RemoteError
from atrund.health import Health
from atrund.quarantine import Quarantine, QuarantineError
from atrund.records import (
    RESULT,
    HttpResponse,
    Metrics,
    Result,
    StrongRef,
    data_problem,
    encode_data,
    now_iso,
    valid_unicode,
)
from atrund.state import Outgoing, Store, StoreError

log = structlog.get_logger("atrund.results")

MAX_ERROR_BYTES = 4000
BATCH = 100  # results per applyWrites call (the reference PDS takes up to 200 writes)
FALLBACK_MARK = "the result could not be stored"
GIVE_UP_AFTER = 8  # attempts of a result that fails while others are written (about 4 minutes of backoff)
POLL_SECONDS = 5.0
# Between two commits of results while they keep coming (a burst), at least this long: the results
# finished meanwhile go in the next applyWrites together. A commit is most of what a result costs
# the PDS (12.5 ms of its CPU for a putRecord of one, 1.9 ms a result in a batch of 10, on the
# reference PDS), and under a burst the PDS's CPU, not our runs, bounds the drain. A result that
# comes after a quiet spell is written at once; in a burst one waits at most this much longer.
COMMIT_GAP = 0.1


def build(
    invocation: StrongRef | None,
    bundle: StrongRef,
    status: str,
    *,
    data: Any = None,
    error: str | None = None,
    response: dict[str, Any] | None = None,
    metrics: Metrics | None = None,
    caller: str | None = None,
    origin: dict[str, Any] | None = None,
) -> Result:
    """The result record for an outcome. What the bundle answered is untrusted: a return value
    no record can hold (records.UnstorableValue, or nested too deep) or an HTTP response that is
    not one makes an ``error`` result saying why, and text meant for people (the error, the
    HTTP headers and body) has lone surrogates replaced. So every Result built here serializes
    as strict JSON in UTF-8: the result writer can always send it."""
    try:
        encoded = encode_data(data)
        http = HttpResponse.model_validate(_valid_text(response)) if response else None
    except (AtrundError, ValidationError) as e:
        if isinstance(e, ValidationError):
            err = e.errors(include_url=False)[0]
            why = f"the HTTP response is not valid: {'.'.join(map(str, err['loc'])) or 'response'}: {err['msg']}"
        else:
            why = str(e)
        status, encoded, http, error = "error", None, None, why
    if error is not None:
        error = valid_unicode(error)
        if len(error.encode()) > MAX_ERROR_BYTES:  # the lexicon's maxLength counts UTF-8 bytes
            error = error.encode()[: MAX_ERROR_BYTES - 20].decode("utf-8", "ignore") + " … (truncated)"
    return Result(
        invocation=invocation,
        caller=caller,
        bundle=bundle,
        status=status,
        created_at=now_iso(),
        data=encoded,
        error=error,
        response=http,
        metrics=metrics,
        **(origin or {}),  # a schedule's tick or a trigger's firing (atrund.runs): the record and what ran it
    )


def _valid_text(response: dict[str, Any]) -> dict[str, Any]:
    out = dict(response)
    if isinstance(out.get("body"), str):
        out["body"] = valid_unicode(out["body"])
    if isinstance(out.get("headers"), dict):
        out["headers"] = {valid_unicode(str(k)): valid_unicode(v) if isinstance(v, str) else v for k, v in out["headers"].items()}
    return out


def _fallback(record: dict[str, Any], reason: str) -> dict[str, Any]:
    """An error result in place of one that cannot be written: only fields the runner made itself
    (references, time), and the reason as text that is valid Unicode. The metrics are left out:
    they carry figures a bundle reported, which may be what the PDS refused."""
    out = {k: v for k, v in record.items()
           if k in ("invocation", "bundle", "createdAt", "caller", "schedule", "scheduledAt", "trigger", "event", "eventCid")}
    out["status"] = "error"
    text = f"{FALLBACK_MARK}: {reason}".encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    out["error"] = text.decode("utf-8", "ignore")
    return out


def unsendable(record: Any) -> str | None:
    """Why ``record`` cannot be sent as a record at all, or None. Checked before sending, so such
    a result is refused here, at once: the reference PDS answers a float or an integer past 2^53
    with a 500, which would otherwise look like a PDS that is down and be retried."""
    where = bounds.too_deep(record)
    if where is not None:
        return f"{where} is nested deeper than {bounds.MAX_DEPTH} levels"
    problem = data_problem(record, "record", record=True)
    return None if problem is None else f"it {problem}"


class ResultWriter:
    """Writes the outbox to the runner's PDS; never stops on one result.

    - A batch the PDS refuses is written one by one, so one bad record holds up no other.
    - A result refused for good (a 4xx, or one that cannot even be sent) is replaced once by an
      error result that says why; if that is refused too, the result goes to quarantine
      (atrund.quarantine) and off the outbox.
    - A failure that may pass (network, 5xx, timeouts) is retried with jittered backoff while the
      PDS is down. A result that keeps failing while others are written is not waiting for the
      PDS: after ``GIVE_UP_AFTER`` attempts it is treated as refused for good.
    - A state store that fails is waited out (the loop retries; /healthz says so).
    """

    def __init__(self, session: Session, state: Store, quarantine: Quarantine | None = None,
                 health: Health | None = None) -> None:
        self.session = session
        self.state = state
        self.quarantine = quarantine or Quarantine(state.path.parent / "quarantine.sqlite3")
        self.health = health or Health()
        self.write_failures = 0  # for /metrics
        self.written = 0
        self.quarantined = 0
        self._wake = asyncio.Event()
        self._last_success = 0.0
        self._failing_since: dict[str, float] = {}
        self._settled = 0  # results written or refused (replaced, or quarantined): flush() goes on while this moves

    def wake(self) -> None:
        self._wake.set()

    async def flush(self) -> int:
        """Write every due result, batch after batch, while that gets anywhere (results written,
        or refused ones replaced by their error results); returns how many were written."""
        total = 0
        while True:
            before = self._settled
            written, due = await self._flush_batch()
            total += written
            if due == 0 or self._settled == before:
                return total

    async def _flush_batch(self) -> tuple[int, int]:
        """Write one batch of due results; returns (written, how many were due).

        Several due results go in one applyWrites call (one repo commit instead of one each:
        under load the PDS's commits, not our runs, are the bottleneck). If the PDS refuses the
        batch, each result is written on its own, so one bad record cannot hold up the others.
        """
        due = []
        for item in self.state.due(limit=BATCH):
            problem = unsendable(item.record)
            if problem is None:
                due.append(item)
            else:
                self._refused(item, f"it cannot be sent: {problem}")
        if len(due) > 1:
            try:
                await self.session.apply_creates(RESULT, [(item.rkey, item.record) for item in due])
            except Exception as e:  # noqa: BLE001 - whatever it was, writing one by one below sorts it out per result
                log.info("batched result write failed; writing one by one", results=len(due),
                         error=str(e) if isinstance(e, RemoteError) else f"{type(e).__name__}: {e}")
            else:
                self._succeeded()
                self._written(*(item.invocation_uri for item in due))
                return len(due), len(due)
        return await self._one_by_one(due), len(due)

    async def _one_by_one(self, due: list[Outgoing]) -> int:
        written = 0
        for item in due:
            try:
                await self.session.put_record(RESULT, item.rkey, item.record)
            except Rejected as e:
                self._refused(item, str(e))
                continue
            except RemoteError as e:
                self._transient(item, str(e))
                continue
            except (UnicodeError, ValueError, TypeError) as e:  # cannot be serialized or sent: never will be
                self._refused(item, f"it cannot be sent: {type(e).__name__}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - anything else may pass: retried, never a verdict on the record
                self._transient(item, f"{type(e).__name__}: {e}")
                continue
            self._succeeded()
            self._written(item.invocation_uri)
            written += 1
        return written

    def _succeeded(self) -> None:
        self._last_success = time.monotonic()
        self.health.clear("results")

    def _written(self, *invocation_uris: str) -> None:
        """Record writes. A store that cannot take them raises StoreError to the loop, which backs
        off: the results are on the PDS and are written again (same key, same content) once the
        store answers; going on at once would resend them in a tight loop."""
        for uri in invocation_uris:
            self._failing_since.pop(uri, None)
        self.state.written(*invocation_uris)
        self._settled += len(invocation_uris)
        self.written += len(invocation_uris)

    def _refused(self, item: Outgoing, reason: str) -> None:
        self._settled += 1
        self._failing_since.pop(item.invocation_uri, None)
        if str(item.record.get("error", "")).startswith(FALLBACK_MARK):
            log.error("result refused by the PDS, even as an error result; quarantined", invocation=item.invocation_uri,
                      error=reason)
            try:
                self.quarantine.add("result", item.invocation_uri, {"rkey": item.rkey, "record": item.record},
                                    f"refused even as an error result: {reason}", attempts=item.attempts + 1)
            except QuarantineError as e:  # it stays on the outbox, tried again later
                log.error("cannot quarantine a result; it stays on the outbox", invocation=item.invocation_uri, error=str(e))
                self.state.retry_later(item.invocation_uri, reason, delay=60)
                return
            self.quarantined += 1
            self.state.unqueue_result(item.invocation_uri)
        else:
            log.warning("result refused by the PDS; writing an error result instead", invocation=item.invocation_uri, error=reason)
            self.state.retry_later(item.invocation_uri, reason, delay=0, record=_fallback(item.record, reason))

    def _transient(self, item: Outgoing, reason: str) -> None:
        self.write_failures += 1
        first = self._failing_since.setdefault(item.invocation_uri, time.monotonic())
        if item.attempts + 1 >= GIVE_UP_AFTER and self._last_success > first:
            self._refused(item, f"it failed {item.attempts + 1} times while other results were written ({reason})")
            return
        self.health.problem("results", f"the runner's PDS does not take result writes: {reason}")
        delay = min(60.0, 2 ** min(item.attempts, 6)) * random.uniform(0.5, 1.0)
        log.warning("result write failed; will retry", invocation=item.invocation_uri, error=reason, retry_in_s=round(delay, 1))
        self.state.retry_later(item.invocation_uri, reason, delay=delay)

    async def run(self) -> None:
        delay = 1.0
        while True:
            self._wake.clear()  # before flushing, so a wake() during the flush is not lost
            began = time.monotonic()
            try:
                written, due = await self._flush_batch()
                wait = self.state.next_due_in()
                delay = 1.0
            except StoreError as e:  # /healthz reports the store; wait it out
                log.warning("result writer: the state store failed; retrying", error=str(e), retry_in_s=delay)
                wait, delay = delay, min(delay * 2, 30.0)
                written = due = 0
            if written and due < BATCH:  # results are coming in (a full batch: more are waiting, go on)
                await asyncio.sleep(max(0.0, began + COMMIT_GAP - time.monotonic()))
            # Look again at least every POLL_SECONDS: a result put back from quarantine, or one
            # held while the store failed, is due without anyone waking us.
            wait = POLL_SECONDS if wait is None else min(wait, POLL_SECONDS)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass
