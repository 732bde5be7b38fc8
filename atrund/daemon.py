"""The runner: wiring of ingest → access → bundles → executor → results.

Reads like the path of one invocation: ``handle`` takes a stored invocation, checks it,
fetches and verifies its bundle, opens its sealed secrets, runs it and queues the result
record. Everything that can go wrong on that path ends in a result record that says what
happened, except a denied author (no record, by design) and a crash of the runner mid-run (an
"interrupted" result at the next start; the invocation is never started twice).

The same path serves the HTTP side (atrund.gateway): ``run_bundle`` for XRPC invoke, and
``prepare`` + ``execute`` for the gateway, which needs finer answers (HTTP statuses) than a
result record's status.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from atrund import __version__, bounds
from atrund.access import AccessPolicy, PermissionPolicy, PolicyFile
from atrund.bundles import BundleStore, VerifiedBundle, _field_errors
from atrund.config import Config
from atrund.errors import AtrundError, BundleRefused, EndpointUndeclared, NotFound, PermissionsRefused, Unreachable
from atrund.execute import ExecRequest, Executor, ExecutorError, create_executor
from atrund.execute.protocol import ExecPermissions, ExecResponse
from atrund.gateway import Gateway
from atrund.health import Health
from atrund.atproto.identity import Identities
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.ingest.poll import Poller
from atrund.metrics import Meters
from atrund.quarantine import Quarantine, QuarantineError
from atrund.records import (
    INVOCATION,
    RUNNER,
    Bundle,
    Invocation,
    Limits,
    Metrics,
    Permissions,
    Runner,
    SealedSecret,
    SecretsKey,
    StrongRef,
    now_iso,
    result_rkey,
    unix_time,
)
from atrund.atproto.repos import Repos
from atrund.results import ResultWriter, build
from atrund.schedule import Scheduler
from atrund.sealed import KeyFileError, Keyring, SecretError, redact_response
from atrund.atproto.session import Session
from atrund.state import State, Stored, StoreError
from atrund.supervise import Supervisor
from atrund.trust import LiveAccess

log = structlog.get_logger("atrund.daemon")

FETCH_ATTEMPTS = 3
STILL_POSTED_TIMEOUT = 3.0  # seconds
STALE_AFTER = 2.0  # seconds: older invocations are checked for deletion just before they start
STORE_RETRY = 2.0  # seconds before an invocation the state store could not claim is tried again
OUTBOX_STALE = 60.0  # seconds: an unwritten result older than this makes /healthz say degraded
RETRY_POLL = 2.0  # seconds between looks for operators' `atrund quarantine retry`


@dataclass
class Outcome:
    """How one run of a bundle ended, before it becomes a result record or an XRPC answer."""

    status: str
    data: Any = None
    error: str | None = None
    response: dict[str, Any] | None = None
    metrics: Metrics | None = None
    error_type: str | None = None


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.grants = PermissionPolicy.from_config(cfg.permissions)
        self.keyring = _load_keyring(cfg)
        self.identities = Identities(cfg.identity.plc_url, cfg.identity.cache_seconds, cfg.identity.timeout_seconds)
        self.repos = Repos(self.identities)
        # Who is served: the configuration, the policy file `atrund access` edits, and (follows,
        # list modes) the AT graph; kept current while the runner serves (atrund.trust).
        self.policy = LiveAccess(cfg.access, PolicyFile(cfg.access_file), self.repos)
        self.state = State(cfg.state.dir / "atrund.sqlite3")
        self.quarantine = Quarantine(cfg.state.dir / "quarantine.sqlite3")
        self.problems = Health()
        self.supervisor = Supervisor(self.problems)
        self._held: list[tuple[str, str, dict[str, Any]]] = []  # outcomes the state store could not take yet
        self._held_wake = asyncio.Event()
        self.executor: Executor = create_executor(cfg.executor, cfg.executor.isolation)
        extensions = {name: rt.extension for name, rt in self.executor.runtimes.items()}
        self.bundles = BundleStore(self.repos, cfg.state.dir / "bundles", cfg.bundles.max_bytes, extensions)
        lim = cfg.limits
        self.scheduler = Scheduler(self._guarded, self._reject_backlog, cfg.executor.concurrency,
                                   lim.per_author_concurrency, lim.per_author_per_minute, lim.per_author_burst,
                                   lim.per_author_backlog, check=self._still_posted)
        self.meters = Meters()
        self.meters.watch(self._live_figures)
        self.problems.watch(self._conditions)
        self.gateway: Gateway | None = Gateway(self) if cfg.gateway.enabled else None
        self.session: Session | None = None
        self.writer: ResultWriter | None = None
        self.intake: Intake | None = None
        self.poller: Poller | None = None
        self.firehose: Firehose | None = None

    # -- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        r = self.cfg.runner
        self.session = await Session.login(r.pds, r.identifier, r.password())
        self.writer = ResultWriter(self.session, self.state, self.quarantine, self.problems)
        await self.policy.start(self.session.did)
        self.policy.on_change = self._access_changed
        gateway_url = await self.gateway.start(self.session.did) if self.gateway is not None else None
        await self.session.put_record(RUNNER, "self", self.declaration(gateway_url).to_record())
        log.info("runner published", did=self.session.did, handle=self.session.handle, isolation=self.executor.isolation,
                 access=self.policy.mode, access_source=self.policy.source, authors=len(self._poll_authors()),
                 secrets_key=self.keyring.current.id if self.keyring else None, gateway=gateway_url)
        await self.executor.warm(self.cfg.executor.warm)
        self.recover()
        ingest = self.cfg.ingest
        # With a firehose, polling is only the periodic rescan that catches what the stream missed.
        interval = ingest.poll_interval if ingest.mode == "poll" else ingest.reconcile_interval
        self.intake = Intake(self.state, self.session.did, self.policy, self.submit, self.quarantine, self._refuse_reused)
        self.poller = Poller(self.repos, self.intake, self._poll_authors(), interval, ingest.reconcile_interval, self.problems)
        if ingest.mode == "firehose":
            url = ingest.firehose_url or self.cfg.runner.pds.replace("https://", "wss://").replace("http://", "ws://")
            self.firehose = Firehose(url, self.repos, self.intake)  # its health is read: conditions()

    def declaration(self, gateway_url: str | None = None) -> Runner:
        e, g = self.cfg.executor, self.cfg.gateway
        limits = Limits(
            timeout_seconds=e.max_timeout, default_timeout_seconds=e.default_timeout,
            max_bundle_bytes=self.cfg.bundles.max_bytes, max_output_bytes=e.max_output_bytes,
            memory_mb=e.memory_mb, concurrency=e.concurrency,
        )
        if gateway_url is not None:  # only limits of what this runner really serves
            limits.gateway_requests_per_minute = int(g.rate_per_minute)
            limits.gateway_timeout_seconds = min(g.timeout, e.max_timeout)
            limits.max_request_bytes = g.max_body_bytes
        return Runner(
            runtimes=sorted(self.executor.runtimes),
            isolation=self.executor.isolation,
            monitor=self.executor.monitor,
            access_mode=self.policy.mode,
            access_source=self.policy.source,
            secrets_key=SecretsKey.model_validate(self.keyring.current.to_record()) if self.keyring else None,
            created_at=now_iso(),
            description=self.cfg.runner.description,
            version=__version__,
            limits=limits,
            gateway_url=gateway_url,
        )

    def _poll_authors(self) -> list[str]:
        """The configured ingest.authors, else everyone the access policy names as served."""
        return self.cfg.ingest.authors if self.cfg.ingest.authors is not None else self.policy.served()

    def _access_changed(self, policy: AccessPolicy) -> None:
        if self.poller is not None:
            self.poller.authors = self._poll_authors()
        log.info("access policy changed", mode=policy.mode, allowed=len(policy.allowlist), blocked=len(policy.blocklist),
                 trusted=len(policy.trusted), polled=len(self.poller.authors) if self.poller else None)

    def recover(self) -> None:
        """Finish what a previous run of the runner left: never start anything twice."""
        for inv in self.state.with_state("running"):
            log.warning("invocation was running when the runner stopped; not running it again", uri=inv.uri)
            self._finish(inv, "error", error="interrupted: the runner stopped while this invocation was running; "
                         "it was not started again (invocations run at most once)")
        for inv in self.state.with_state("pending"):
            self.submit(inv.uri)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then drain running work and stop cleanly.

        Every loop runs under the supervisor: one that fails is restarted with backoff and
        reported on /healthz, never a reason to stop serving."""
        assert self.poller and self.writer
        loops = {"poller": self.poller.run, "writer": self.writer.run, "scheduler": self.scheduler.run,
                 "access": self.policy.run, "held-outcomes": self._record_held, "quarantine-retries": self._take_retries}
        if self.firehose is not None:
            loops["firehose"] = self.firehose.run
        for name, loop in loops.items():
            self.supervisor.start(name, loop)
        await stop.wait()
        self.supervisor.stopping = True
        await self.supervisor.stop(["poller", "firehose", "access", "quarantine-retries"])
        if self.gateway is not None:
            await self.gateway.close()  # stop taking requests first; the ones in flight finish
        await self.scheduler.stop()  # running invocations finish; queued ones wait for the next start
        await self.supervisor.stop(["scheduler", "held-outcomes"])
        self._store_held()
        if self._held:
            log.error("outcomes not recorded: the state store still fails; these invocations will read as interrupted",
                      count=len(self._held), uris=[uri for uri, _, _ in self._held][:20])
        await self.supervisor.stop()  # the writer loop too: the last flush below must not run beside it
        try:
            await self.writer.flush()
        except Exception as e:  # noqa: BLE001 - whatever is left is written at the next start
            log.error("results not flushed at shutdown; they are written at the next start", error=f"{type(e).__name__}: {e}")

    async def close(self) -> None:
        if self.gateway is not None:
            await self.gateway.close()
        await self.executor.shutdown()
        await self.repos.close()
        if self.session is not None:
            await self.session.close()
        self.state.close()
        self.quarantine.close()

    # -- operations (/healthz, /metrics) -------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What /healthz says: serving or not, degraded and why, for how long, how far behind, how busy."""
        pool = self.executor.stats()
        lag = self.meters.lag_seconds
        problems = self.problems.problems()
        return {
            "ok": self.session is not None and not self.scheduler.stopped,
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "version": __version__,
            "did": self.session.did if self.session else None,
            "uptimeSeconds": round(self.meters.uptime(), 3),
            "ingestLagSeconds": round(lag, 3) if lag is not None else None,
            "queue": {"invocations": self.scheduler.queued(), "requests": self.scheduler.slot_waiters(),
                      "running": self.scheduler.running, "concurrency": self.scheduler.concurrency},
            "pool": {"isolation": pool.isolation, "warm": pool.warm, "busy": pool.busy, "completed": pool.completed,
                     "failed": pool.failed, "timeouts": pool.timeouts, "coldStarts": pool.cold_starts,
                     "latencyP50Ms": pool.latency_p50_ms, "latencyP95Ms": pool.latency_p95_ms},
        }

    def _conditions(self) -> dict[str, str]:
        """Problems measured when /healthz asks (the rest are reported as they happen)."""
        out: dict[str, str] = {}
        if self.state.failing is not None:
            out["state"] = f"the state store fails: {self.state.failing}"
        if self._held:
            out["held-outcomes"] = f"{len(self._held)} finished invocations wait for the state store to record them"
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

    def _live_figures(self) -> dict[str, Any]:
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
                "record_denials": self.intake.denied if self.intake else 0,
                "outbox_depth": depth, "outbox_oldest": oldest,
                "write_failures": self.writer.write_failures if self.writer else 0,
                "results_written": self.writer.written if self.writer else 0,
                "accepted": self.intake.accepted if self.intake else 0,
                "poll_failures": dict(self.poller.failures) if self.poller else {},
                "firehose": self.firehose.figures() if self.firehose else None,
                "quarantined": quarantined, "loop_restarts": dict(self.supervisor.restarts),
                "store_failing": self.state.failing is not None}

    # -- one invocation ------------------------------------------------------------------

    def submit(self, uri: str) -> None:
        """Queue a stored, pending invocation; the scheduler decides when it runs."""
        self.scheduler.submit(uri.removeprefix("at://").split("/", 1)[0], uri)

    def _reject_backlog(self, uri: str, why: str) -> None:
        try:
            stored = self.state.pending(uri)
        except StoreError as e:
            self._store_later(uri, e)
            return
        if stored is not None:
            self._finish(stored, "rejected", error=why)

    async def _guarded(self, uri: str) -> None:
        try:
            stored = self.state.pending(uri)
            if stored is None:
                return
            if not self.policy.allows(stored.author):  # access was withdrawn while it waited: as if it came now
                if self.state.deny(uri):
                    self.intake.denied += 1
                    log.warning("invocation denied by access policy (withdrawn while it waited)", uri=uri, mode=self.policy.mode)
                return
        except StoreError as e:
            self._store_later(uri, e)
            return
        self.meters.ingested(stored.value.get("createdAt") if isinstance(stored.value, dict) else None, stored.seen_at)
        try:
            await self.handle(stored)
        except StoreError as e:  # it could not be claimed: nothing started; it stays pending
            self._store_later(uri, e)
        except Exception as e:  # a bug of ours must still end in a result, not a silent loss
            log.exception("internal error while handling an invocation", uri=uri)
            self._finish(stored, "error", error=f"internal error in the runner: {type(e).__name__}")

    def _store_later(self, uri: str, e: StoreError) -> None:
        """The store failed before the invocation started: it stays pending (in the store, if the
        store took it at all) and is queued again shortly, never dropped from the live queue."""
        log.warning("state store failed before an invocation started; queued again", uri=uri, error=str(e),
                    retry_in_s=STORE_RETRY)
        asyncio.get_running_loop().call_later(STORE_RETRY, self.submit, uri)

    async def handle(self, inv: Stored) -> None:
        try:
            record = Invocation.model_validate(bounds.check_fields(inv.value))
        except (ValidationError, bounds.Malformed) as e:
            detail = _field_errors(e) if isinstance(e, ValidationError) else str(e)
            self._finish(inv, "rejected", error=f"invalid invocation record: {detail}")
            return
        if not self.state.mark_running(inv.uri):
            return
        out = await self.run_bundle(record.bundle, record.endpoint, record.args or {}, record.timeout, queued_since=inv.seen_at,
                                    author=inv.author, secrets=record.secrets)
        self._finish(inv, out.status, bundle=record.bundle, data=out.data, error=out.error, response=out.response,
                     metrics=out.metrics, error_type=out.error_type)

    async def run_bundle(self, ref: StrongRef, endpoint: str, args: dict[str, Any], timeout: int | None, *, queued_since: float,
                         attempts: int = FETCH_ATTEMPTS, take_slot: bool = False, author: str | None = None,
                         secrets: list[SealedSecret] | None = None) -> Outcome:
        """Fetch the pinned bundle, check it may run here, run it: every way this ends is an Outcome.

        ``take_slot``: for callers outside the scheduler (XRPC invoke), which must still hold
        one of the executor's slots while the bundle runs.
        """
        try:
            bundle = await self._fetch(ref, attempts)
        except BundleRefused as e:
            return Outcome("rejected", error=str(e))
        except (AtrundError, ValueError) as e:
            return Outcome("error", error=f"bundle unavailable: {e}")
        try:
            request = self.prepare(bundle, endpoint, args, timeout, author=author, secrets=secrets)
        except BundleRefused as e:
            return Outcome("rejected", error=str(e))
        except SecretError as e:
            return Outcome("error", error=str(e), error_type="SecretError")
        started = time.time()
        response = await self.execute(request, bundle.record.runtime, take_slot=take_slot)
        status = "success" if response.success else ("timeout" if response.timed_out else "error")
        metrics = Metrics(
            execution_time_ms=response.metrics.execution_time_ms,
            queued_ms=max(0, int((started - queued_since) * 1000)),
            isolation=self.executor.isolation,
            runtime=bundle.record.runtime,
        )
        return Outcome(status, data=response.data if response.success else None, error=response.error,
                       response=response.response.model_dump(by_alias=True) if response.response else None,
                       metrics=metrics, error_type=response.error_type)

    async def _still_posted(self, uri: str) -> bool:
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
        created = unix_time(inv.value.get("createdAt")) if isinstance(inv.value, dict) else None
        if created is None:
            created = 0.0  # unreadable: treat as old
        if time.time() - inv.seen_at <= STALE_AFTER and inv.seen_at - created <= STALE_AFTER:
            return True
        did, _collection, rkey = inv.uri.removeprefix("at://").split("/", 2)
        try:
            # repo.getRecord, not the proof-carrying sync.getRecord: what we hold was proven to be
            # the author's already; this only asks whether it is still there at the same CID.
            cid, value = await asyncio.wait_for(self.repos.get_record(did, INVOCATION, rkey), STILL_POSTED_TIMEOUT)
        except NotFound:
            cid, value = None, None
        except (AtrundError, TimeoutError) as e:
            log.info("could not check that the invocation is still posted; running it", uri=inv.uri, error=str(e) or "timeout")
            return True
        if cid == inv.cid:
            return True
        try:
            if cid is not None:  # changed in place, or deleted and created again: one key, one run
                self._refuse_reused(inv.uri, inv.author, cid, value)
            elif self.state.withdraw(inv.uri):
                log.info("invocation withdrawn by its author before it ran (deleted); not run", uri=inv.uri)
        except StoreError:
            return True  # still pending in the store: the claim decides, and requeues
        return False

    def prepare(self, bundle: VerifiedBundle, endpoint: str, args: dict[str, Any], timeout: int | None,
                max_timeout: int | None = None, *, author: str | None = None,
                secrets: list[SealedSecret] | None = None) -> ExecRequest:
        """The ExecRequest for ``endpoint`` of a verified bundle, its sealed secrets (and the
        invocation's, ``author``'s) opened into its env. Raises BundleRefused (a subclass naming
        why) if the bundle does not declare the endpoint or asks for more than is granted, and
        SecretError (naming the secret) if a secret cannot be used."""
        b = bundle.record
        if b.endpoints is not None and endpoint not in b.endpoints:
            raise EndpointUndeclared(f"endpoint {endpoint!r} is not one the bundle declares ({', '.join(b.endpoints) or 'none'})")
        refused = self.grants.refused(b.permissions)
        if refused:
            raise PermissionsRefused(f"the bundle asks for permissions this runner does not grant: {', '.join(refused)}")
        e = self.cfg.executor
        asked = b.permissions or Permissions()
        return ExecRequest(
            code_path=str(bundle.code_path),
            endpoint=endpoint,
            args=args,
            permissions=ExecPermissions(net=asked.net or [], read=asked.read or [], write=asked.write or [], env=asked.env or []),
            timeout=min(timeout or e.default_timeout, e.max_timeout, max_timeout or e.max_timeout),
            env=self.open_secrets(bundle.ref.uri, b, author, secrets),
        )

    async def execute(self, request: ExecRequest, runtime: str, *, take_slot: bool = False) -> ExecResponse:
        """Run a prepared request; a failure of the executor itself becomes a response naming it.
        Nothing the runner writes or logs afterwards carries a secret value verbatim: the answer
        is redacted here, once, for every path (see atrund.sealed.redact)."""
        try:
            if take_slot:
                async with self.scheduler.slot():
                    response = await self.executor.execute(request, runtime)
            else:
                response = await self.executor.execute(request, runtime)
        except ExecutorError as err:
            log.error("executor failed", endpoint=request.endpoint, error=str(err))
            response = ExecResponse(success=False, error=f"the runner could not run the bundle: {err}", error_type="ExecutorError")
        return redact_response(response, request.env)

    def open_secrets(self, bundle_uri: str, bundle: Bundle, author: str | None = None,
                     invocation_secrets: list[SealedSecret] | None = None) -> dict[str, str]:
        """The environment a run gets: the bundle record's sealed secrets, then the invocation's
        (``author``'s; they win on a name clash), opened. A run without an invocation record (the
        HTTP gateway) passes none and gets the bundle's own secrets.

        Every name must be one the bundle's permissions.env lists (and so one the runner grants,
        or the bundle would not run at all): a secret the bundle could never see is a mistake
        worth saying, not dropping silently. Raises SecretError naming the secret.
        """
        assert self.session
        sources = [("bundle record", bundle.secrets, bundle_uri.removeprefix("at://").split("/", 1)[0]),
                   ("invocation", invocation_secrets, author)]
        if not any(items for _, items, _ in sources):
            return {}
        if self.keyring is None:
            raise SecretError("sealed secrets were given, but this runner has no secrets key (its dev.atrun.runner record "
                              "publishes none), so it cannot open them")
        allowed = set((bundle.permissions.env or []) if bundle.permissions else [])
        env: dict[str, str] = {}
        for where, items, sealer in sources:
            sealed = [s.to_record() for s in items or []]
            for item in sealed:
                if item["name"] not in allowed:
                    raise SecretError(f"secret {item['name']!r} in the {where} is not a name the bundle's permissions.env "
                                      f"lists ({', '.join(sorted(allowed)) or 'none'}), so the bundle could never see it")
            if sealed:
                env.update(self.keyring.open(sealed, author=sealer, runner=self.session.did, bundle_uri=bundle_uri, where=where))
        return env

    async def _fetch(self, ref: StrongRef, attempts: int = FETCH_ATTEMPTS) -> VerifiedBundle:
        for attempt in range(attempts):
            try:
                return await self.bundles.get(ref)
            except Unreachable as e:
                if attempt == attempts - 1:
                    raise
                log.info("bundle fetch failed; retrying", bundle=ref.uri, error=str(e))
                await asyncio.sleep(2**attempt)
        raise AssertionError("unreachable")

    def _finish(self, inv: Stored, status: str, *, bundle: StrongRef | None = None, metrics: Metrics | None = None,
                error_type: str | None = None, **fields: Any) -> None:
        assert self.session and self.writer
        metrics = metrics or Metrics()
        metrics.total_ms = max(0, int((time.time() - inv.seen_at) * 1000))
        inv_ref = StrongRef(uri=inv.uri, cid=inv.cid)
        # build() turns an answer no record can hold into an error result that says why: the log,
        # the meters and the state record the status the result has, not the one asked for.
        result = build(inv_ref, bundle or _bundle_ref(inv.value, inv_ref), status, metrics=metrics, **fields)
        # The canonical line before the commit: a kill just after the commit must not lose it.
        log.info("invocation", uri=inv.uri, author=inv.author, status=result.status, bundle=(bundle.cid if bundle else None),
                 runtime=metrics.runtime, isolation=metrics.isolation, queued_ms=metrics.queued_ms,
                 exec_ms=metrics.execution_time_ms, total_ms=metrics.total_ms, error_type=error_type,
                 error=result.error)
        self.meters.finished("record", result.status, metrics.runtime, metrics.execution_time_ms, metrics.total_ms / 1000)
        self._held.append((inv.uri, result.status, result.to_record()))
        self._store_held()

    def _refuse_reused(self, uri: str, author: str, cid: str, value: Any) -> None:
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
            if self.writer is not None:
                self.writer.wake()

    def _store_held(self) -> None:
        """Record held outcomes (done + result queued, in one transaction each), oldest first. One
        the store cannot take stays held, and the held-outcomes loop tries again: a finished run is
        never relabelled "interrupted" because the store failed for a while."""
        while self._held:
            uri, status, record = self._held[0]
            try:
                self.state.finish(uri, status, result_rkey(uri), record)
            except StoreError as e:
                log.warning("outcome held: the state store failed; it is recorded once the store answers", uri=uri,
                            error=str(e), held=len(self._held))
                self._held_wake.set()
                return
            self._held.pop(0)
            if self.writer is not None:
                self.writer.wake()

    async def _record_held(self) -> None:
        delay = 1.0
        while True:
            await self._held_wake.wait()
            self._held_wake.clear()
            while self._held:
                await asyncio.sleep(delay)
                self._store_held()
                delay = min(delay * 2, 30.0) if self._held else 1.0

    async def _take_retries(self) -> None:
        """Apply operators' `atrund quarantine retry`: the item goes back where it came from. One
        at a time, and put back if its retry fails or is interrupted: none is lost on the way."""
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

    async def _retry(self, held) -> None:
        if held.kind == "result":
            self.state.requeue_result(held.key, held.item["rkey"], held.item["record"])
            self.writer.wake()
        elif held.kind == "frame" and self.firehose is not None:
            await self.firehose.reprocess(held.item)
        elif held.kind == "record" and self.intake is not None:
            self.intake.retake(held.item)
        else:
            raise ValueError(f"a {held.kind} cannot be retried by this runner (ingest mode {self.cfg.ingest.mode})")


def _load_keyring(cfg: Config) -> Keyring | None:
    """The runner's secrets keys; None (sealed secrets refused) when the default key file does
    not exist. A key file the configuration names explicitly must load."""
    path = cfg.key_file
    if cfg.secrets.key_file is None and not path.exists():
        if cfg.secrets.old_key_files:
            raise KeyFileError(f"secrets.old_key_files is set but there is no current key at {path} (atrund keys init)")
        log.info("no secrets key: sealed secrets are refused; create one with `atrund keys init`", key_file=str(path))
        return None
    return Keyring.load(path, cfg.secrets.old_key_files)


def _bundle_ref(value: dict, fallback: StrongRef) -> StrongRef:
    """The invocation's bundle reference if it is readable, else the invocation's own (documented)."""
    try:
        return StrongRef.model_validate(value.get("bundle"))
    except ValidationError:
        return fallback
