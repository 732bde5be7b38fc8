"""What /healthz and /metrics say about a serving runner, read from its components when asked.

``health`` is the /healthz body: serving or not, degraded and why, for how long, how far behind,
how busy. ``conditions`` are the problems measured when /healthz asks (the rest are reported to
atrund.health as they happen); ``figures`` are the live numbers /metrics renders.
"""

from __future__ import annotations

from typing import Any

from atrund import __version__
from atrund.execute import Executor
from atrund.health import Health
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.ingest.poll import Poller
from atrund.metrics import Meters
from atrund.quarantine import Quarantine, QuarantineError
from atrund.results import ResultWriter
from atrund.runs import Runs
from atrund.state import Store, StoreError
from atrund.supervise import Supervisor
from atrund.ticks import Ticks
from atrund.triggers import Triggers
from atrund.trust import LiveAccess

OUTBOX_STALE = 60.0  # seconds: an unwritten result older than this makes /healthz say degraded


class Status:
    def __init__(self, did: str, executor: Executor, meters: Meters, problems: Health, supervisor: Supervisor, state: Store,
                 quarantine: Quarantine, policy: LiveAccess, runs: Runs, writer: ResultWriter, intake: Intake,
                 poller: Poller, firehose: Firehose | None, ticks: Ticks | None = None,
                 triggers: Triggers | None = None) -> None:
        self.did = did
        self.executor, self.meters, self.problems, self.supervisor = executor, meters, problems, supervisor
        self.state, self.quarantine, self.policy = state, quarantine, policy
        self.runs, self.scheduler, self.writer = runs, runs.scheduler, writer
        self.intake, self.poller, self.firehose = intake, poller, firehose
        self.ticks, self.triggers = ticks, triggers
        meters.watch(self.figures)
        problems.watch(self.conditions)

    def health(self) -> dict[str, Any]:
        pool = self.executor.stats()
        lag = self.meters.lag_seconds
        problems = self.problems.problems()
        return {
            "ok": not self.scheduler.stopped,
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "version": __version__,
            "did": self.did,
            "uptimeSeconds": round(self.meters.uptime(), 3),
            "ingestLagSeconds": round(lag, 3) if lag is not None else None,
            "queue": {"invocations": self.scheduler.queued(), "requests": self.scheduler.slot_waiters(),
                      "running": self.scheduler.running, "concurrency": self.scheduler.concurrency},
            "pool": {"isolation": pool.isolation, "warm": pool.warm, "hot": pool.hot, "busy": pool.busy,
                     "completed": pool.completed, "failed": pool.failed, "timeouts": pool.timeouts,
                     "coldStarts": pool.cold_starts, "hotHits": pool.hot_hits, "retired": pool.retired,
                     "latencyP50Ms": pool.latency_p50_ms, "latencyP95Ms": pool.latency_p95_ms},
            "schedules": self.ticks.figures() if self.ticks else None,
            "triggers": self.triggers.figures() if self.triggers else None,
            "replica": self.replica(),  # replicas sharing Postgres
        }

    def replica(self) -> dict[str, Any] | None:
        """/healthz's ``replica`` (and /metrics's atrund_replica_*): the store's figures of this
        replica and its claim lag (stored -> claimed here: the most recent, the median of the
        last claims); None on a store no replica shares (SQLite)."""
        if not self.state.shared:
            return None
        last, p50 = self.meters.claim_lags()
        return {**self.state.figures(), "claimLagLastSeconds": None if last is None else round(last, 3),
                "claimLagP50Seconds": None if p50 is None else round(p50, 3)}

    def conditions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.state.failing is not None:
            out["state"] = f"the state store fails: {self.state.failing}"
        if self.runs.held:
            out["held-outcomes"] = f"{len(self.runs.held)} finished invocations wait for the state store to record them"
        if self.policy.failing is not None:
            out["access"] = self.policy.failing
        if self.firehose is not None:
            out.update(self.firehose.conditions())
        try:
            depth, oldest = self.state.outbox_figures()
        except StoreError:
            return out  # said above
        if oldest is not None and oldest > OUTBOX_STALE:
            out["outbox"] = f"{depth} results are not written yet; the oldest has waited {oldest:.0f} s"
        return out

    def figures(self) -> dict[str, Any]:
        try:
            depth, oldest = self.state.outbox_figures()
        except StoreError:
            depth, oldest = None, None
        try:
            quarantined = self.quarantine.counts()
        except QuarantineError:
            quarantined = {}
        return {"queued": self.scheduler.queued(), "waiting_requests": self.scheduler.slot_waiters(),
                "running": self.scheduler.running, "pool": self.executor.stats(),
                "record_denials": self.intake.denied + self.runs.denied,
                "outbox_depth": depth, "outbox_oldest": oldest,
                "write_failures": self.writer.write_failures,
                "results_written": self.writer.written,
                "accepted": self.intake.accepted,
                "poll_failures": dict(self.poller.failures),
                "poll_unproven": self.poller.unproven,
                "firehose": self.firehose.figures() if self.firehose else None,
                "quarantined": quarantined, "loop_restarts": dict(self.supervisor.restarts),
                "store_failing": self.state.failing is not None,
                "replica": self.replica(),
                "schedules": self.ticks.figures() if self.ticks else None,
                "triggers": self.triggers.figures() if self.triggers else None}
