"""The composition root: every component of a runner, built from the Config and wired here.

Reading this file is reading the wiring diagram. Each component is handed exactly what it uses;
none of them sees the App (nothing imports this module but the CLI and the tests).

    ingest (poll | firehose) ─▶ Intake ─▶ Runs (scheduler) ─▶ Pipeline ─▶ executor
                                             │                    ▲
                                             └▶ state ─▶ ResultWriter ─▶ runner's PDS
    Gateway (HTTP: handleRequest, XRPC invoke) ──────────────────┘

Lifecycle: ``start`` logs in, builds what needs the runner's identity, publishes the runner
record and recovers what a previous run left; ``run`` keeps every loop running under one
supervisor until ``stop`` is set, then stops them in order under the shutdown deadline
(``runner.shutdown_grace``); ``close`` releases what is left.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import structlog

from atrund import __version__
from atrund import config as config_mod
from atrund.access import AccessPolicy, PermissionPolicy, PolicyFile, StoredPolicy, file_stamp
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.atproto.serviceauth import ServiceAuth
from atrund.atproto.session import Session
from atrund.bundles import BundleStore
from atrund.config import Config
from atrund.errors import AtrundError, ConfigError, HelperGone, StoreError
from atrund.execute import create_executor
from atrund.gateway import Gateway
from atrund.health import Health
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.ingest.poll import Poller
from atrund.kv import BundleState
from atrund.logbook import LogBook
from atrund.metrics import Meters
from atrund.pipeline import Pipeline
from atrund.quarantine import Quarantine
from atrund.records import RUNNER, Limits, Runner, SecretsKey, now_iso
from atrund.results import ResultWriter
from atrund.retries import Retries
from atrund.runs import Runs
from atrund.schedule import Scheduler
from atrund.sealed import KeyFileError, Keyring
from atrund.standing import Follow
from atrund.state import State, Store
from atrund.status import Status
from atrund.supervise import Supervisor
from atrund.ticks import Ticks
from atrund.triggers import Triggers
from atrund.trust import LiveAccess, resolve_dids

log = structlog.get_logger("atrund.app")

CONFIG_CHECK_SECONDS = 1.0
HOLD_MARGIN = 60  # seconds a bundle-state lock is held past the longest run at most (atrund.kv: a stalled commit)
INGEST_LOOPS = ("poller", "firehose", "ticks", "triggers", "standing")  # with replicas, only the ingest leader runs them


def open_state(cfg: Config) -> Store:
    """The state store ``[state]`` names: Postgres at ``url``, else SQLite in ``dir`` (the default).
    Either way ``dir`` keeps the runner's local files (quarantine, bundle cache, keys)."""
    if cfg.state.url is not None:
        from atrund.pgstate import PgState  # psycopg is loaded only by runners that use it

        # the roles it really has: one with the gateway off does not take a share of its rate
        roles = [role for role in cfg.runner.roles if role != "gateway" or cfg.gateway.enabled]
        return PgState(cfg.state.url, roles=roles)
    return State(cfg.state.dir / "atrund.sqlite3")


