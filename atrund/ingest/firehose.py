"""Firehose ingest: com.atproto.sync.subscribeRepos from a PDS or relay, instead of polling.

The data flow: a reader task takes messages off the socket into a bounded inbox; when the inbox
is full the reader stops reading, so the socket (and TCP) push back on the relay instead of this
process growing. A processor takes what the inbox holds, up to ``BATCH`` frames at once, and
stores what they carry with the cursor in one SQLite transaction (group commit: one fsync per
batch, not per frame).

Per frame, cheapest test first: a frame whose bytes do not contain ``dev.atrun.invocation/`` is
a commit that touches no invocation (paths are plain CBOR text), so it is not decoded at all;
only its position matters. The rest is decoded (header and body; the CAR slice is not parsed
unless an op creates an invocation of an author the policy serves).

Authenticity: a relay can say anything, so an invocation is only believed once
:mod:`atrund.ingest.proof` ties it to the author's signing key (commit signature, MST path, block
hashes), locally. A frame without the needed blocks falls back to fetching the record from the
author's own PDS and hashing it against the commit's CID. A forged frame is dropped and logged.

Deletes withdraw a pending invocation; updates never run one again. The cursor is stored in the
same transaction as the invocations, so a crash at any point neither skips nor repeats one; on
reconnect and restart the stream resumes after the last frame processed. Reconnects back off
with jitter. The poller's periodic full rescan still runs beside this, for what the stream missed.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import libipld
import structlog
import websockets

from atrund import bounds
from atrund.errors import AtrundError, NotFound
from atrund.ingest import Intake, Row
from atrund.ingest.proof import Incomplete, ProofError, SigningKey, created_records
from atrund.records import INVOCATION
from atrund.repos import Repos, to_json_model

log = structlog.get_logger("atrund.ingest")

PREFIX = INVOCATION + "/"
NEEDLE = PREFIX.encode()
# The canonical DAG-CBOR header of a commit frame ({"t": "#commit", "op": 1}); anything else is
# decoded in full, so a relay that orders its keys differently only loses the fast path.
COMMIT_HEADER = libipld.encode_dag_cbor({"t": "#commit", "op": 1})
IDLE_CURSOR_SAVE = 5.0  # seconds: frames that carry nothing for us still move the stored cursor this often
MAX_FRAME = 8 * 1024 * 1024
INBOX_BYTES = 32 * 1024 * 1024  # frames received and not yet processed; beyond this the socket is not read
BATCH = 256  # frames processed per transaction at most


@dataclass
class Counters:
    frames: int = 0
    skipped_fast: int = 0  # never decoded: no invocation path in the bytes
    proven: int = 0  # invocations proven from the frame itself
    fetched: int = 0  # invocations proven by asking the author's PDS (frame lacked blocks)
    forged: int = 0  # frames refused: signature, tree or hash did not check out
    malformed: int = 0  # frames skipped: not DAG-CBOR, nested deeper than bounds.MAX_DEPTH, or of the wrong shape


class Firehose:
    def __init__(self, url: str, repos: Repos, intake: Intake) -> None:
        self.url = url.rstrip("/")
        self.source = f"firehose:{self.url}"
        self.repos = repos
        self.intake = intake
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._inbox_bytes = 0
        self._inbox_room = asyncio.Event()
        self.counters = Counters()
        self._keys: dict[str, SigningKey] = {}
        self._saved_at = 0.0
        self._seq: int | None = None  # the last frame processed (stored or not)
        self._undecoded: bytes | None = None  # the last frame skipped undecoded: its seq, if asked
        self._skip = 0  # seqs to step over on reconnect, past a frame too big to receive
        self._oversized_at: int | None = None

    # -- the socket ---------------------------------------------------------------------------

    def _position(self) -> int | None:
        """The seq of the last frame processed, decoding the last skipped one only now."""
        if self._undecoded is not None:
            seq = _seq_of(self._undecoded)
            self._undecoded = None
            if seq is not None and (self._seq is None or seq > self._seq):
                self._seq = seq
        return self._seq

    def _resume_point(self) -> int | None:
        """Where the stream goes on from: the last frame processed, else the stored cursor."""
        position = self._position()
        return position if position is not None else _int(self.intake.state.cursor(self.source))

    def _endpoint(self) -> str:
        cursor = self._resume_point()
        if cursor is not None and self._skip:
            cursor += self._skip
        url = f"{self.url}/xrpc/com.atproto.sync.subscribeRepos"
        return url + (f"?cursor={cursor}" if cursor is not None else "")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:  # if either loop fails, both end, and the daemon says why
            tasks.create_task(self._process(), name="firehose-processor")
            tasks.create_task(self._read(), name="firehose-reader")

    async def _read(self) -> None:
        delay = 1.0
        while True:
            connected_at = time.monotonic()
            try:
                endpoint = self._endpoint()
                async with websockets.connect(endpoint, max_size=MAX_FRAME, open_timeout=10,
                                              ping_interval=20, ping_timeout=20, compression=None) as ws:
                    log.info("firehose connected", url=self.url, cursor=endpoint.partition("?cursor=")[2] or None)
                    async for message in ws:
                        if isinstance(message, bytes):
                            while self._inbox_bytes > INBOX_BYTES:  # backpressure: stop reading the socket
                                self._inbox_room.clear()
                                await self._inbox_room.wait()
                            self._inbox_bytes += len(message)
                            self.inbox.put_nowait(message)
            except websockets.ConnectionClosedError as e:
                self._closed(e)
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as e:
                log.warning("firehose connection lost; reconnecting", url=self.url, error=f"{type(e).__name__}: {e}")
            await self.inbox.join()  # resume after the last frame received, once it is processed
            if time.monotonic() - connected_at > 60:
                delay = 1.0  # only a healthy minute resets the backoff
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 60.0)

    def _closed(self, e: websockets.ConnectionClosedError) -> None:
        """A connection the relay (or our own size limit) ended abnormally."""
        if e.rcvd is None and e.sent is not None and e.sent.code == 1009:
            # A frame bigger than MAX_FRAME: the relay would resend it on every reconnect from
            # the same cursor, forever. Step over one seq more each time it happens at the same
            # place (seqs can be sparse); the poll rescan finds anything it carried for us.
            position = self._resume_point()
            self._skip = self._skip + 1 if position == self._oversized_at else 1
            self._oversized_at = position
            log.warning("firehose: a frame over the size limit; skipping it", limit=MAX_FRAME, after_seq=position,
                        skip=self._skip)
            return
        log.warning("firehose connection lost; reconnecting", url=self.url, error=f"{type(e).__name__}: {e}")

    async def _process(self) -> None:
        while True:
            batch = [await self.inbox.get()]
            while len(batch) < BATCH and not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            try:
                await self.ingest(batch)
            finally:
                self._inbox_bytes -= sum(map(len, batch))
                self._inbox_room.set()
                for _ in batch:
                    self.inbox.task_done()

    # -- frames -------------------------------------------------------------------------------

    async def ingest(self, messages: list[bytes]) -> None:
        """Process frames in order and store what they carry with the cursor, in one transaction."""
        rows: list[Row] = []
        withdrawn: list[str] = []
        for message in messages:
            try:
                await self._frame(message, rows, withdrawn)
            except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
                # One malformed frame from a relay must not end ingest for everyone.
                self.counters.malformed += 1
                log.warning("firehose: malformed frame skipped", error=f"{type(e).__name__}: {e}")
        now = time.monotonic()
        if not rows and not withdrawn and now - self._saved_at < IDLE_CURSOR_SAVE:
            return
        self._saved_at = now
        position = self._position()
        self.intake.accept(self.source, str(position) if position is not None else None, rows, withdrawn)

    async def _frame(self, message: bytes, rows: list[Row], withdrawn: list[str]) -> None:
        self.counters.frames += 1
        if NEEDLE not in message and message.startswith(COMMIT_HEADER):
            self.counters.skipped_fast += 1
            self._undecoded = message  # its seq is read only if the cursor is stored now
            return
        try:
            header, body = bounds.decode_dag_cbor(message, "firehose frame", multi=True)[:2]
        except (bounds.Malformed, ValueError) as e:  # ValueError: fewer than two items
            self.counters.malformed += 1
            log.warning("firehose: undecodable frame skipped", size=len(message), error=str(e))
            return
        if not isinstance(header, dict) or not isinstance(body, dict):
            self.counters.malformed += 1
            log.warning("firehose: frame of the wrong shape skipped")
            return
        if header.get("op") == -1:
            log.warning("firehose error frame", error=body.get("error"), message=body.get("message"))
            if body.get("error") == "FutureCursor":
                # Our cursor is ahead of the stream (the relay was reset, or the URL now names
                # another one): its seqs mean nothing here. Start again from the live end; the
                # poll rescan covers whatever was posted in between.
                log.warning("firehose: our cursor is ahead of the stream; starting from its live end", url=self.url)
                self._seq, self._undecoded, self._skip = None, None, 0
                self.intake.state.forget_cursor(self.source)
            return
        kind, seq = header.get("t"), body.get("seq")
        if kind == "#info" and body.get("name") == "OutdatedCursor":
            log.warning("firehose: our cursor is older than the stream keeps; the rescan covers the gap")
        if not isinstance(seq, int):
            return
        if self._seq is not None and seq <= self._seq:
            return  # a replay of what was processed already (a relay resending after a reconnect)
        self._seq, self._undecoded = seq, None
        if self._skip and self._oversized_at is not None and seq > self._oversized_at + self._skip:
            self._skip, self._oversized_at = 0, None  # moving again: the skip is spent
        did = body.get("did")
        if kind == "#commit":
            await self._commit(body, rows, withdrawn)
        elif kind == "#identity" and isinstance(did, str):
            self.repos.identities.forget(did)  # an author who moved PDS (or rotated keys) keeps working
            self._keys.pop(did, None)
        elif kind == "#account" and isinstance(did, str):
            # A taken-down, suspended or deactivated account is not served until it is active again.
            if body.get("active") is False:
                self.intake.inactive.add(did)
                log.warning("author account inactive: not served", did=did, status=body.get("status"))
            else:
                self.intake.inactive.discard(did)

    async def _commit(self, body: dict, rows: list[Row], withdrawn: list[str]) -> None:
        did, ops = body.get("repo"), body.get("ops")
        if not isinstance(did, str) or not isinstance(ops, list):
            return
        creates: list[tuple[str, bytes]] = []
        for op in ops:
            path = op.get("path") if isinstance(op, dict) else None
            if not isinstance(path, str) or not path.startswith(PREFIX):
                continue
            if op.get("action") == "create" and isinstance(op.get("cid"), bytes):
                creates.append((path, op["cid"]))
            elif op.get("action") == "delete":
                withdrawn.append(f"at://{did}/{path}")  # deleted before it ran: it will not run
            # updates never run an invocation again
        if not creates or not self.intake.policy.allows(did) or did in self.intake.inactive:
            return  # not verified at all: someone we would not serve cannot cost us work
        for path, cid, value in await self._proven(did, body, creates):
            uri = f"at://{did}/{path}"
            verdict = self.intake.verdict(uri, value)
            if verdict is not None:
                rows.append((uri, did, cid, value, verdict))

    async def _proven(self, did: str, body: dict, creates: list[tuple[str, bytes]]) -> list[tuple[str, str, dict]]:
        """(path, cid, record) of the creates, each proven to be the author's; [] for a forgery."""
        try:
            try:
                records = created_records(body, creates, await self._key(did))
            except ProofError:
                # A key rotation not seen yet looks like a bad signature: check once with a fresh
                # DID document before calling the frame forged.
                self._keys.pop(did, None)
                self.repos.identities.forget(did)
                records = created_records(body, creates, await self._key(did))
        except Incomplete:
            return await self._fetched(did, creates)
        except ProofError as e:
            self.counters.forged += 1
            log.warning("firehose: commit does not prove its records; dropped", did=did, seq=body.get("seq"), error=str(e))
            return []
        except AtrundError as e:  # the author's DID document could not be read
            log.warning("firehose: cannot verify a commit now; the rescan will retry", did=did, error=str(e))
            return []
        self.counters.proven += len(records)
        return [(path, libipld.encode_cid(cid), to_json_model(records[path])) for path, cid in creates]

    async def _fetched(self, did: str, creates: list[tuple[str, bytes]]) -> list[tuple[str, str, dict]]:
        """The frame did not carry the blocks: fetch each record from the author's own PDS."""
        out = []
        for path, cid in creates:
            try:
                cid_str = libipld.encode_cid(cid)
                value = await self.repos.get_verified_record(did, INVOCATION, path[len(PREFIX):], cid_str)
            except ValueError:
                continue
            except NotFound:
                continue  # deleted or changed before we got to it, or never the author's: not run
            except AtrundError as e:
                log.warning("firehose: cannot verify an invocation; the rescan will retry", did=did, path=path, error=str(e))
                continue
            self.counters.fetched += 1
            out.append((path, cid_str, value))
        return out

    async def _key(self, did: str) -> SigningKey:
        key = self._keys.get(did)
        if key is None:
            doc = await self.repos.identities.document(did)
            did_key = doc.get_did_key()
            if not did_key:
                raise ProofError(f"{did} publishes no atproto signing key")
            key = self._keys[did] = SigningKey(did_key)
        return key


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _seq_of(message: bytes) -> int | None:
    try:
        seq = bounds.decode_dag_cbor(message, "firehose frame", multi=True)[1].get("seq")
    except (bounds.Malformed, AttributeError, IndexError):
        return None
    return seq if isinstance(seq, int) else None
