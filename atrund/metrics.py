"""What the runner counts, for /metrics (Prometheus text format) and /healthz.

One ``Meters`` per daemon, on its own CollectorRegistry rather than prometheus-client's global
one: two runners in one process (the tests) must not share or collide on counters. Figures
owned elsewhere (queue depth, pool statistics, denials of invocation records) are read when
scraped, through a collector, so there is one source of truth for each.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from atrund.records import unix_time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLAIM_WINDOW = 256  # the most recent claims the claim lag's median is taken over
ROLES = ("ingest", "execute", "gateway")


class Meters:
    def __init__(self) -> None:
        self.started = time.time()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.invocations = Counter("atrund_invocations", "Bundle runs finished, by how they were asked for, status and runtime",
                                   ["source", "status", "runtime"], registry=r)
        self.execution = Histogram("atrund_execution_seconds", "Time inside the endpoint, as the runtime measured it",
                                   ["runtime"], buckets=LATENCY_BUCKETS, registry=r)
        self.total = Histogram("atrund_invocation_seconds", "From seeing an invocation (or receiving a request) to its answer",
                               ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self.denied = {"gateway": 0, "xrpc": 0}  # with the record denials ingest counts: atrund_denials_total
        self.gateway_requests = Counter("atrund_gateway_requests", "HTTP requests answered by the gateway, by route and status",
                                        ["route", "status"], registry=r)
        self.rate_limited = Counter("atrund_gateway_rate_limited", "Gateway requests refused with 429 (per-bundle rate limit)",
                                    registry=r)
        self.ingest_lag = Histogram("atrund_ingest_lag_seconds", "From an invocation's createdAt to the runner seeing it",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.last_ingest_lag = Gauge("atrund_ingest_lag_last_seconds", "Ingest lag of the most recent invocation", registry=r)
        self.auth_failures = Counter("atrund_xrpc_auth_failures", "XRPC calls refused for their service-auth token, by reason",
                                     ["reason"], registry=r)
        self.lag_seconds: float | None = None
        self.claim_lag = Histogram("atrund_claim_lag_seconds", "From storing an invocation to claiming it to run (here)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.last_claim_lag = Gauge("atrund_claim_lag_last_seconds", "Claim lag of the most recent claim", registry=r)
        self._claim_lags: deque[float] = deque(maxlen=CLAIM_WINDOW)

    def watch(self, read: Callable[[], dict[str, Any]]) -> None:
        """Read live figures (queue, pool, record denials) from ``read`` at every scrape."""
        self.registry.register(_Live(read, self.denied))

    def finished(self, source: str, status: str, runtime: str | None, exec_ms: int | None, total_s: float | None) -> None:
        self.invocations.labels(source, status, runtime or "unknown").inc()
        if exec_ms is not None:
            self.execution.labels(runtime or "unknown").observe(exec_ms / 1000)
        if total_s is not None:
            self.total.labels(source).observe(max(0.0, total_s))

    def ingested(self, created_at: Any, seen_at: float) -> None:
        """Lag of one invocation record; createdAt is the author's claim, so bad or future values are skipped."""
        created = unix_time(created_at)
        if created is None:
            return
        lag = seen_at - created
        if 0 <= lag < 86_400 * 365:
            self.ingest_lag.observe(lag)
            self.last_ingest_lag.set(lag)
            self.lag_seconds = lag

    def claimed(self, lag: float) -> None:
        """An invocation stored ``lag`` seconds ago was claimed (pending -> running) here."""
        lag = max(0.0, lag)
        self.claim_lag.observe(lag)
        self.last_claim_lag.set(lag)
        self._claim_lags.append(lag)

    def claim_lags(self) -> tuple[float | None, float | None]:
        """The most recent claim lag and the median of the last CLAIM_WINDOW (None: no claim yet)."""
        if not self._claim_lags:
            return None, None
        return self._claim_lags[-1], statistics.median(self._claim_lags)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def uptime(self) -> float:
        return time.time() - self.started


