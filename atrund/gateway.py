"""The runner's HTTP side (aiohttp): bundles answering web requests, XRPC invoke, health, metrics.

    GET  /healthz                                  JSON: ok, uptime, ingest lag, queue, pool
    GET  /metrics                                  Prometheus text format
    POST /xrpc/dev.atrun.invoke                    service-auth JWT; answers like a result record
    GET  /xrpc/dev.atrun.getLogs?id=|bundle=       service-auth JWT; what runs printed (atrund.logbook),
                                                   for the bundle's author and the invoker
    *    /{author DID or handle}/{bundle rkey}/{path...}[?cid=CID]
                                                   the bundle's handleRequest endpoint

Gateway callers are anonymous web clients; the *author* must pass the access policy. Each
bundle has a token bucket (rate_per_minute, burst; replicas each take a share: RateLimiter).
A run that printed something or failed gets a request id (``Atrun-Request-Id``; ``requestId``
in a failure's body) under which its author can read the output and the bundle's own error with
``atrund logs``, which anonymous callers never see. A request takes one of the executor's
slots like any invocation. Both bundle routes run through the pipeline (atrund.pipeline), which
the gateway is handed with the few components it needs. Every error is JSON naming what went
wrong (``{"error", "message"}``) and never carries a trace of the runner; ``http_error`` is the
one place our exceptions and failed runs become HTTP statuses.

Headers: hop-by-hop headers and ``Cookie`` are not passed to the bundle. From the bundle's
answer, hop-by-hop and framing headers are dropped (aiohttp frames the body itself), and so
are headers that would act on the whole runner origin, which every bundle shares:
``Set-Cookie`` (one bundle's cookie would reach every other bundle), ``Strict-Transport-Security``,
``Clear-Site-Data``, ``Alt-Svc``, ``Service-Worker-Allowed``. Malformed, oversized or too many
headers are dropped too. Every answer carries ``Content-Security-Policy: sandbox ...`` (so a
bundle's page runs in an opaque origin and cannot read other bundles' pages or storage) and
``X-Content-Type-Options: nosniff``; a bundle may add its own CSP, which browsers enforce as well.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atrund import bounds
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.atproto.serviceauth import ServiceAuth, ServiceAuthError
from atrund.atproto.session import Session
from atrund.atproto.uri import AtUri
from atrund.config import GatewaySection
from atrund.errors import (
    AtrundError,
    BundleRefused,
    BundleUnavailable,
    EndpointUndeclared,
    IdentityError,
    NotFound,
    NotServed,
    PermissionsRefused,
    RemoteError,
    StoreError,
    VersionGone,
)
from atrund.logbook import LogBook, NotYours
from atrund.metrics import CONTENT_TYPE, Meters
from atrund.pipeline import Outcome, Pipeline
from atrund.records import (
    BUNDLE,
    GET_LOGS,
    GET_STATE,
    INVOKE,
    JSON_VALUE,
    RESULT,
    StrongRef,
    check_cid,
    field_errors,
    now_iso,
    result_rkey,
)
from atrund.results import build
from atrund.schedule import Scheduler
from atrund.sealed import SecretError
from atrund.state import LogEntry
from atrund.trust import LiveAccess

log = structlog.get_logger("atrund.gateway")

HANDLER = "handleRequest"
RKEY = re.compile(r"[A-Za-z0-9._:~-]{1,512}")
DID = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]{1,2000}")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade"}
NOT_TO_BUNDLE = HOP_BY_HOP | {"cookie", "content-length"}
NOT_FROM_BUNDLE = HOP_BY_HOP | {"content-length", "set-cookie", "set-cookie2", "strict-transport-security", "clear-site-data",
                                "alt-svc", "service-worker-allowed"}
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 field name
MAX_HEADERS = 64
MAX_HEADER_BYTES = 8192  # one header's value
SANDBOX = "sandbox allow-scripts allow-forms allow-popups allow-downloads"
MAX_BUCKETS = 10_000


class HttpError(Exception):
    """An answer other than the bundle's own: status, a short error name and a message."""

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.headers = status, error, message, headers or {}
        self.request_id: str | None = None  # the run's log entry (atrund.logbook), if it left one

    def body(self) -> dict[str, str]:
        out = {"error": self.error, "message": self.message}
        if self.request_id:
            out["requestId"] = self.request_id
        return out


