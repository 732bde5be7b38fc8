"""One invocation's path: check, fetch and verify, prepare, open secrets, run, the Outcome.

    invocation record ─ check ─ fetch+verify (retried) ─ prepare ─ open secrets ─ run ─▶ Outcome
                                  (atrund.bundles)      (endpoint,   (atrund.sealed)  (executor)
                                                         grants)

Every caller goes through here: the invocations a runner records (atrund.runs), XRPC invoke and
the gateway's handleRequest (atrund.gateway). ``run`` raises the pipeline's exceptions (the
gateway answers each with its own HTTP status); ``outcome`` and ``invocation`` never raise for
a failure of the run: ``outcome_of`` is the one place an exception becomes an Outcome, with the
status and error text a result record states.

The pipeline is handed its collaborators; it knows nothing of how the runner is wired.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from atrund import bounds
from atrund.access import PermissionPolicy
from atrund.atproto.uri import authority
from atrund.bundles import BundleStore, VerifiedBundle
from atrund.config import ExecutorSection
from atrund.errors import (
    AtrundError,
    BundleRefused,
    BundleUnavailable,
    EndpointUndeclared,
    InvalidInvocation,
    PermissionsRefused,
    Unreachable,
)
from atrund.execute import ExecRequest, Executor, ExecutorError
from atrund.execute.protocol import ExecPermissions
from atrund.kv import QUOTA, BundleState, Session
from atrund.records import Bundle, Invocation, Metrics, Permissions, SealedSecret, StrongRef, field_errors
from atrund.sealed import Keyring, SecretError, redact, redact_response

log = structlog.get_logger("atrund.pipeline")

FETCH_ATTEMPTS = 3
HOT_REMEMBERED = 256  # bundles whose code path is remembered for hot_bundles (hot_max is 16 by default)

Slot = Callable[[], AbstractAsyncContextManager[Any]]


@dataclass
class Outcome:
    """How one run of a bundle ended, before it becomes a result record or an HTTP answer."""

    status: str
    data: Any = None
    error: str | None = None
    response: dict[str, Any] | None = None
    metrics: Metrics | None = None
    error_type: str | None = None
    bundle: StrongRef | None = None  # what the invocation pinned; None if its record names none readable
    output: str | None = None  # what the bundle printed (its last executor.output_bytes), secrets redacted
    # A successful run's writes to its bundle's state, holding the namespace's lock: the caller
    # commits them with the outcome (State.finish) or alone (BundleState.commit_alone), then
    # releases them. None: nothing to commit.
    state: Session | None = None

    def release_state(self) -> None:
        if self.state is not None:
            self.state.release()
            self.state = None


# Exception -> (status, error text, error_type): the one table, first match wins (subclasses first).
# Anything not listed is a bug of ours: it still ends in an outcome (and a result), never a silent loss.
OUTCOMES: list[tuple[type[Exception], str, Callable[[Exception], str], str | None]] = [
    (InvalidInvocation, "rejected", str, None),
    (BundleRefused, "rejected", str, None),  # the pinned version is gone, too large, undeclared endpoint, permissions
    (SecretError, "error", str, "SecretError"),  # names the secret, never its value
    (ExecutorError, "error", lambda e: f"the runner could not run the bundle: {e}", "ExecutorError"),
    (BundleUnavailable, "error", lambda e: f"bundle unavailable: {e}", None),
    (Exception, "error", lambda e: f"internal error in the runner: {type(e).__name__}", None),
]


# The failures a run is expected to meet: ``outcome`` turns these into Outcomes. Anything else is a
# bug: XRPC answers it with a 500, and atrund.runs still records it (through outcome_of).
EXPECTED = tuple(kind for kind, *_ in OUTCOMES if kind is not Exception)


def outcome_of(e: Exception, bundle: StrongRef | None = None) -> Outcome:
    """The Outcome of a run that ended in ``e``: the one place an exception becomes an Outcome."""
    status, text, error_type = next((s, t, et) for kind, s, t, et in OUTCOMES if isinstance(e, kind))
    return Outcome(status, error=text(e), error_type=error_type, bundle=bundle)


class Pipeline:
    def __init__(self, executor: Executor, bundles: BundleStore, grants: PermissionPolicy, keyring: Keyring | None,
                 limits: ExecutorSection, runner_did: str, kv: BundleState | None = None) -> None:
        """``kv``: bundles' state; without it a run is offered none (a state call is refused)."""
        self.executor = executor
        self.kv = kv
        self.bundles = bundles
        self.grants = grants
        self.keyring = keyring
        self.limits = limits
        self.runner_did = runner_did
        # bundle record CID -> its code path, most recently run last: which bundles the pool's hot
        # workers serve (hot_bundles)
        self._code_of: collections.OrderedDict[str, str] = collections.OrderedDict()

    def hot_bundles(self) -> list[str]:
        """The bundle record CIDs whose code the executor holds a hot worker for, most recently
        run first (replicas tell the fleet: atrund.runs, atrund.pgstate)."""
        hot = self.executor.hot_code()
        return [cid for cid, path in reversed(self._code_of.items()) if path in hot]

    def _ran(self, bundle: StrongRef, code_path: str) -> None:
        self._code_of[bundle.cid] = code_path
        self._code_of.move_to_end(bundle.cid)
        while len(self._code_of) > HOT_REMEMBERED:
            self._code_of.popitem(last=False)

    # -- whole paths ---------------------------------------------------------------------

    async def invocation(self, value: Any, *, author: str, queued_since: float, claim: Callable[[], bool]) -> Outcome | None:
        """Run a stored invocation record: check it, ``claim`` it (False: it is not ours to run
        any more, and None is returned; whatever ``claim`` raises passes through: nothing
        started), then run it. Every other way this ends is an Outcome."""
        try:
            record = check(value)
        except InvalidInvocation as e:
            return outcome_of(e)
        if not claim():
            return None
        return await self.outcome(record.bundle, record.endpoint, record.args or {}, record.timeout, queued_since=queued_since,
                                  author=author, secrets=record.secrets)

    async def outcome(self, ref: StrongRef, endpoint: str, args: dict[str, Any], timeout: int | None, **how: Any) -> Outcome:
        """``run``, with every expected failure as an Outcome (``outcome_of``)."""
        try:
            return await self.run(ref, endpoint, args, timeout, **how)
        except EXPECTED as e:
            return outcome_of(e, ref)

    async def run(self, ref: StrongRef, endpoint: str, args: dict[str, Any], timeout: int | None, *, queued_since: float,
                  attempts: int = FETCH_ATTEMPTS, slot: Slot | None = None, max_timeout: int | None = None,
                  author: str | None = None, secrets: list[SealedSecret] | None = None) -> Outcome:
        """Fetch the pinned bundle, check it may run here, run it. A run that starts ends in an
        Outcome (success, the bundle's failure, a timeout, or the executor's failure); before
        that, raises BundleUnavailable, BundleRefused (a subclass naming why) or SecretError.

        ``slot``: for callers outside the scheduler (XRPC invoke, the gateway), which must still
        hold one of the executor's slots while the bundle runs (atrund.schedule).
        """
        try:
            bundle = await self.fetch(ref, attempts)
        except BundleRefused:
            raise
        except (AtrundError, ValueError) as e:  # a cache file that does not parse is a ValueError
            raise BundleUnavailable(str(e)) from e
        request = self.prepare(bundle, endpoint, args, timeout, max_timeout, author=author, secrets=secrets)
        return await self.execute(request, bundle, queued_since=queued_since, slot=slot)

    # -- the steps -----------------------------------------------------------------------

    async def fetch(self, ref: StrongRef, attempts: int = FETCH_ATTEMPTS) -> VerifiedBundle:
        """The verified bundle; a network failure is tried ``attempts`` times with backoff."""
        for attempt in range(attempts):
            try:
                return await self.bundles.get(ref)
            except Unreachable as e:
                if attempt == attempts - 1:
                    raise
                log.info("bundle fetch failed; retrying", bundle=ref.uri, error=str(e))
                await asyncio.sleep(2**attempt)
        raise AssertionError("unreachable")

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
        asked = b.permissions or Permissions()
        return ExecRequest(
            code_path=str(bundle.code_path),
            endpoint=endpoint,
            args=args,
            permissions=ExecPermissions(net=asked.net or [], read=asked.read or [], write=asked.write or [], env=asked.env or [],
                                        net_private=list(self.grants.net_private)),
            timeout=self.timeout(timeout, max_timeout),
            env=self.open_secrets(bundle.ref.uri, b, author, secrets),
        )

    def timeout(self, asked: int | None, cap: int | None = None) -> int:
        """The seconds a run gets: what it asked for (else the default), within the runner's
        max_timeout and the caller's ``cap``."""
        e = self.limits
        return min(asked or e.default_timeout, e.max_timeout, cap or e.max_timeout)

    def open_secrets(self, bundle_uri: str, bundle: Bundle, author: str | None = None,
                     invocation_secrets: list[SealedSecret] | None = None) -> dict[str, str]:
        """The environment a run gets: the bundle record's sealed secrets, then the invocation's
        (``author``'s; they win on a name clash), opened. A run without an invocation record (the
        HTTP gateway) passes none and gets the bundle's own secrets.

        Every name must be one the bundle's permissions.env lists (and so one the runner grants,
        or the bundle would not run at all): a secret the bundle could never see is a mistake
        worth saying, not dropping silently. Raises SecretError naming the secret.
        """
        sources = [("bundle record", bundle.secrets, authority(bundle_uri)),
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
                env.update(self.keyring.open(sealed, author=sealer, runner=self.runner_did, bundle_uri=bundle_uri, where=where))
        return env

    async def execute(self, request: ExecRequest, bundle: VerifiedBundle, *, queued_since: float,
                      slot: Slot | None = None) -> Outcome:
        """Run a prepared request. Nothing the runner writes or logs afterwards carries a secret
        value verbatim: the answer is redacted here, once, for every path (atrund.sealed.redact)."""
        runtime = bundle.record.runtime
        started = time.time()
        self._ran(bundle.ref, request.code_path)
        session = self.kv.session(bundle.ref.uri) if self.kv is not None else None
        try:
            if slot is not None:
                async with slot():
                    response = await self.executor.execute(request, runtime, session)
            else:
                response = await self.executor.execute(request, runtime, session)
        except BaseException as err:
            if session is not None:
                session.release()
            if not isinstance(err, ExecutorError):
                raise
            log.error("executor failed", endpoint=request.endpoint, error=str(err))
            out = outcome_of(err, bundle.ref)
            out.error = redact(out.error, request.env)
            exec_ms, egress = None, None
        else:
            if session is not None and session.failure is not None:  # the bundle may have caught it: the run fails still
                response = response.model_copy(update={"success": False, "data": None, "response": None,
                                                       "error": session.failure, "error_type": QUOTA})
            response = redact_response(response, request.env)
            status = "success" if response.success else ("timeout" if response.timed_out else "error")
            out = Outcome(status, data=response.data if response.success else None, error=response.error,
                          response=response.response.model_dump(by_alias=True) if response.response else None,
                          error_type=response.error_type, bundle=bundle.ref, output=response.output)
            exec_ms = response.metrics.execution_time_ms
            egress = response.egress
            if session is not None:
                if status == "success" and session.writes() is not None:
                    out.state = session
                else:
                    session.release()
        carried = {} if egress is None else {f"egress_{k}": v for k, v in dataclasses.asdict(egress).items()}
        out.metrics = Metrics(execution_time_ms=exec_ms, queued_ms=max(0, int((started - queued_since) * 1000)),
                              isolation=self.executor.isolation, runtime=runtime, **carried)
        return out


def check(value: Any) -> Invocation:
    """The invocation record as the lexicon defines it, or InvalidInvocation naming what is wrong."""
    try:
        return Invocation.model_validate(bounds.check_fields(value))
    except ValidationError as e:
        raise InvalidInvocation(f"invalid invocation record: {field_errors(e)}") from None
    except bounds.Malformed as e:
        raise InvalidInvocation(f"invalid invocation record: {e}") from None
