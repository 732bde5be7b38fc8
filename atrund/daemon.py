"""The runner: wiring of ingest → access → bundles → executor → results.

Reads like the path of one invocation: ``handle`` takes a stored invocation, checks it,
fetches and verifies its bundle, opens its sealed secrets, runs it and queues the result
record. Everything that can go wrong on that path ends in a result record that says what
happened, except a denied author (no record, by design) and a crash of the runner mid-run (an
"interrupted" result at the next start; the invocation is never started twice).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from pydantic import ValidationError

from atrund import __version__
from atrund.access import AccessPolicy, PermissionPolicy, PolicyFile
from atrund.bundles import BundleStore, _field_errors
from atrund.config import Config
from atrund.errors import AtrundError, BundleRefused, Unreachable
from atrund.execute import ExecRequest, Executor, ExecutorError, create_executor
from atrund.execute.protocol import ExecPermissions, ExecResponse
from atrund.identity import Identities
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.ingest.poll import Poller
from atrund.records import (
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
)
from atrund.repos import Repos
from atrund.results import ResultWriter, build
from atrund.schedule import Scheduler
from atrund.sealed import KeyFileError, Keyring, SecretError, redact_response
from atrund.session import Session
from atrund.state import State, Stored
from atrund.trust import LiveAccess

log = structlog.get_logger("atrund.daemon")

FETCH_ATTEMPTS = 3


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
        self.executor: Executor = create_executor(cfg.executor, cfg.executor.isolation)
        extensions = {name: rt.extension for name, rt in self.executor.runtimes.items()}
        self.bundles = BundleStore(self.repos, cfg.state.dir / "bundles", cfg.bundles.max_bytes, extensions)
        lim = cfg.limits
        self.scheduler = Scheduler(self._guarded, self._reject_backlog, cfg.executor.concurrency,
                                   lim.per_author_concurrency, lim.per_author_per_minute, lim.per_author_burst,
                                   lim.per_author_backlog)
        self.session: Session | None = None
        self.writer: ResultWriter | None = None
        self.poller: Poller | None = None
        self.firehose: Firehose | None = None

    # -- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        r = self.cfg.runner
        self.session = await Session.login(r.pds, r.identifier, r.password())
        self.writer = ResultWriter(self.session, self.state)
        await self.policy.start(self.session.did)
        self.policy.on_change = self._access_changed
        await self.session.put_record(RUNNER, "self", self.declaration().to_record())
        log.info("runner published", did=self.session.did, handle=self.session.handle, isolation=self.executor.isolation,
                 access=self.policy.mode, access_source=self.policy.source, authors=len(self._poll_authors()),
                 secrets_key=self.keyring.current.id if self.keyring else None)
        await self.executor.warm(self.cfg.executor.warm)
        self.recover()
        ingest = self.cfg.ingest
        # With a firehose, polling is only the periodic rescan that catches what the stream missed.
        interval = ingest.poll_interval if ingest.mode == "poll" else ingest.reconcile_interval
        self.intake = Intake(self.state, self.session.did, self.policy, self.submit)
        self.poller = Poller(self.repos, self.intake, self._poll_authors(), interval, ingest.reconcile_interval)
        if ingest.mode == "firehose":
            url = ingest.firehose_url or self.cfg.runner.pds.replace("https://", "wss://").replace("http://", "ws://")
            self.firehose = Firehose(url, self.repos, self.intake)

    def declaration(self) -> Runner:
        e = self.cfg.executor
        return Runner(
            runtimes=sorted(self.executor.runtimes),
            isolation=self.executor.isolation,
            access_mode=self.policy.mode,
            access_source=self.policy.source,
            secrets_key=SecretsKey.model_validate(self.keyring.current.to_record()) if self.keyring else None,
            created_at=now_iso(),
            description=self.cfg.runner.description,
            version=__version__,
            limits=Limits(
                timeout_seconds=e.max_timeout, default_timeout_seconds=e.default_timeout,
                max_bundle_bytes=self.cfg.bundles.max_bytes, max_output_bytes=e.max_output_bytes,
                memory_mb=e.memory_mb, concurrency=e.concurrency,
            ),
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
        """Serve until ``stop`` is set; then drain running work and stop cleanly."""
        assert self.poller and self.writer
        loops = [asyncio.create_task(self.poller.run(), name="poller"), asyncio.create_task(self.writer.run(), name="writer"),
                 asyncio.create_task(self.scheduler.run(), name="scheduler"), asyncio.create_task(self.policy.run(), name="access")]
        if self.firehose is not None:
            loops.append(asyncio.create_task(self.firehose.run(), name="firehose"))
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopping, *loops], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopping:  # a loop must never end by itself: say why, and stop cleanly
                log.error("a runner loop stopped unexpectedly; shutting down", loop=task.get_name(),
                          error=repr(task.exception()) if not task.cancelled() else "cancelled")
        stopping.cancel()
        for loop in loops:
            if loop.get_name() not in ("writer", "scheduler"):
                loop.cancel()
        await self.scheduler.stop()  # running invocations finish; queued ones wait for the next start
        await self.writer.flush()
        loops[1].cancel()  # the writer, last
        await asyncio.gather(*loops, return_exceptions=True)

    async def close(self) -> None:
        await self.executor.shutdown()
        await self.repos.close()
        if self.session is not None:
            await self.session.close()
        self.state.close()

    # -- one invocation ------------------------------------------------------------------

    def submit(self, uri: str) -> None:
        """Queue a stored, pending invocation; the scheduler decides when it runs."""
        self.scheduler.submit(uri.removeprefix("at://").split("/", 1)[0], uri)

    def _reject_backlog(self, uri: str, why: str) -> None:
        stored = self.state.pending(uri)
        if stored is not None:
            self._finish(stored, "rejected", error=why)

    async def _guarded(self, uri: str) -> None:
        stored = self.state.pending(uri)
        if stored is None:
            return
        if not self.policy.allows(stored.author):  # access was withdrawn while it waited: as if it came now
            if self.state.deny(uri):
                self.intake.denied += 1
                log.warning("invocation denied by access policy (withdrawn while it waited)", uri=uri, mode=self.policy.mode)
            return
        try:
            await self.handle(stored)
        except Exception as e:  # a bug of ours must still end in a result, not a silent loss
            log.exception("internal error while handling an invocation", uri=uri)
            self._finish(stored, "error", error=f"internal error in the runner: {type(e).__name__}")

    async def handle(self, inv: Stored) -> None:
        try:
            record = Invocation.model_validate(inv.value)
        except ValidationError as e:
            self._finish(inv, "rejected", error=f"invalid invocation record: {_field_errors(e)}")
            return
        if not self.state.mark_running(inv.uri):
            return
        try:
            bundle = await self._fetch(record.bundle)
        except BundleRefused as e:
            self._finish(inv, "rejected", error=str(e), bundle=record.bundle)
            return
        except (AtrundError, ValueError) as e:
            self._finish(inv, "error", error=f"bundle unavailable: {e}", bundle=record.bundle)
            return
        b = bundle.record
        if b.endpoints is not None and record.endpoint not in b.endpoints:
            self._finish(inv, "rejected", bundle=record.bundle,
                         error=f"endpoint {record.endpoint!r} is not one the bundle declares ({', '.join(b.endpoints) or 'none'})")
            return
        refused = self.grants.refused(b.permissions)
        if refused:
            self._finish(inv, "rejected", bundle=record.bundle,
                         error=f"the bundle asks for permissions this runner does not grant: {', '.join(refused)}")
            return
        try:
            env = self.open_secrets(record.bundle.uri, b, inv.author, record.secrets)
        except SecretError as err:
            self._finish(inv, "error", bundle=record.bundle, error=str(err), error_type="SecretError")
            return
        e = self.cfg.executor
        asked = b.permissions or Permissions()
        request = ExecRequest(
            code_path=str(bundle.code_path),
            endpoint=record.endpoint,
            args=record.args or {},
            permissions=ExecPermissions(net=asked.net or [], read=asked.read or [], write=asked.write or [], env=asked.env or []),
            timeout=min(record.timeout or e.default_timeout, e.max_timeout),
            env=env,
        )
        started = time.time()
        try:
            response = await self.executor.execute(request, b.runtime)
        except ExecutorError as err:
            log.error("executor failed", uri=inv.uri, error=str(err))
            response = ExecResponse(success=False, error=f"the runner could not run the bundle: {err}", error_type="ExecutorError")
        # Nothing the runner writes or logs carries a secret value verbatim (see atrund.sealed.redact).
        response = redact_response(response, env)
        status = "success" if response.success else ("timeout" if response.timed_out else "error")
        metrics = Metrics(
            execution_time_ms=response.metrics.execution_time_ms,
            queued_ms=max(0, int((started - inv.seen_at) * 1000)),
            isolation=self.executor.isolation,
            runtime=b.runtime,
        )
        self._finish(inv, status, bundle=record.bundle, data=response.data if response.success else None,
                     error=response.error, response=response.response.model_dump(by_alias=True) if response.response else None,
                     metrics=metrics, error_type=response.error_type)

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

    async def _fetch(self, ref: StrongRef):
        for attempt in range(FETCH_ATTEMPTS):
            try:
                return await self.bundles.get(ref)
            except Unreachable as e:
                if attempt == FETCH_ATTEMPTS - 1:
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
        result = build(inv_ref, bundle or _bundle_ref(inv.value, inv_ref), status, metrics=metrics, **fields)
        if not self.state.finish(inv.uri, status, result_rkey(inv.uri), result.to_record()):
            return  # it already has its result
        self.writer.wake()
        log.info("invocation", uri=inv.uri, author=inv.author, status=status, bundle=(bundle.cid if bundle else None),
                 runtime=metrics.runtime, isolation=metrics.isolation, queued_ms=metrics.queued_ms,
                 exec_ms=metrics.execution_time_ms, total_ms=metrics.total_ms, error_type=error_type,
                 error=fields.get("error"))


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
