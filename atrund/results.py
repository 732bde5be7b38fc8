"""Result records: built from an outcome, queued in SQLite, written with putRecord.

The record key is derived from the invocation URI (records.result_rkey), so a second write of
the same result replaces it with identical content: retries are harmless. A write the PDS
refuses for good (4xx) is replaced once by an error result saying why, so the author still
learns the outcome; network failures are retried with jittered backoff until they succeed.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import structlog
from pydantic import ValidationError

from atrund.errors import AtrundError, RemoteError
from atrund.records import RESULT, HttpResponse, Metrics, Result, StrongRef, encode_data, now_iso, valid_unicode
from atrund.session import Rejected, Session
from atrund.state import State

log = structlog.get_logger("atrund.results")

MAX_ERROR_BYTES = 4000
BATCH = 100  # results per applyWrites call (the reference PDS takes up to 200 writes)
FALLBACK_MARK = "the result could not be stored"


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
    )


def _valid_text(response: dict[str, Any]) -> dict[str, Any]:
    out = dict(response)
    if isinstance(out.get("body"), str):
        out["body"] = valid_unicode(out["body"])
    if isinstance(out.get("headers"), dict):
        out["headers"] = {valid_unicode(str(k)): valid_unicode(v) if isinstance(v, str) else v for k, v in out["headers"].items()}
    return out


def _fallback(record: dict[str, Any], reason: str) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k in ("invocation", "bundle", "createdAt", "metrics")}
    out["status"] = "error"
    out["error"] = f"{FALLBACK_MARK}: {reason}".encode()[:MAX_ERROR_BYTES].decode("utf-8", "ignore")
    return out


class ResultWriter:
    def __init__(self, session: Session, state: State) -> None:
        self.session = session
        self.state = state
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def flush(self) -> int:
        """Write every due result; returns how many were written.

        Several due results go in one applyWrites call (one repo commit instead of one each:
        under load the PDS's commits, not our runs, are the bottleneck). If the PDS refuses the
        batch, each result is written on its own, so one bad record cannot hold up the others.
        """
        due = self.state.due(limit=BATCH)
        if len(due) > 1:
            try:
                await self.session.apply_creates(RESULT, [(item.rkey, item.record) for item in due])
            except RemoteError as e:
                log.info("batched result write failed; writing one by one", results=len(due), error=str(e))
            else:
                for item in due:
                    self.state.written(item.invocation_uri)
                return len(due)
        return await self._one_by_one(due)

    async def _one_by_one(self, due) -> int:
        written = 0
        for item in due:
            try:
                await self.session.put_record(RESULT, item.rkey, item.record)
            except Rejected as e:
                if str(item.record.get("error", "")).startswith(FALLBACK_MARK):
                    log.error("result refused by the PDS, even as an error", invocation=item.invocation_uri, error=str(e))
                    self.state.retry_later(item.invocation_uri, str(e), delay=3600)
                else:
                    log.warning("result refused by the PDS; writing an error result instead", invocation=item.invocation_uri, error=str(e))
                    self.state.retry_later(item.invocation_uri, str(e), delay=0, record=_fallback(item.record, str(e)))
                continue
            except RemoteError as e:
                delay = min(60.0, 2 ** min(item.attempts, 6)) * random.uniform(0.5, 1.0)
                log.warning("result write failed; will retry", invocation=item.invocation_uri, error=str(e), retry_in_s=round(delay, 1))
                self.state.retry_later(item.invocation_uri, str(e), delay=delay)
                continue
            self.state.written(item.invocation_uri)
            written += 1
        return written

    async def run(self) -> None:
        while True:
            self._wake.clear()  # before flushing, so a wake() during the flush is not lost
            await self.flush()
            wait = self.state.next_due_in()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait if wait is not None else None)
            except asyncio.TimeoutError:
                pass