class _Live:
    def __init__(self, read: Callable[[], dict[str, Any]], denied: dict[str, int]) -> None:
        self.read = read
        self.denied = denied

    def describe(self):  # nothing to describe up front: figures exist only once the daemon runs
        return []

    def collect(self):
        live = self.read()
        queue = GaugeMetricFamily("atrund_queue_depth", "Work waiting for an execution slot", labels=["kind"])
        queue.add_metric(["invocation"], live["queued"])
        queue.add_metric(["request"], live["waiting_requests"])
        yield queue
        yield GaugeMetricFamily("atrund_running", "Bundles running now (all sources)", value=live["running"])
        pool = live["pool"]
        warm = GaugeMetricFamily("atrund_pool_warm_workers", "Started workers waiting for a request", labels=["runtime"])
        for runtime, n in sorted(pool.warm.items()):
            warm.add_metric([runtime], n)
        yield warm
        yield GaugeMetricFamily("atrund_pool_hot_workers", "Workers kept for the next request of their bundle", value=pool.hot)
        yield GaugeMetricFamily("atrund_pool_busy_workers", "Workers running a request", value=pool.busy)
        for name, value, doc in (("completed", pool.completed, "Requests that ended in success"),
                                 ("failed", pool.failed, "Requests that ended in a failure of the bundle"),
                                 ("timeouts", pool.timeouts, "Requests killed at their deadline"),
                                 ("cold_starts", pool.cold_starts, "Requests that found no hot or warm worker"),
                                 ("hot_hits", pool.hot_hits, "Requests served by a worker kept from an earlier request"),
                                 ("retired", pool.retired, "Workers that answered cleanly but were not kept")):
            yield CounterMetricFamily(f"atrund_pool_{name}", doc, value=value)
        for name, value, doc in (("connections", pool.egress_connections, "Connections the egress proxy let out"),
                                 ("refused", pool.egress_refused, "Connections the egress proxy refused"),
                                 ("bytes_out", pool.egress_bytes_out, "Bytes bundles sent through the egress proxy"),
                                 ("bytes_in", pool.egress_bytes_in, "Bytes bundles received through the egress proxy")):
            yield CounterMetricFamily(f"atrund_egress_{name}", doc, value=value)
        denied = CounterMetricFamily("atrund_denials", "Authors or callers the access policy refused, by where they came from",
                                     labels=["source"])
        for source, n in {"record": live["record_denials"], **self.denied}.items():
            denied.add_metric([source], n)
        yield denied
        # Health of the loops around the runs: what /healthz calls degraded, as numbers.
        if live.get("outbox_depth") is not None:
            yield GaugeMetricFamily("atrund_outbox_depth", "Result records waiting to be written", value=live["outbox_depth"])
            yield GaugeMetricFamily("atrund_outbox_oldest_seconds", "How long the oldest unwritten result has waited",
                                    value=live["outbox_oldest"] or 0.0)
        yield CounterMetricFamily("atrund_result_write_failures", "Result writes that failed and will be retried",
                                  value=live.get("write_failures", 0))
        yield CounterMetricFamily("atrund_results_written", "Result records the runner's PDS took",
                                  value=live.get("results_written", 0))
        yield CounterMetricFamily("atrund_invocations_accepted", "Invocation records stored to run (allowed, addressed here)",
                                  value=live.get("accepted", 0))
        polls = CounterMetricFamily("atrund_poll_failures", "Polls of an author's repo that failed, by author", labels=["author"])
        for author, n in sorted(live.get("poll_failures", {}).items()):
            polls.add_metric([author], n)
        yield polls
        yield CounterMetricFamily("atrund_poll_unproven", "Listed invocations the author's signed repo did not prove as listed "
                                  "(refused, or replaced by the signed version)", value=live.get("poll_unproven", 0))
        quarantined = GaugeMetricFamily("atrund_quarantined", "Items in quarantine (atrund quarantine list), by kind",
                                        labels=["kind"])
        for kind in ("result", "frame", "record"):
            quarantined.add_metric([kind], live.get("quarantined", {}).get(kind, 0))
        yield quarantined
        restarts = CounterMetricFamily("atrund_loop_restarts", "Runner loops restarted after a failure, by loop", labels=["loop"])
        for loop, n in sorted(live.get("loop_restarts", {}).items()):
            restarts.add_metric([loop], n)
        yield restarts
        yield GaugeMetricFamily("atrund_state_store_failing", "1 while the state store answers with errors",
                                value=1 if live.get("store_failing") else 0)
        replica = live.get("replica")
        if replica is not None:  # replicas sharing Postgres: the figures /healthz calls ``replica``
            yield from _replica(replica)
        firehose = live.get("firehose")
        if firehose is not None:
            yield GaugeMetricFamily("atrund_firehose_connected", "1 while the firehose socket is open", value=int(firehose["connected"]))
            if firehose["last_frame_age"] is not None:
                yield GaugeMetricFamily("atrund_firehose_last_frame_seconds", "Seconds since the last firehose frame",
                                        value=firehose["last_frame_age"])
            frames = CounterMetricFamily("atrund_firehose_frames", "Firehose frames, by what became of them", labels=["outcome"])
            c = firehose["counters"]
            for outcome in ("frames", "skipped_fast", "proven", "fetched", "forged", "malformed", "failed", "implausible", "stalls"):
                frames.add_metric([outcome], getattr(c, outcome, 0))
            yield frames
        schedules = live.get("schedules")
        if schedules is not None:
            yield GaugeMetricFamily("atrund_schedules", "Schedules this runner runs", value=schedules["active"])
            yield GaugeMetricFamily("atrund_schedules_refused", "Schedules refused (invalid, too frequent, past the author's limit)",
                                    value=schedules["refused"])
            yield CounterMetricFamily("atrund_schedule_ticks", "Schedule ticks queued to run", value=schedules["ticks"])
            yield CounterMetricFamily("atrund_schedule_ticks_skipped",
                                      "Schedule ticks not run (missed while down, fallen behind, author not served)",
                                      value=schedules["skipped"])
        triggers = live.get("triggers")
        if triggers is not None:
            yield GaugeMetricFamily("atrund_triggers", "Triggers this runner follows", value=triggers["active"])
            yield GaugeMetricFamily("atrund_triggers_refused", "Triggers refused (invalid, wildcards, past the limits)",
                                    value=triggers["refused"])
            yield GaugeMetricFamily("atrund_trigger_collections", "Collections the firehose decodes for triggers",
                                    value=triggers["collections"])
            yield CounterMetricFamily("atrund_trigger_firings", "Trigger firings stored to run", value=triggers["fired"])
            yield CounterMetricFamily("atrund_trigger_drops", "Trigger firings dropped: the trigger's backlog was full",
                                      value=triggers["dropped"])
            yield GaugeMetricFamily("atrund_trigger_waiting", "Trigger firings waiting for their trigger's rate",
                                    value=triggers["waiting"])


def _replica(r: dict[str, Any]):
    """This replica's figures (atrund.pgstate.PgState.figures): who it is, its roles, whether it
    leads ingest, its lease's age, one round trip to Postgres."""
    info = GaugeMetricFamily("atrund_replica_info", "This replica of the runner (1), by its id", labels=["replica"])
    info.add_metric([r["id"]], 1)
    yield info
    roles = GaugeMetricFamily("atrund_replica_role", "1 for each role this replica has", labels=["role"])
    for role in ROLES:
        roles.add_metric([role], int(role in r["roles"]))
    yield roles
    yield GaugeMetricFamily("atrund_replica_ingest_leader", "1 while this replica holds the fleet's ingest lock",
                            value=int(bool(r["ingestLeader"])))
    if r["leaseAgeSeconds"] is not None:
        yield GaugeMetricFamily("atrund_replica_lease_age_seconds", "Seconds since this replica's last heartbeat "
                                "(others take over its work past the lease)", value=r["leaseAgeSeconds"])
    yield GaugeMetricFamily("atrund_replica_lease_seconds", "Heartbeat silence after which a replica is presumed dead",
                            value=r["leaseSeconds"])
    yield GaugeMetricFamily("atrund_replica_postgres_up", "1 if Postgres answered this scrape's round trip",
                            value=int(r["postgresRoundTripMs"] is not None))
    if r["postgresRoundTripMs"] is not None:
        yield GaugeMetricFamily("atrund_replica_postgres_round_trip_seconds", "One SELECT 1 to Postgres, at this scrape",
                                value=r["postgresRoundTripMs"] / 1000)