def private_dir(path: Path) -> None:
    """The state directory, the runner's alone: a worker's uid must not even stat what is in it
    (stat, readlink and the like are outside Landlock), so 0700, whatever made it before."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


class App:
    def __init__(self, cfg: Config, helper=None, password: str | None = None) -> None:
        """``helper`` and ``password``: what serve kept from before it dropped to ``[runner] user``
        (privsep.py): the privileged helper the backend asks for root work, and the app password."""
        self.cfg = cfg
        self._password = password
        self._helper = helper
        self.fatal: AtrundError | None = None  # why serve stopped by itself (HelperGone), raised by the CLI after shutdown
        self.grants = PermissionPolicy.from_config(cfg.permissions)
        self.keyring = load_keyring(cfg)
        self.identities = Identities(cfg.identity.plc_url, cfg.identity.cache_seconds, cfg.identity.timeout_seconds,
                                     cfg.identity.cache_size, allow_private_addresses=cfg.identity.allow_private_addresses)
        self.repos = Repos(self.identities)
        private_dir(cfg.state.dir)
        self.state = open_state(cfg)
        # Who is served: the configuration, the live edits `atrund access` makes (the policy file
        # beside SQLite; with replicas, the database they share), and (follows, list modes) the AT
        # graph; kept current while the runner serves (atrund.trust).
        edits = StoredPolicy(self.state) if self.state.shared else PolicyFile(cfg.access_file)
        if self.state.shared and cfg.access_file.exists():
            log.warning("access policy file not read: with state.url the live edits are in the database, for every "
                        "replica; apply its entries with `atrund access allow|deny`", file=str(cfg.access_file))
        self.policy = LiveAccess(cfg.access, edits, self.repos)
        self.quarantine = Quarantine(cfg.state.dir / "quarantine.sqlite3")
        self.problems = Health()
        self.supervisor = Supervisor(self.problems)
        self.meters = Meters()
        self.executor = create_executor(cfg.executor, cfg.executor.isolation, helper)
        extensions = {name: rt.extension for name, rt in self.executor.runtimes.items()}
        self.bundles = BundleStore(self.repos, cfg.state.dir / "bundles", cfg.bundles.max_bytes, extensions)
        # Built by start(), once the runner is logged in: they write as it, or need its DID.
        self.session: Session | None = None
        self.writer: ResultWriter | None = None
        self.logbook: LogBook | None = None
        self.pipeline: Pipeline | None = None
        self.runs: Runs | None = None
        self.scheduler: Scheduler | None = None
        self.intake: Intake | None = None
        self.poller: Poller | None = None
        self.firehose: Firehose | None = None
        self.retries: Retries | None = None
        self.status: Status | None = None
        self.gateway: Gateway | None = None
        self.ticks: Ticks | None = None
        self.triggers: Triggers | None = None
        self.follow: Follow | None = None
        self._reload = asyncio.Event()  # set by reload_soon (SIGHUP): re-read the configuration now
        self._gateway_url: str | None = None
        self._authors: list[str] | None = None  # ingest.authors, handles resolved (start)

    # -- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        r, e, ingest = cfg.runner, cfg.executor, cfg.ingest
        self.session = session = await Session.login(r.pds, r.identifier, self._password or r.password())
        self.writer = ResultWriter(session, self.state, self.quarantine, self.problems)
        await self.policy.start(session.did, r.pds)
        if cfg.ingest.authors is not None:  # handles there too, resolved like the access lists
            self._authors = await resolve_dids(self.repos, r.pds, "ingest.authors", cfg.ingest.authors)
        self.policy.on_change = self._access_changed
        self.pipeline = Pipeline(self.executor, self.bundles, self.grants, self.keyring, e, session.did,
                                 kv=BundleState(self.state, cfg.bundle_state, hold=e.max_timeout + HOLD_MARGIN))
        self.logbook = LogBook(self.state, cfg.logs)
        self.runs = Runs(self.pipeline, self.state, self.writer, self.policy, self.repos, self.meters, e.concurrency, cfg.limits,
                         self.logbook, cfg.runner.hot_affinity)
        self.scheduler = self.runs.scheduler
        self.intake = Intake(self.state, session.did, self.policy, self.runs.submit, self.quarantine, self.runs.refuse_reused)
        # With a firehose, polling is only the periodic rescan that catches what the stream missed.
        interval = ingest.poll_interval if ingest.mode == "poll" else ingest.reconcile_interval
        self.poller = Poller(self.repos, self.intake, self._poll_authors(), interval, ingest.reconcile_interval, self.problems)
        # Schedules and triggers: standing records, followed by one ingest round loop (atrund.standing).
        syncs = []
        if cfg.schedules.enabled:
            self.ticks = Ticks(self.state, self.repos, self.policy, session.did, self.runs.submit, cfg.schedules)
            syncs.append((self.ticks.sync, self.ticks.standings.authors))
        if cfg.triggers.enabled and ingest.mode == "firehose":  # triggers match what the firehose carries
            self.triggers = Triggers(self.state, self.repos, self.policy, session.did, self.runs.submit, cfg.triggers)
            syncs.append((self.triggers.sync, self.triggers.standings.authors))
        if syncs:  # with a firehose, a change is ingested when the stream shows it: listing is only the rescan
            self.follow = Follow(syncs, self._poll_authors, interval)
        if ingest.mode == "firehose":
            url = ingest.firehose_url or r.pds.replace("https://", "wss://").replace("http://", "ws://")
            self.firehose = Firehose(url, self.repos, self.intake, self.triggers,
                                     self.follow.touched if self.follow is not None else None)
        self.retries = Retries(self.quarantine, self.state, self.writer, self.intake, self.firehose)
        self.status = Status(session.did, self.executor, self.meters, self.problems, self.supervisor, self.state,
                             self.quarantine, self.policy, self.runs, self.writer, self.intake, self.poller, self.firehose,
                             self.ticks, self.triggers)
        gateway_url = None
        if cfg.gateway.enabled and "gateway" in r.roles:
            # Single-use tokens: one runner remembers them in memory; replicas in the store they share.
            auth = ServiceAuth(self.identities, session.did, cfg.gateway.token_leeway_seconds,
                               tokens=self.state if self.state.shared else None)
            self.gateway = Gateway(cfg.gateway, self.pipeline, self.scheduler, self.policy, self.identities, self.repos, auth,
                                   session, self.meters, self.status.health, r.shutdown_grace, self.logbook,
                                   share=functools.partial(self.state.replicas_with, "gateway"))
            try:
                gateway_url = await self.gateway.start()
            except OSError as e:  # the port is taken, or not ours to bind: one line, not a traceback
                why = os.strerror(e.errno) if e.errno else str(e)
                raise ConfigError(f"gateway.listen {cfg.gateway.listen}: cannot listen there: {why}") from None
        self._gateway_url = gateway_url
        await session.put_record(RUNNER, "self", self.declaration(gateway_url).to_record())
        log.info("runner published", did=session.did, handle=session.handle, isolation=self.executor.isolation,
                 access=self.policy.mode, access_source=self.policy.source, authors=len(self._poll_authors()),
                 secrets_key=self.keyring.current.id if self.keyring else None, gateway=gateway_url)
        await self.executor.warm(e.warm)
        self.runs.recover()
        if self.ticks is not None:
            self.ticks.recover()

    def declaration(self, gateway_url: str | None = None) -> Runner:
        e, g = self.cfg.executor, self.cfg.gateway
        limits = Limits(
            timeout_seconds=e.max_timeout, default_timeout_seconds=e.default_timeout,
            max_bundle_bytes=self.cfg.bundles.max_bytes, max_output_bytes=e.max_output_bytes,
            memory_mb=e.memory_mb, concurrency=e.concurrency,
            # what an author's client reads to say "you are over the rate" while it waits
            per_author_per_minute=int(self.cfg.limits.per_author_per_minute), per_author_burst=self.cfg.limits.per_author_burst,
        )
        if gateway_url is not None:  # only limits of what this runner really serves
            limits.gateway_requests_per_minute = int(g.rate_per_minute)
            limits.gateway_timeout_seconds = min(g.timeout, e.max_timeout)
            limits.max_request_bytes = g.max_body_bytes
        if self.cfg.schedules.enabled:
            s = self.cfg.schedules
            limits.schedules = True
            limits.schedule_min_interval_seconds = s.min_interval_seconds
            limits.schedule_jitter_seconds = s.jitter_seconds
            limits.max_schedules_per_author = s.max_per_author
        if self.cfg.triggers.enabled and self.cfg.ingest.mode == "firehose":
            t = self.cfg.triggers
            limits.triggers = True
            limits.max_triggers_per_author = t.max_per_author
            limits.trigger_firings_per_minute = int(t.per_minute)
            limits.trigger_backlog = t.backlog
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
        return self._authors if self._authors is not None else self.policy.served()

    def _access_changed(self, policy: AccessPolicy) -> None:
        if self.poller is not None:
            self.poller.authors = self._poll_authors()
        log.info("access policy changed", mode=policy.mode, allowed=len(policy.allowlist), blocked=len(policy.blocklist),
                 trusted=len(policy.trusted), polled=len(self.poller.authors) if self.poller else None)

    # -- live configuration -------------------------------------------------------------

    def reload_soon(self) -> None:
        """Re-read the configuration file now (SIGHUP), not at the next check."""
        self._reload.set()

    async def watch_config(self) -> None:
        """Apply [access] and [permissions] when the configuration file changes: checked every
        second (as the access policy file is), or at once after reload_soon."""
        path = self.cfg.source
        if path is None:  # built from a dict (tests, the demo): nothing to watch
            await asyncio.Event().wait()
        stamp = file_stamp(path)
        while True:
            try:
                await asyncio.wait_for(self._reload.wait(), CONFIG_CHECK_SECONDS)
            except TimeoutError:
                pass
            forced, now = self._reload.is_set(), file_stamp(path)
            self._reload.clear()
            if forced or now != stamp:
                stamp = now
                await self.reload(path)

    async def reload(self, path) -> None:
        """Re-read ``path`` and apply what can change while serving ([access], [permissions]);
        a change elsewhere is logged as needing a restart. A file that does not load, or an
        access list whose handle does not resolve, leaves the running configuration in force."""
        announced = (self.policy.mode, self.policy.source)
        try:
            new = config_mod.load(path)
            if new.access != self.cfg.access:
                await self.policy.reconfigure(new.access)
        except ConfigError as e:
            log.error("configuration not reloaded; the running one stays in force", file=str(path), error=str(e))
            return
        applied = []
        if new.access != self.cfg.access:
            self.cfg.access = new.access
            applied.append("access")
            if (self.policy.mode, self.policy.source) != announced and self.session is not None:
                # the runner record announces the mode and its source
                await self.session.put_record(RUNNER, "self", self.declaration(self._gateway_url).to_record())
        if new.permissions != self.cfg.permissions:
            if self._helper is not None and (new.permissions.read, new.permissions.write) != (self.cfg.permissions.read, self.cfg.permissions.write):
                log.warning("[permissions] read and write paths are checked again by the privileged helper, against "
                            "the lists it started with: a path granted since is refused until the runner restarts")
            self.grants = PermissionPolicy.from_config(new.permissions)
            if self.pipeline is not None:
                self.pipeline.grants = self.grants
            self.cfg.permissions = new.permissions
            applied.append("permissions")
        restart = [name for name in Config.model_fields if name not in ("access", "permissions")
                   and getattr(new, name) != getattr(self.cfg, name)]
        log.info("configuration reloaded", file=str(path), applied=applied or None, needs_restart=restart or None)

    # -- run and stop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then stop (``shutdown``).

        Every loop runs under the supervisor: one that fails is restarted with backoff and
        reported on /healthz, never a reason to stop serving."""
        assert self.poller and self.writer and self.runs and self.retries and self.scheduler and self.logbook
        loops = {"poller": self.poller.run, "writer": self.writer.run, "scheduler": self.scheduler.run,
                 "access": self.policy.run, "held-outcomes": self.runs.record_held, "quarantine-retries": self.retries.run,
                 "configuration": self.watch_config, "logbook": self.logbook.run}
        if self.firehose is not None:
            loops["firehose"] = self.firehose.run
        if self.ticks is not None:
            loops["ticks"] = self.ticks.run
        if self.triggers is not None:
            loops["triggers"] = self.triggers.run
        if self.follow is not None:
            loops["standing"] = self.follow.run
        if self.state.shared:  # replicas: heartbeats, taking over what a dead one left, one ingest leader
            from atrund.pgstate import HEARTBEAT, LEAD_CHECK, WORK_POLL

            roles = self.cfg.runner.roles
            loops["lease"] = functools.partial(self.runs.keep_lease, HEARTBEAT)
            ingest = {name: loops.pop(name) for name in INGEST_LOOPS if name in loops}
            if "ingest" in roles:
                loops["leader"] = functools.partial(self.lead_ingest, ingest, LEAD_CHECK)
            if "execute" in roles:  # what the store assigns to this replica, woken by its NOTIFY
                loops["claims"] = functools.partial(self.runs.take_assigned, self.state.wait_for_work, WORK_POLL)
        if self._helper is not None:
            loops["helper"] = functools.partial(self.watch_helper, stop)
        for name, loop in loops.items():
            self.supervisor.start(name, loop)
        await stop.wait()
        await self.shutdown()

    async def watch_helper(self, stop: asyncio.Event) -> None:
        """``[runner] user``: the privileged helper starts every worker, and this runner, dropped,
        cannot start another. When it is gone, every invocation would fail: stop instead (the
        running ones are recorded as at any stop), and let the service manager start the whole
        runner again (HelperGone: serve's exit code says so)."""
        await self._helper.lost.wait()
        if not stop.is_set():  # else a stop under way: its signal may have reached the helper too
            self.fatal = HelperGone(f"the privileged helper is gone ({self._helper.gone}); an unprivileged runner cannot "
                                    "start another, so it stops")
            log.error("the privileged helper is gone: stopping, to be started again by the service manager",
                      why=self._helper.gone)
            stop.set()
        await asyncio.Event().wait()  # until the shutdown stops this loop

    async def lead_ingest(self, loops: dict, interval: float) -> None:
        """Replicas: run the ingest loops while this replica holds ingest leadership (the store's
        ``lead``), stop them when it is lost; a standby tries again every ``interval`` seconds."""
        leading = False
        while True:
            now = self.state.lead()
            if now and not leading:
                log.info("this replica leads ingest", loops=sorted(loops))
                for name, loop in loops.items():
                    self.supervisor.start(name, loop)
            elif leading and not now:
                log.warning("ingest leadership lost; ingest stops here (another replica takes it)")
                await self.supervisor.stop(list(loops))
            leading = now
            await asyncio.sleep(interval)

    async def shutdown(self) -> None:
        """Stop taking work; let running invocations and requests finish for at most
        runner.shutdown_grace seconds; past it, stop them, each invocation recorded as
        interrupted; then write every result that is due. (A second signal exits at once: cli.)"""
        assert self.runs and self.writer
        grace = self.cfg.runner.shutdown_grace
        log.info("stopping: running work may finish", grace_s=grace, running=self.runs.scheduler.running)
        self.supervisor.stopping = True
        await self.supervisor.stop(["leader", *INGEST_LOOPS, "claims", "access", "quarantine-retries",
                                    "configuration"])  # nothing new comes in
        draining = [self.runs.drain(grace)]  # queued invocations wait for the next start
        if self.gateway is not None:
            draining.append(self.gateway.close())  # takes no new request; those in flight have the same grace
        await asyncio.gather(*draining)
        await self.supervisor.stop(["scheduler", "held-outcomes", "lease"])
        await self.supervisor.stop()  # the writer loop too: the last flush below must not run beside it
        try:
            await self.writer.flush()
        except Exception as e:  # noqa: BLE001 - whatever is left is written at the next start
            log.error("results not flushed at shutdown; they are written at the next start", error=f"{type(e).__name__}: {e}")
        if self.logbook is not None:
            try:
                self.logbook.flush()
            except StoreError as e:
                log.warning("the last log entries could not be kept", error=str(e))

    async def close(self) -> None:
        if self.gateway is not None:
            await self.gateway.close()
        await self.executor.shutdown()
        await self.repos.close()
        if self.session is not None:
            await self.session.close()
        self.state.close()
        self.quarantine.close()


def load_keyring(cfg: Config) -> Keyring | None:
    """The runner's secrets keys; None (sealed secrets refused) when the default key file does
    not exist. A key file the configuration names explicitly must load."""
    path = cfg.key_file
    if cfg.secrets.key_file is None and not path.exists():
        if cfg.secrets.old_key_files:
            raise KeyFileError(f"secrets.old_key_files is set but there is no current key at {path} (atrund keys init)")
        log.info("no secrets key: sealed secrets are refused; create one with `atrund keys init`", key_file=str(path))
        return None
    return Keyring.load(path, cfg.secrets.old_key_files)
