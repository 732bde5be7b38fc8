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

from atrund import bounds
from atrund.errors import RemoteError
from atrund.health import Health
from atrund.quarantine import Quarantine
from atrund.records import RESULT, HttpResponse, Metrics, Result, StrongRef, encode_data, now_iso
from atrund.session import Rejected, Session
from atrund.state import Outgoing, State, StoreError

log = structlog.get_logger("atrund.results")

MAX_ERROR_BYTES = 4000
BATCH = 100  # results per applyWrites call (the reference PDS takes up to 200 writes)
FALLBACK_MARK = "the result could not be stored"
GIVE_UP_AFTER = 8  # attempts of a result that fails while others are written (about 4 minutes of backoff)
POLL_SECONDS = 5.0


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
) -> Result:
    if error is not None and len(error.encode()) > MAX_ERROR_BYTES:  # the lexicon's maxLength counts UTF-8 bytes
        error = error.encode()[: MAX_ERROR_BYTES - 20].decode("utf-8", "ignore") + " … (truncated)"
    return Result(
        invocation=invocation,
        caller=caller,
        bundle=bundle,
        status=status,
        created_at=now_iso(),
        data=encode_data(data),
        error=error,
        response=HttpResponse.model_validate(response) if response else None,
        metrics=metrics,
    )


def _fallback(record: dict[str, Any], reason: str) -> dict[str, Any]:
    """An error result in place of one that cannot be written: only fields the runner made itself
    (references, time), and the reason as text that is valid Unicode. The metrics are left out:
    they carry figures a bundle reported, which may be what the PDS refused."""
    out = {k: v for k, v in record.items() if k in ("invocation", "bundle", "createdAt", "caller")}
    out["status"] = "error"
    text = f"{FALLBACK_MARK}: {reason}".encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    out["error"] = text.decode("utf-8", "ignore")
    return out


def unsendable(record: Any) -> str | None:
    """Why ``record`` cannot be a record at all, or None: what the AT data model has no room for
    (a float, which the reference PDS answers with a 500, not a refusal; a string that is not valid
    Unicode; a key that is not a string; nesting past bounds.MAX_DEPTH). Checked before sending, so
    such a result is refused here, at once, instead of looking like a PDS that is down."""
    where = bounds.too_deep(record)
    if where is not None:
        return f"{where} is nested deeper than {bounds.MAX_DEPTH} levels"
    stack: list[tuple[Any, str]] = [(record, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, float):
            return f"{path or 'the record'} is a floating-point number ({value!r}), which AT records cannot hold"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"{path or 'the record'} is a string that is not valid Unicode (a lone surrogate)"
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    return f"{path or 'the record'} has a key that is not a string ({k!r})"
                stack.append((k, f"{path}.{k} (a key)"))
                stack.append((v, f"{path}.{k}" if path else k))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
    return None


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

    def __init__(self, session: Session, state: State, quarantine: Quarantine | None = None,
                 health: Health | None = None) -> None:
        self.session = session
        self.state = state
        self.quarantine = quarantine or Quarantine(state.path.parent / "quarantine.sqlite3")
        self.health = health or Health()
        self.write_failures = 0  # for /metrics
        self.quarantined = 0
        self._wake = asyncio.Event()
        self._last_success = 0.0
        self._failing_since: dict[str, float] = {}

    def wake(self) -> None:
        self._wake.set()

    async def flush(self) -> int:
        """Write every due result, batch after batch; returns how many were written."""
        total = 0
        while True:
            written, due = await self._flush_batch()
            total += written
            if due < BATCH or written == 0:
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
            except RemoteError as e:
                log.info("batched result write failed; writing one by one", results=len(due), error=str(e))
            except Exception as e:  # noqa: BLE001 - a record that cannot be sent at all: found one by one below
                log.info("batched result write failed; writing one by one", results=len(due), error=f"{type(e).__name__}: {e}")
            else:
                self._succeeded()
                for item in due:
                    self._written(item.invocation_uri)
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
            except Exception as e:  # noqa: BLE001 - cannot be serialized or sent (not valid Unicode, ...): never will be
                self._refused(item, f"it cannot be sent: {type(e).__name__}: {e}")
                continue
            self._succeeded()
            self._written(item.invocation_uri)
            written += 1
        return written

    def _succeeded(self) -> None:
        self._last_success = time.monotonic()
        self.health.clear("results")

    def _written(self, invocation_uri: str) -> None:
        self._failing_since.pop(invocation_uri, None)
        try:
            self.state.written(invocation_uri)
        except StoreError as e:  # it is on the PDS; written again (same key, same content) once the store answers
            log.warning("result written but not recorded as written; it will be written again", invocation=invocation_uri,
                        error=str(e))

    def _refused(self, item: Outgoing, reason: str) -> None:
        self._failing_since.pop(item.invocation_uri, None)
        if str(item.record.get("error", "")).startswith(FALLBACK_MARK):
            log.error("result refused by the PDS, even as an error result; quarantined", invocation=item.invocation_uri,
                      error=reason)
            self.quarantine.add("result", item.invocation_uri, {"rkey": item.rkey, "record": item.record},
                                f"refused even as an error result: {reason}", attempts=item.attempts + 1)
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
            try:
                await self._flush_batch()
                wait = self.state.next_due_in()
                delay = 1.0
            except StoreError as e:  # /healthz reports the store; wait it out
                log.warning("result writer: the state store failed; retrying", error=str(e), retry_in_s=delay)
                wait, delay = delay, min(delay * 2, 30.0)
            # Look again at least every POLL_SECONDS: a result put back from quarantine, or one
            # held while the store failed, is due without anyone waking us.
            wait = POLL_SECONDS if wait is None else min(wait, POLL_SECONDS)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass
