"""Operators' `atrund quarantine retry`, applied: each retried item goes back where it came from.

A result goes back on the outbox, a firehose frame is processed again, a listed record is taken
again as a poll would. One at a time, and put back in quarantine if its retry fails or is
interrupted: none is lost on the way.
"""

from __future__ import annotations

import asyncio

import structlog

from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.quarantine import Held, Quarantine
from atrund.results import ResultWriter
from atrund.state import Store

log = structlog.get_logger("atrund.retries")

RETRY_POLL = 2.0  # seconds between looks for operators' retries


class Retries:
    def __init__(self, quarantine: Quarantine, state: Store, writer: ResultWriter, intake: Intake,
                 firehose: Firehose | None) -> None:
        self.quarantine = quarantine
        self.state = state
        self.writer = writer
        self.intake = intake
        self.firehose = firehose

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RETRY_POLL)
            while taken := self.quarantine.take_retries(limit=1):
                held = taken[0]
                log.info("retrying a quarantined item", kind=held.kind, key=held.key, id=held.id)
                try:
                    await self._retry(held)
                except BaseException as e:  # noqa: BLE001 - a failure, or cancellation at shutdown: back in quarantine
                    why = "the runner stopped during the retry" if isinstance(e, asyncio.CancelledError) else f"{type(e).__name__}: {e}"
                    log.warning("retry of a quarantined item failed; it stays in quarantine", id=held.id, error=why)
                    self.quarantine.add(held.kind, held.key, held.item, f"retry failed ({why}); before: {held.reason}",
                                        held.attempts + 1)
                    if not isinstance(e, Exception):
                        raise

    async def _retry(self, held: Held) -> None:
        if held.kind == "result":
            self.state.requeue_result(held.key, held.item["rkey"], held.item["record"])
            self.writer.wake()
        elif held.kind == "frame" and self.firehose is not None:
            await self.firehose.reprocess(held.item)
        elif held.kind == "record":
            self.intake.retake(held.item)
        else:
            raise ValueError(f"a {held.kind} cannot be retried by this runner (ingest mode "
                             f"{'firehose' if self.firehose is not None else 'poll'})")
