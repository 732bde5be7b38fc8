"""Firehose ingest: com.atproto.sync.subscribeRepos from a PDS or relay, instead of polling.

Per frame: the header and body are decoded (DAG-CBOR), and only a ``#commit`` whose ops touch
``dev.atrun.invocation/`` is looked at further; the CAR blocks are never decoded. Authenticity:
a relay can say anything, so the record is fetched from the author's own PDS (found through
their DID document) and its block hashed against the CID the commit named; only then is it an
invocation. A record already gone (deleted before it ran) is not run.

The cursor (the last ``seq``) is stored in the same SQLite transaction as the invocations the
frame carried, so a crash at any point neither skips nor repeats one; on reconnect and restart
the stream resumes from it. Reconnects back off with jitter. The poller's periodic full rescan
still runs beside this, for anything the stream missed.
"""

from __future__ import annotations

import asyncio
import random
import time

import libipld
import structlog
import websockets

from atrund.errors import AtrundError, NotFound
from atrund.ingest import Intake, Row
from atrund.records import INVOCATION
from atrund.repos import Repos

log = structlog.get_logger("atrund.ingest")

PREFIX = INVOCATION + "/"
IDLE_CURSOR_SAVE = 5.0  # seconds: frames that carry nothing for us still move the stored cursor this often
MAX_FRAME = 8 * 1024 * 1024


class Firehose:
    def __init__(self, url: str, repos: Repos, intake: Intake) -> None:
        self.url = url.rstrip("/")
        self.source = f"firehose:{self.url}"
        self.repos = repos
        self.intake = intake
        self.inactive: set[str] = set()
        self._saved_at = 0.0

    def _endpoint(self) -> str:
        cursor = self.intake.state.cursor(self.source)
        url = f"{self.url}/xrpc/com.atproto.sync.subscribeRepos"
        return url + (f"?cursor={cursor}" if cursor else "")

    async def run(self) -> None:
        delay = 1.0
        while True:
            connected_at = time.monotonic()
            try:
                async with websockets.connect(self._endpoint(), max_size=MAX_FRAME, open_timeout=10,
                                              ping_interval=20, ping_timeout=20) as ws:
                    log.info("firehose connected", url=self.url, cursor=self.intake.state.cursor(self.source))
                    async for message in ws:
                        if isinstance(message, bytes):
                            try:
                                await self.frame(message)
                            except (AttributeError, TypeError, ValueError, KeyError) as e:
                                # One malformed frame from a relay must not end ingest for everyone.
                                log.warning("firehose: malformed frame skipped", error=f"{type(e).__name__}: {e}")
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as e:
                log.warning("firehose connection lost; reconnecting", url=self.url, error=f"{type(e).__name__}: {e}")
            if time.monotonic() - connected_at > 60:
                delay = 1.0  # only a healthy minute resets the backoff
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 60.0)

    async def frame(self, message: bytes) -> None:
        try:
            header, body = libipld.decode_dag_cbor_multi(message)[:2]
        except (ValueError, TypeError):
            log.warning("firehose: undecodable frame skipped", size=len(message))
            return
        if not isinstance(header, dict) or not isinstance(body, dict):
            log.warning("firehose: frame of the wrong shape skipped")
            return
        if header.get("op") == -1:
            log.warning("firehose error frame", error=body.get("error"), message=body.get("message"))
            return
        kind, seq = header.get("t"), body.get("seq")
        if kind == "#info" and body.get("name") == "OutdatedCursor":
            log.warning("firehose: our cursor is older than the stream keeps; the rescan covers the gap")
        if not isinstance(seq, int):
            return
        rows = await self._invocations(body) if kind == "#commit" else []
        if kind == "#identity" and isinstance(body.get("did"), str):
            self.repos.identities.forget(body["did"])  # an author who moved PDS keeps working
        if kind == "#account" and isinstance(body.get("did"), str):
            # A taken-down, suspended or deactivated account is not served until it is active again.
            if body.get("active") is False:
                self.inactive.add(body["did"])
                log.warning("author account inactive: not served", did=body["did"], status=body.get("status"))
            else:
                self.inactive.discard(body["did"])
        now = time.monotonic()
        if not rows and now - self._saved_at < IDLE_CURSOR_SAVE:
            return
        self._saved_at = now
        self.intake.accept(self.source, str(seq), rows)

    async def _invocations(self, body: dict) -> list[Row]:
        did = body.get("repo")
        ops = [op for op in body.get("ops") or [] if isinstance(op, dict)] if isinstance(body.get("ops"), list) else []
        if not isinstance(did, str) or not any(str(op.get("path", "")).startswith(PREFIX) for op in ops):
            return []
        if not self.intake.policy.allows(did) or did in self.inactive:
            return []  # not fetched at all: a slow PDS of someone we would not serve cannot stall the stream
        rows = []
        for op in ops:
            path, action, cid = op.get("path", ""), op.get("action"), op.get("cid")
            if action != "create" or not isinstance(path, str) or not path.startswith(PREFIX) or not isinstance(cid, bytes):
                continue  # updates never run an invocation again; deletes have nothing to run
            rkey = path[len(PREFIX):]
            try:
                cid_str = libipld.encode_cid(cid)
            except ValueError:
                continue
            try:
                value = await self.repos.get_verified_record(did, INVOCATION, rkey, cid_str)
            except NotFound:
                continue  # deleted (or changed) before we got to it: not run
            except AtrundError as e:
                log.warning("firehose: cannot verify an invocation; the rescan will retry", did=did, rkey=rkey, error=str(e))
                continue
            uri = f"at://{did}/{path}"
            verdict = self.intake.verdict(uri, value)
            if verdict is not None:
                rows.append((uri, did, cid_str, value, verdict))
        return rows