def http_error(e: Exception | Outcome, timeout: int | None = None) -> HttpError:
    """Our exceptions, and a run of handleRequest that ended without an answer (its Outcome; it
    had ``timeout`` seconds), as HTTP answers: the one place that decides which status each gets."""
    if isinstance(e, Outcome):
        kind = e.error_type or "Error"
        if e.status == "timeout":
            return HttpError(504, "Timeout", f"the bundle did not answer within {timeout} s")
        if kind == "UnknownEndpoint":
            return HttpError(404, "NoHandler", f"the bundle defines no {HANDLER} endpoint")
        if kind == "ExecutorError":
            return HttpError(503, "RunnerUnavailable", "the runner could not start the bundle; try again")
        # The bundle's own message stays in the log: it may hold what its author would not publish.
        return HttpError(502, "BundleFailed", f"the bundle's {HANDLER} failed ({kind})")
    e = _what_failed(e)
    if isinstance(e, HttpError):
        return e
    if isinstance(e, NotYours):
        return HttpError(403, "Forbidden", str(e))
    if isinstance(e, ServiceAuthError):
        return HttpError(401, "AuthRequired" if e.reason == "missing" else "InvalidToken", str(e))
    if isinstance(e, IdentityError):
        return HttpError(404, "AuthorNotFound", str(e))
    if isinstance(e, (NotFound, VersionGone)):
        return HttpError(404, "BundleNotFound", str(e))
    if isinstance(e, EndpointUndeclared):
        return HttpError(404, "NoHandler", f"the bundle does not declare {HANDLER}: {e}")
    if isinstance(e, PermissionsRefused):
        return HttpError(403, "PermissionsRefused", str(e))
    if isinstance(e, BundleRefused):
        return HttpError(502, "BundleRefused", str(e))
    if isinstance(e, SecretError):  # the message names the secret, never its value
        return HttpError(502, "SecretUnusable", str(e))
    if isinstance(e, RemoteError):
        return HttpError(502, "AuthorPdsFailed", f"the author's PDS did not deliver the bundle: {e}")
    if isinstance(e, AtrundError):
        return HttpError(500, "InternalError", f"the runner failed: {type(e).__name__}")
    return HttpError(500, "InternalError", "internal error in the runner")


def _what_failed(e: Exception) -> Exception:
    """What failed decides the answer (the author's DID, their PDS, ...), not the pipeline's step."""
    return e.__cause__ if isinstance(e, BundleUnavailable) and isinstance(e.__cause__, Exception) else e


def _log_entry(e: LogEntry) -> dict[str, Any]:
    """A log entry as dev.atrun.getLogs#entry (lexicons/dev/atrun/getLogs.json)."""
    out = {"id": e.id, "bundle": e.bundle, "kind": e.kind, "status": e.status, "createdAt": now_iso(e.at)}
    for name, value in (("invoker", e.invoker), ("error", e.error), ("output", e.output)):
        if value is not None:
            out[name] = value
    return out


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers)


class InvokeInput(BaseModel):
    """The input of dev.atrun.invoke (lexicons/dev/atrun/invoke.json)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)  # types exactly as the lexicon says
    bundle: StrongRef
    endpoint: str = Field(min_length=1, max_length=128)
    args: dict[str, Any] | None = None
    timeout: int | None = Field(default=None, ge=1)
    write_result: bool = Field(default=False, alias="writeResult")


def parse_invoke_input(body: bytes) -> InvokeInput:
    """The XRPC input, or a 400 naming what is wrong: not JSON, nested deeper than
    bounds.MAX_DEPTH (naming where), or a field that does not match the lexicon."""
    try:
        return InvokeInput.model_validate(bounds.loads(body, "input"))
    except bounds.Malformed as e:
        raise HttpError(400, "InvalidRequest", str(e)) from None
    except ValidationError as e:
        raise HttpError(400, "InvalidRequest", f"input: {field_errors(e)}") from None


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key; ``take`` returns 0 if allowed, else seconds until it would be.

    ``share()``: how many gateways share the configured rate (replicas: the live ones with the
    gateway role, from the heartbeats; one runner: 1). Each keeps its buckets in memory, with the
    rate and the burst divided by it (a burst of at least 1), so the fleet as a whole serves a
    bundle at most the configured rate when a balancer spreads requests evenly, without a round
    trip to the database per request (docs/scaling.md)."""

    def __init__(self, per_minute: float, burst: int, share: Callable[[], int] = lambda: 1) -> None:
        self.per_second = per_minute / 60.0
        self.full = float(burst)
        self.share = share
        self.buckets: dict[Any, _Bucket] = {}

    def take(self, key: Any) -> float:
        now = time.monotonic()
        n = self.share()
        rate, burst = self.per_second / n, max(1.0, self.full / n)
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= MAX_BUCKETS:  # keys come from the web: keep the table bounded
                # Buckets that are full again carry no state; if that is not enough, keep the newest
                # half (an evicted bundle starts again with a full burst; a scan every MAX/2 keys at most).
                live = {k: v for k, v in self.buckets.items() if v.tokens + (now - v.at) * rate < burst}
                if len(live) >= MAX_BUCKETS // 2:
                    live = dict(sorted(live.items(), key=lambda kv: kv[1].at)[-(MAX_BUCKETS // 2):])
                self.buckets = live
            b = self.buckets[key] = _Bucket(burst, now)
        b.tokens = min(burst, b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / rate


def parse_state_query(query: Any) -> dict[str, Any]:
    """The parameters of dev.atrun.getState, checked; HttpError 400 naming the one that is wrong."""
    known = {"bundle", "key", "prefix", "cursor", "limit"}
    if unknown := sorted(set(query) - known):
        raise HttpError(400, "InvalidRequest", f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    for name in known:
        values = query.getall(name, [])
        if len(values) > 1:
            raise HttpError(400, "InvalidRequest", f"{name}: given more than once")
        if values:
            out[name] = values[0]
    if "bundle" not in out:
        raise HttpError(400, "InvalidRequest", f"bundle: required (the AT URI of a {BUNDLE} record)")
    try:
        at = AtUri.parse(out["bundle"])
    except ValueError as e:
        raise HttpError(400, "InvalidRequest", f"bundle: {e}") from None
    if at.collection != BUNDLE or not DID.fullmatch(at.authority):
        raise HttpError(400, "InvalidRequest", f"bundle: must be the AT URI of a {BUNDLE} record, its author named by DID")
    for name in ("key", "prefix", "cursor"):
        if name in out and len(out[name].encode()) > 512:
            raise HttpError(400, "InvalidRequest", f"{name}: at most 512 bytes")
    if "limit" in out:
        if not out["limit"].isdigit() or not 1 <= int(out["limit"]) <= 1000:
            raise HttpError(400, "InvalidRequest", "limit: must be an integer from 1 to 1000")
        out["limit"] = int(out["limit"])
    return out


def to_bundle_request(method: str, path: str, query: Any, headers: Any, body: bytes) -> dict[str, Any]:
    """The request as handleRequest receives it: {method, path, query, headers, body, isBase64}.

    query: name -> value, or a list of values when the name repeats (``cid`` is the gateway's
    and removed). headers: lowercase name -> value, repeats joined with ", ". body: text if it is
    UTF-8, else base64 with isBase64 true.
    """
    q: dict[str, Any] = {}
    for k, v in query.items():
        if k == "cid":
            continue
        q[k] = [*q[k], v] if isinstance(q.get(k), list) else ([q[k], v] if k in q else v)
    h: dict[str, str] = {}
    for k, v in headers.items():
        name = k.lower()
        if name not in NOT_TO_BUNDLE:
            h[name] = f"{h[name]}, {v}" if name in h else v
    try:
        text, is_b64 = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, is_b64 = base64.b64encode(body).decode("ascii"), True
    return {"method": method, "path": path, "query": q, "headers": h, "body": text, "isBase64": is_b64}


def response_headers(headers: dict[str, str]) -> tuple[CIMultiDict, list[str]]:
    """The bundle's headers that may go out, and the names of those dropped (see the module doc)."""
    out: CIMultiDict = CIMultiDict()
    dropped: list[str] = []
    for name, value in headers.items():
        value = str(value)
        if (len(out) >= MAX_HEADERS or not TOKEN.fullmatch(name) or name.lower() in NOT_FROM_BUNDLE
                or len(value) > MAX_HEADER_BYTES or any(c in value for c in "\r\n\0")):
            dropped.append(name[:64])
            continue
        out.add(name, value)
    out.add("Content-Security-Policy", SANDBOX)
    out["X-Content-Type-Options"] = "nosniff"
    return out, dropped


class Gateway:
    def __init__(self, cfg: GatewaySection, pipeline: Pipeline, scheduler: Scheduler, policy: LiveAccess,
                 identities: Identities, repos: Repos, auth: ServiceAuth, session: Session, meters: Meters,
                 health: Callable[[], dict[str, Any]], shutdown_grace: float, logbook: LogBook,
                 share: Callable[[], int] = lambda: 1) -> None:
        """``session``: the runner's own, which writes XRPC results; handles resolve through its
        PDS. ``health``: the /healthz body. ``shutdown_grace``: how long requests in flight may
        take to finish when the gateway closes. ``share``: how many gateways share the rate
        (RateLimiter)."""
        self.cfg = cfg
        self.pipeline = pipeline
        self.scheduler = scheduler
        self.policy = policy
        self.identities = identities
        self.repos = repos
        self.auth = auth
        self.session = session
        self.meters = meters
        self.health = health
        self.shutdown_grace = shutdown_grace
        self.logbook = logbook
        self.limiter = RateLimiter(self.cfg.rate_per_minute, self.cfg.burst, share)
        self._latest: dict[tuple[str, str], tuple[float, str]] = {}
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        self.port: int | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])  # bodies are read (and capped) by _body
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/xrpc/{nsid}", self.xrpc)
        app.router.add_route("*", "/{actor}/{rkey}", self.bundle)
        app.router.add_route("*", "/{actor}/{rkey}/{path:.*}", self.bundle)
        return app

    async def start(self) -> str:
        """Bind the listen address; returns the public URL (public_url, else http://host:port)."""
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=self.shutdown_grace)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when listen asks for :0
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        self.url = (self.cfg.public_url or f"http://{host}:{self.port}").rstrip("/")
        log.info("gateway listening", listen=f"{host}:{self.port}", url=self.url)
        return self.url

    async def close(self) -> None:
        """Stop taking requests; the ones in flight finish, for at most shutdown_grace seconds."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        route = "bundle" if request.match_info.get("rkey") else ("xrpc" if request.path.startswith("/xrpc/") else "ops")
        try:
            resp = await handler(request)
        except web.HTTPException as e:  # aiohttp's own (no such route, method not allowed): JSON too
            resp = _json(e.status, {"error": e.reason.replace(" ", ""), "message": f"{e.reason}: {request.method} {request.path}"})
        except Exception as e:
            err = http_error(e)
            if err.status >= 500 and not isinstance(_what_failed(e), (HttpError, AtrundError)):
                log.exception("gateway: internal error", path=request.path)
            headers = {**err.headers, "Atrun-Request-Id": err.request_id} if err.request_id else err.headers
            resp = _json(err.status, err.body(), headers)
        self.meters.gateway_requests.labels(route, str(resp.status)).inc()
        return resp

    # -- operations ---------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return _json(200, self.health())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.meters.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- the bundle gateway -------------------------------------------------------------

    async def bundle(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        actor, rkey = request.match_info["actor"], request.match_info["rkey"]
        if not RKEY.fullmatch(rkey):
            raise HttpError(400, "InvalidRequest", f"{rkey[:100]!r} is not a record key")
        cid = request.query.get("cid")
        if cid is not None:
            try:
                check_cid(cid)
            except ValueError as e:
                raise HttpError(400, "InvalidRequest", f"cid: {e}") from None
        if actor.startswith("did:") and not DID.fullmatch(actor):
            raise HttpError(400, "InvalidRequest", f"{actor[:100]!r} is not a DID")
        try:
            # The policy is asked before any DID document is fetched (see atrund.atproto.serviceauth).
            did = actor if actor.startswith("did:") else await self.identities.did_for_handle(
                actor, self.session.pds, admit=self.policy.allows)
            if not self.policy.allows(did):
                raise NotServed(did)
        except NotServed as e:
            self.meters.denied["gateway"] += 1
            raise HttpError(403, "AuthorDenied", f"{e.did} is not served by this runner (access mode {self.policy.mode})") from None
        wait = self.limiter.take((did, rkey))
        if wait:
            self.meters.rate_limited.inc()
            raise HttpError(429, "RateLimited", f"bundle {did}/{rkey} is over this runner's rate limit of "
                            f"{self.cfg.rate_per_minute:g} requests per minute", {"Retry-After": str(max(1, math.ceil(wait)))})
        self._not_too_busy()
        body = await self._body(request)
        uri = str(AtUri(did, BUNDLE, rkey))
        ref = StrongRef(uri=uri, cid=cid or await self._latest_cid(did, rkey))
        args = to_bundle_request(request.method, "/" + request.match_info.get("path", ""), request.query, request.headers, body)
        out = await self.pipeline.run(ref, HANDLER, args, self.cfg.timeout, max_timeout=self.cfg.timeout, attempts=1,
                                      slot=self.scheduler.slot, queued_since=time.time())
        self._commit_state(out)
        metrics = out.metrics
        assert metrics is not None  # a run that started has them
        total = time.monotonic() - started
        self.meters.finished("gateway", out.status, metrics.runtime, metrics.execution_time_ms, total)
        request_id = self._logged(out, uri, None, "http")
        log.info("gateway request", author=did, bundle=ref.cid, rkey=rkey, method=request.method, status=out.status,
                 runtime=metrics.runtime, isolation=metrics.isolation, exec_ms=metrics.execution_time_ms,
                 total_ms=int(total * 1000), error_type=out.error_type, error=out.error, request_id=request_id)
        try:
            answer = self._answer(out, self.pipeline.timeout(self.cfg.timeout, self.cfg.timeout))
        except HttpError as e:
            e.request_id = request_id
            raise
        if request_id:
            answer.headers["Atrun-Request-Id"] = request_id
        return answer

    def _logged(self, out: Outcome, bundle_uri: str, invoker: str | None, kind: str) -> str | None:
        """Keep the run's output and error for its author (atrund.logbook): its request id, if
        there was anything to keep."""
        request_id = self.logbook.note(None, bundle_uri, invoker, kind, out.status, out.error, out.output)
        if out.output:
            log.debug("bundle output", request_id=request_id, output=out.output)
        return request_id

    def _commit_state(self, out: Outcome) -> None:
        """A successful run's writes to its bundle's state, in a transaction of their own, before
        it is answered: a caller that has the answer can read what the run wrote."""
        session, out.state = out.state, None
        if session is None:
            return
        try:
            self.pipeline.kv.commit_alone(session)
        except StoreError as e:
            raise HttpError(503, "StateNotStored", f"the bundle ran, but what it wrote to its state could not be "
                            f"stored, so its answer is withheld: {e}", {"Retry-After": "5"}) from None

    def _not_too_busy(self) -> None:
        """Refuse rather than queue without bound: each waiting request holds a connection open."""
        sched = self.scheduler
        waiting = sched.slot_waiters()
        if sched.running >= sched.concurrency and waiting >= self.cfg.max_waiting:
            raise HttpError(503, "Busy", f"{waiting} requests are already waiting for this runner; try again shortly",
                            {"Retry-After": "1"})

    async def _body(self, request: web.Request) -> bytes:
        limit = self.cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(413, "PayloadTooLarge", f"request body is {request.content_length} bytes; this runner takes at most {limit}")
        buf = bytearray()
        async for chunk in request.content.iter_chunked(65536):
            buf += chunk
            if len(buf) > limit:
                raise HttpError(413, "PayloadTooLarge", f"request body is more than this runner's limit of {limit} bytes")
        return bytes(buf)

    async def _latest_cid(self, did: str, rkey: str) -> str:
        """The CID of the bundle record now, asked of the author's PDS at most every latest_cache_seconds.

        Only the CID comes from this unverified read: the record itself is then fetched and
        proven against it (atrund.bundles), as for a pinned invocation."""
        key = (did, rkey)
        hit = self._latest.get(key)
        if hit and time.monotonic() - hit[0] < self.cfg.latest_cache_seconds:
            return hit[1]
        try:
            cid, _ = await self.repos.get_record(did, BUNDLE, rkey)
        except NotFound:
            self._latest.pop(key, None)
            raise NotFound(f"bundle at://{did}/{BUNDLE}/{rkey} does not exist") from None
        if len(self._latest) >= MAX_BUCKETS:
            self._latest.clear()
        self._latest[key] = (time.monotonic(), cid)
        return cid

    def _answer(self, out: Outcome, timeout: int) -> web.Response:
        """The bundle's HTTP answer, checked; a run that gave none answers as http_error says."""
        if out.status != "success":
            raise http_error(out, timeout)
        r = out.response
        if r is None:
            return _json(502, {"error": "InvalidResponse",
                               "message": f"{HANDLER} returned no HTTP response (an object with status, headers, body)"})
        status = r["status"]
        if status < 200:
            # 1xx are interim answers: sent as the whole answer, the client would wait for a final one forever.
            return _json(502, {"error": "InvalidResponse",
                               "message": f"the bundle answered with status {status}, which is not a final HTTP status"})
        if r.get("isBase64"):
            try:
                body = base64.b64decode(r["body"], validate=True)
            except ValueError:
                return _json(502, {"error": "InvalidResponse", "message": "the bundle's body is marked isBase64 but is not base64"})
        else:
            body = r["body"].encode()
        headers, dropped = response_headers(r["headers"])
        if dropped:
            log.info("gateway: dropped headers the bundle set", headers=dropped)
        if status in (204, 304):
            body = b""  # no body is allowed with these
        return web.Response(status=status, body=body, headers=headers)

    # -- XRPC ---------------------------------------------------------------------------

    async def xrpc(self, request: web.Request) -> web.Response:
        nsid = request.match_info["nsid"]
        method = {INVOKE: ("POST", "a procedure", self.invoke), GET_LOGS: ("GET", "a query", self.get_logs),
                  GET_STATE: ("GET", "a query", self.get_state)}.get(nsid)
        if method is None:
            raise HttpError(501, "MethodNotImplemented", f"this runner implements only {INVOKE}, {GET_LOGS} and {GET_STATE}")
        verb, kind, handler = method
        if request.method != verb:
            raise HttpError(405, "InvalidRequest", f"{nsid} is {kind}: use {verb}")
        return await handler(request, await self._caller(request, nsid))

    async def _caller(self, request: web.Request, nsid: str):
        """Who calls: a service-auth token for ``nsid``, from an author the policy serves."""
        try:
            caller = await self.auth.verify(request.headers.get("Authorization"), nsid, admit=self.policy.allows)
            if not self.policy.allows(caller.did):  # the policy may have changed while the token was checked
                raise NotServed(caller.did)
        except ServiceAuthError as e:
            self.meters.auth_failures.labels(e.reason).inc()
            raise
        except NotServed as e:
            self.meters.denied["xrpc"] += 1
            raise HttpError(403, "Forbidden", f"{e.did} is not served by this runner (access mode {self.policy.mode})") from None
        except StoreError as e:  # replicas: the used tokens are in the shared store, which did not answer
            raise HttpError(503, "StoreUnavailable", f"the runner cannot check the token's single use now: {e}",
                            {"Retry-After": "5"}) from None
        return caller

    async def get_logs(self, request: web.Request, caller) -> web.Response:
        """dev.atrun.getLogs: one run's entries (``id``) or one bundle's (``bundle``), after ``cursor``."""
        q = request.query
        if ("id" in q) == ("bundle" in q):
            raise HttpError(400, "InvalidRequest", "give exactly one of id (a run's AT URI or request id) and bundle (an AT URI)")
        try:
            after = int(q["cursor"]) if "cursor" in q else None
            limit = int(q.get("limit", "50"))
        except ValueError:
            raise HttpError(400, "InvalidRequest", "cursor and limit must be integers") from None
        if "bundle" in q:
            try:
                bundle = AtUri.parse(q["bundle"])
            except ValueError as e:
                raise HttpError(400, "InvalidRequest", f"bundle: {e}") from None
            if bundle.collection != BUNDLE:
                raise HttpError(400, "InvalidRequest", f"bundle: {q['bundle'][:200]!r} is not a {BUNDLE} record")
        entries = self.logbook.read(caller.did, id=q.get("id"), bundle=q.get("bundle"), after=after, limit=limit)
        body: dict[str, Any] = {"logs": [_log_entry(e) for e in entries]}
        body["cursor"] = str(entries[-1].seq if entries else (after or 0))
        return _json(200, body)

    async def invoke(self, request: web.Request, caller) -> web.Response:
        body = await self._body(request)
        inp = parse_invoke_input(body)
        self._not_too_busy()
        seen = time.time()
        out = await self.pipeline.outcome(inp.bundle, inp.endpoint, inp.args or {}, inp.timeout, queued_since=seen, attempts=1,
                                          slot=self.scheduler.slot)
        self._commit_state(out)
        metrics = out.metrics
        if metrics is not None:
            metrics.total_ms = max(0, int((time.time() - seen) * 1000))
        self.meters.finished("xrpc", out.status, metrics.runtime if metrics else None,
                             metrics.execution_time_ms if metrics else None, time.time() - seen)
        request_id = self._logged(out, inp.bundle.uri, caller.did, "xrpc")
        log.info("xrpc invoke", caller=caller.did, bundle=inp.bundle.cid, endpoint=inp.endpoint, status=out.status,
                 runtime=metrics.runtime if metrics else None, exec_ms=metrics.execution_time_ms if metrics else None,
                 error_type=out.error_type, error=out.error, request_id=request_id)
        # The answer is the result record's shape; there is no invocation record, so it names the caller.
        result = build(None, inp.bundle, out.status, data=out.data, error=out.error, response=out.response, metrics=metrics,
                       caller=caller.did)
        answer = result.to_record()
        if request_id:
            answer["requestId"] = request_id
        if inp.write_result:
            answer["result"] = await self._write_result(caller, result)
        return _json(200, answer)

    async def get_state(self, request: web.Request, caller) -> web.Response:
        """dev.atrun.getState: a bundle's committed state, for its author only (lexicons/dev/atrun/getState.json)."""
        q = parse_state_query(request.query)
        at = AtUri.parse(q["bundle"])
        if caller.did != at.did:
            raise HttpError(403, "Forbidden", f"only the bundle's author ({at.did}) may read its state; the token is {caller.did}'s")
        if self.pipeline.kv is None:
            raise HttpError(501, "MethodNotImplemented", "this runner keeps no bundle state")
        entries, cursor = self.pipeline.kv.read(at.did, at.rkey, q.get("key"), q.get("prefix", ""), q.get("limit", 100),
                                                q.get("cursor"))
        out: dict[str, Any] = {"entries": [{"key": k, "value": {"$type": JSON_VALUE, "json": json.dumps(v, ensure_ascii=False)}}
                                           for k, v in entries]}
        if cursor is not None:
            out["cursor"] = cursor
        log.info("xrpc getState", caller=caller.did, bundle=q["bundle"], entries=len(entries))
        return _json(200, out)

    async def _write_result(self, caller, result) -> dict[str, str]:
        """Also keep the answer as a result record, at a key the caller can compute:
        result_rkey("at://CALLER/dev.atrun.invoke/JTI") (their DID and their token's jti)."""
        record = result.to_record()
        rkey = result_rkey(str(AtUri(caller.did, INVOKE, caller.jti)))
        try:
            uri, cid = await self.session.put_record(RESULT, rkey, record)
        except AtrundError as e:
            raise HttpError(502, "ResultNotWritten", f"the bundle ran, but its result record could not be written: {e}") from None
        return {"uri": uri, "cid": cid}

