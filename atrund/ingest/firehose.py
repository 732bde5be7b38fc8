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
:mod:`atrund.atproto.proof` ties it to the author's signing key (commit signature, MST path, block
hashes), locally. A frame without the needed blocks falls back to fetching the record from the
author's own PDS and hashing it against the commit's CID. A forged frame is dropped and logged.

Deletes withdraw a pending invocation; updates never run one again. The cursor is stored in the
same transaction as the invocations, so a crash at any point neither skips nor repeats one; on
reconnect and restart the stream resumes after the last frame processed. Reconnects back off
with jitter. The poller's periodic full rescan still runs beside this, for what the stream missed.

No frame stops the stream:
- a frame that is malformed is skipped and counted; one whose processing fails in a way we did
  not foresee is quarantined (atrund.quarantine) and skipped; the cursor moves on either way;
- a state store that fails holds the batch (and, through the inbox, the socket) until it answers;
- a ``seq`` must be an integer below 2^53 that moves forward. One that jumps more than
  ``MAX_SEQ_JUMP`` ahead is believed only when the next frame carries on from it (a relay that
  really moved on); alone, it is dropped, so one forged frame cannot make every later genuine
  frame look like a replay;
- a stream that delivers frames but none that moves forward for ``STALL_SECONDS`` is stalled:
  /healthz says so and the connection is made again (from the live end, if it stalls twice at the
  same place; the poll rescan covers the gap).
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import libipld
import structlog
import websockets

from atrund import bounds
from atrund.atproto import addresses
from atrund.atproto.proof import Incomplete, ProofError, created_records, deleted_paths
from atrund.atproto.repos import Repos, to_json_model
from atrund.atproto.uri import AtUri
from atrund.errors import AtrundError, NotFound, PrivateAddress
from atrund.ingest import Intake, Row
from atrund.records import INVOCATION, SCHEDULE, TRIGGER
from atrund.state import StoreError
from atrund.triggers import Triggers

log = structlog.get_logger("atrund.ingest")

PREFIX = INVOCATION + "/"
NEEDLE = PREFIX.encode()
STANDING = (SCHEDULE + "/", TRIGGER + "/")  # an author's schedules or triggers changed: ingest them now
# The canonical DAG-CBOR header of a commit frame ({"t": "#commit", "op": 1}); anything else is
# decoded in full, so a relay that orders its keys differently only loses the fast path.
COMMIT_HEADER = libipld.encode_dag_cbor({"t": "#commit", "op": 1})
IDLE_CURSOR_SAVE = 5.0  # seconds: frames that carry nothing for us still move the stored cursor this often
MAX_FRAME = 8 * 1024 * 1024
INBOX_BYTES = 32 * 1024 * 1024  # frames received and not yet processed; beyond this the socket is not read
BATCH = 256  # frames processed per transaction at most
MAX_SEQ = 2**53  # seqs are JavaScript-safe integers in every implementation
MAX_SEQ_JUMP = 1_000_000  # further ahead than this in one frame needs the next frame to agree
STALL_SECONDS = 30.0
DISCONNECTED_DEGRADED = 10.0  # seconds without a connection before /healthz says so
MAX_QUARANTINED_FRAMES = 100  # per process: a relay sending garbage must not fill the disk


@dataclass
class Counters:
    frames: int = 0
    skipped_fast: int = 0  # never decoded: no invocation path in the bytes
    proven: int = 0  # invocations proven from the frame itself
    fetched: int = 0  # invocations proven by asking the author's PDS (frame lacked blocks)
    forged: int = 0  # frames refused: signature, tree or hash did not check out
    malformed: int = 0  # frames skipped: not DAG-CBOR, nested deeper than bounds.MAX_DEPTH, or of the wrong shape
    failed: int = 0  # frames whose processing failed unexpectedly (quarantined)
    implausible: int = 0  # frames dropped for a seq that does not move forward plausibly
    stalls: int = 0  # reconnects because the stream stalled


class Firehose:
    def __init__(self, url: str, repos: Repos, intake: Intake, triggers: Triggers | None = None,
                 standing_touched: Callable[[str], None] | None = None) -> None:
        self.url = url.rstrip("/")
        # Triggers: the collections they follow are decoded too (their needles), the rest stays
        # on the fast path. Schedules and triggers: a change is ingested at once.
        self.triggers = triggers
        self.standing_touched = standing_touched
        self._needles: tuple[bytes, ...] = (NEEDLE, *(p.encode() for p in STANDING)) if standing_touched else (NEEDLE,)
        self.source = f"firehose:{self.url}"
        self.repos = repos
        self.intake = intake
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._inbox_bytes = 0
        self._inbox_room = asyncio.Event()
        self.counters = Counters()
        self._saved_at = 0.0
        self._seq: int | None = None  # the last frame processed (stored or not)
        self._undecoded: bytes | None = None  # the last frame skipped undecoded: its seq, if asked
        self._skip = 0  # seqs to step over on reconnect, past a frame too big to receive
        self._oversized_at: int | None = None
        self._stored: int | None = None  # the stored cursor when the stream (re)started: the base of plausibility
        self._suspect: tuple[int, bytes] | None = None  # a frame whose seq jumped far ahead, until the next agrees
        self._ws = None
        self.connected = False
        self._disconnected_since: float | None = time.monotonic()
        self._last_error = "not connected yet"
        self._last_frame: float | None = None  # monotonic time of the last frame received
        self._stuck_since: float | None = None  # frames arrive but none moves forward, since
        self._stalled_at: int | None = None
        self.stall_seconds = STALL_SECONDS

    # -- the socket ---------------------------------------------------------------------------

    def _position(self) -> int | None:
        """The seq of the last frame processed, decoding the last skipped one only now."""
        if self._undecoded is not None:
            seq = _seq_of(self._undecoded)
            self._undecoded = None
            if seq is not None and self._moves_forward(seq) and not self._jumps(seq):
                self._seq = seq
        return self._seq

    def _from_live_end(self) -> None:
        """Forget where we are, in memory and stored: the next connection starts from the live end
        (the poll rescan covers whatever was posted in between)."""
        self._seq, self._undecoded, self._skip, self._stored = None, None, 0, None
        self.intake.state.forget_cursor(self.source)

    def _moves_forward(self, seq: int) -> bool:
        return 0 <= seq < MAX_SEQ and (self._seq is None or seq > self._seq)

    def _jumps(self, seq: int) -> bool:
        """Whether ``seq`` is further ahead of where we are than one frame plausibly moves."""
        base = self._seq if self._seq is not None else self._stored
        return base is not None and seq > base + MAX_SEQ_JUMP

    # -- health -------------------------------------------------------------------------------

    def conditions(self) -> dict[str, str]:
        """What /healthz should say about the stream now."""
        now = time.monotonic()
        if not self.connected and self._disconnected_since is not None and now - self._disconnected_since > DISCONNECTED_DEGRADED:
            return {"firehose": f"disconnected from {self.url} for {now - self._disconnected_since:.0f} s: {self._last_error}"}
        if self._stuck_since is not None and now - self._stuck_since > self.stall_seconds:
            return {"firehose": f"stalled: frames arrive from {self.url} but none has moved forward for "
                                f"{now - self._stuck_since:.0f} s (last seq {self._seq})"}
        return {}

    def figures(self) -> dict[str, Any]:
        return {"connected": self.connected, "last_frame_age": None if self._last_frame is None else time.monotonic() - self._last_frame,
                "counters": self.counters}

    def _progress(self) -> None:
        self._stuck_since = None

    def _no_progress(self) -> None:
        if self._stuck_since is None:
            self._stuck_since = time.monotonic()

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
        # (Re)started: go on from what is stored, not from what a previous run processed in memory
        # (its last batch may not have been stored), and drop frames it left unprocessed: the
        # stream sends them again from the stored cursor, and replays are recognised.
        while not self.inbox.empty():
            self.inbox.get_nowait()
            self.inbox.task_done()
        self._inbox_bytes = 0
        self._inbox_room.set()
        self._seq, self._undecoded, self._suspect, self._stuck_since = None, None, None, None
        self._stored = _int(self.intake.state.cursor(self.source))
        async with asyncio.TaskGroup() as tasks:  # if either loop fails, both end, and the supervisor restarts both
            tasks.create_task(self._process(), name="firehose-processor")
            tasks.create_task(self._read(), name="firehose-reader")
            tasks.create_task(self._watch(), name="firehose-watchdog")

    async def _watch(self) -> None:
        """Reconnect a stream that stalled (see the module doc)."""
        while True:
            await asyncio.sleep(self.stall_seconds / 6)
            if self._stuck_since is None or time.monotonic() - self._stuck_since <= self.stall_seconds or self._ws is None:
                continue
            self.counters.stalls += 1
            position = self._position()
            if self._stalled_at is not None and self._stalled_at == position:
                # The same place twice: our position means nothing to this stream. Start from its
                # live end; the poll rescan covers whatever was posted in between.
                log.warning("firehose stalled again at the same place; starting from the live end", url=self.url, seq=position)
                self._from_live_end()
            else:
                log.warning("firehose stalled: frames arrive but none moves forward; reconnecting", url=self.url,
                            seq=position, stuck_s=round(time.monotonic() - self._stuck_since, 1))
            self._stalled_at = position
            self._stuck_since = None
            await self._ws.close()

    async def _read(self) -> None:
        delay = 1.0
        while True:
            connected_at = time.monotonic()
            try:
                endpoint = self._endpoint()
                async with websockets.connect(endpoint, max_size=MAX_FRAME, open_timeout=10, ping_interval=20, ping_timeout=20,
                                              compression=None, **await self._guarded_socket(endpoint)) as ws:
                    log.info("firehose connected", url=self.url, cursor=endpoint.partition("?cursor=")[2] or None)
                    self._ws, self.connected, self._disconnected_since = ws, True, None
                    async for message in ws:
                        self._last_frame = time.monotonic()
                        if isinstance(message, bytes):
                            while self._inbox_bytes > INBOX_BYTES:  # backpressure: stop reading the socket
                                self._inbox_room.clear()
                                await self._inbox_room.wait()
                            self._inbox_bytes += len(message)
                            self.inbox.put_nowait(message)
            except websockets.ConnectionClosedError as e:
                self._last_error = f"{type(e).__name__}: {e}"
                self._closed(e)
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError, PrivateAddress) as e:
                self._last_error = f"{type(e).__name__}: {e}"
                log.warning("firehose connection lost; reconnecting", url=self.url, error=self._last_error)
            else:
                self._last_error = "the stream closed the connection"
            finally:
                if self.connected:
                    self._disconnected_since = time.monotonic()
                self._ws, self.connected = None, False
            await self.inbox.join()  # resume after the last frame received, once it is processed
            if time.monotonic() - connected_at > 60:
                delay = 1.0  # only a healthy minute resets the backoff
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 60.0)

    async def _guarded_socket(self, endpoint: str) -> dict[str, Any]:
        """The relay's socket, connected only after its addresses are checked (unless
        [identity] allow_private_addresses): websockets then uses it instead of connecting
        itself, and follows no redirect (it cannot on a given socket)."""
        if self.repos.identities.allow_private_addresses:
            return {}
        url = urlsplit(endpoint)
        sock = await addresses.open_stream_socket(url.hostname or "", url.port or (443 if url.scheme == "wss" else 80), 10)
        return {"sock": sock}

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
            await self._guarded(message, rows, withdrawn)
        now = time.monotonic()
        if not rows and not withdrawn and now - self._saved_at < IDLE_CURSOR_SAVE:
            return
        self._saved_at = now
        position = self._position()
        await self._store(str(position) if position is not None else None, rows, withdrawn)

    async def _guarded(self, message: bytes, rows: list[Row], withdrawn: list[str], replay: bool = False) -> None:
        """One frame; whatever goes wrong is this frame's alone (see the module doc)."""
        taken = len(rows), len(withdrawn)
        try:
            await self._frame(message, rows, withdrawn, replay)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - one frame must never end ingest for everyone
            del rows[taken[0]:], withdrawn[taken[1]:]  # nothing half-taken from it
            if isinstance(e, (AttributeError, TypeError, ValueError, KeyError, IndexError)):
                # A frame of a shape the code did not expect (a relay can send anything): skipped.
                self.counters.malformed += 1
                log.warning("firehose: malformed frame skipped", error=f"{type(e).__name__}: {e}")
                return
            self.counters.failed += 1
            log.exception("firehose: processing a frame failed; skipped and quarantined", url=self.url, after_seq=self._seq)
            if self.counters.failed <= MAX_QUARANTINED_FRAMES:
                self.intake.hold("frame", f"{self.url} after seq {self._seq}",
                                 {"url": self.url, "frame": base64.b64encode(message).decode()}, f"{type(e).__name__}: {e}")

    async def _store(self, cursor: str | None, rows: list[Row], withdrawn: list[str]) -> None:
        """Store a batch with the cursor; while the state store fails, hold it (and so the stream)."""
        delay = 1.0
        while True:
            try:
                self.intake.accept(self.source, cursor, rows, withdrawn)
                return
            except StoreError as e:
                log.warning("firehose: the state store failed; holding the batch", error=str(e), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def reprocess(self, item: dict[str, Any]) -> None:
        """Process a quarantined frame again (``atrund quarantine retry``); the cursor stays where it is."""
        rows: list[Row] = []
        withdrawn: list[str] = []
        await self._guarded(base64.b64decode(item["frame"]), rows, withdrawn, replay=True)
        await self._store(None, rows, withdrawn)

    async def _frame(self, message: bytes, rows: list[Row], withdrawn: list[str], replay: bool = False) -> None:
        self.counters.frames += 1
        if not self._wanted(message) and message.startswith(COMMIT_HEADER) and not replay:
            self.counters.skipped_fast += 1
            self._undecoded = message  # its seq is read only if the cursor is stored now
            self._progress()
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
                self._from_live_end()
            return
        kind, seq = header.get("t"), body.get("seq")
        if kind == "#info" and body.get("name") == "OutdatedCursor":
            log.warning("firehose: our cursor is older than the stream keeps; the rescan covers the gap")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return
        if not replay:
            self._position()  # the last frame skipped undecoded is where we are: judge this one from there
            if not self._moves_forward(seq):
                self._no_progress()  # a replay of what was processed already, or nonsense
                if seq >= MAX_SEQ or seq < 0:
                    self.counters.implausible += 1
                return
            if self._jumps(seq):
                held, self._suspect = self._suspect, (seq, message)
                if held is not None and held[0] < seq <= held[0] + MAX_SEQ_JUMP:
                    # Two frames agree that the stream moved on: take the held one, then this one.
                    log.warning("firehose: the stream's seq moved far ahead; following it", previous=self._seq, seq=held[0])
                    self._suspect, self._seq, self._stored = None, held[0] - 1, None
                    await self._frame(held[1], rows, withdrawn)
                    await self._frame(message, rows, withdrawn)
                    return
                if held is not None:
                    self.counters.implausible += 1
                self._no_progress()
                log.warning("firehose: a frame's seq jumps far ahead; held until the next frame agrees", last=self._seq, seq=seq)
                return
            if self._suspect is not None:
                log.warning("firehose: dropped a frame whose seq jumped ahead alone", seq=self._suspect[0], last=self._seq)
                self.counters.implausible += 1
                self._suspect = None
            self._seq, self._undecoded = seq, None
            self._progress()
        if self._skip and self._oversized_at is not None and seq > self._oversized_at + self._skip:
            self._skip, self._oversized_at = 0, None  # moving again: the skip is spent
        did = body.get("did")
        if kind == "#commit":
            await self._commit(body, rows, withdrawn)
        elif kind == "#identity" and isinstance(did, str):
            self.repos.forget(did)  # an author who moved PDS (or rotated keys) keeps working
        elif kind == "#account" and isinstance(did, str):
            # A taken-down, suspended or deactivated account is not served until it is active again.
            if body.get("active") is False:
                self.intake.inactive.add(did)
                log.warning("author account inactive: not served", did=did, status=body.get("status"))
            else:
                self.intake.inactive.discard(did)

    def _wanted(self, message: bytes) -> bool:
        """Whether a frame's bytes hold a path we read: an invocation, a schedule or trigger
        (substring tests), or one of a collection some trigger follows (op_collections); no decoding."""
        for needle in self._needles:
            if needle in message:
                return True
        if self.triggers is not None and self.triggers.followed:
            followed = self.triggers.followed
            for collection in op_collections(message):
                if collection in followed:
                    return True
        return False

    async def _commit(self, body: dict, rows: list[Row], withdrawn: list[str]) -> None:
        did, ops = body.get("repo"), body.get("ops")
        if not isinstance(did, str) or not isinstance(ops, list):
            return
        creates: list[tuple[str, bytes]] = []
        watched: list[tuple[str, str, bytes | None]] = []  # (path, action, cid) a trigger may want
        for op in ops:
            path = op.get("path") if isinstance(op, dict) else None
            if not isinstance(path, str):
                continue
            if not path.startswith(PREFIX):
                collection, action = path.partition("/")[0], op.get("action")
                if self.triggers is not None and isinstance(action, str) and self.triggers.wants(did, collection, action):
                    cid = op.get("cid")
                    watched.append((path, action, cid if isinstance(cid, bytes) else None))
                elif self.standing_touched is not None and path.startswith(STANDING):
                    self.standing_touched(did)
                continue
            try:
                uri = str(AtUri.of(did, path))
            except ValueError:
                continue  # not a record path (collection/rkey): names nothing that could run
            if op.get("action") == "create" and isinstance(op.get("cid"), bytes):
                creates.append((path, op["cid"]))
            elif op.get("action") == "delete":
                withdrawn.append(uri)  # deleted before it ran: it will not run
            # updates never run an invocation again
        if watched and did not in self.intake.inactive:
            await self._fire(did, body, watched)
        if not creates or not self.intake.policy.allows(did) or did in self.intake.inactive:
            return  # not verified at all: someone we would not serve cannot cost us work
        for path, cid, value in await self._proven(did, body, creates):
            uri = str(AtUri.of(did, path))
            verdict = self.intake.verdict(uri, value)
            if verdict is not None:
                rows.append((uri, did, cid, value, verdict))

    async def _proven(self, did: str, body: dict, creates: list[tuple[str, bytes]]) -> list[tuple[str, str, dict]]:
        """(path, cid, record) of the creates, each proven to be the author's; [] for a forgery."""
        try:
            # A key rotation not seen yet looks like a bad signature: proving checks once more
            # with a fresh DID document before the frame is called forged.
            records = await self.repos.proving(did, lambda key: created_records(body, creates, key))
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

    async def _fire(self, did: str, body: dict, watched: list[tuple[str, str, bytes | None]]) -> None:
        """Ops a trigger wants: each proven to be ``did``'s (a created or updated record by the
        signed tree, a delete by its absence from it), then handed to the triggers."""
        when = body.get("time")
        written = [(path, cid) for path, action, cid in watched if action != "delete" and cid is not None]
        actions = {path: action for path, action, _ in watched}
        for path, cid, value in await self._proven(did, body, written) if written else []:
            at = AtUri.of(did, path)
            self.triggers.fire(did, str(at), at.collection, actions[path], cid, value, when)
        deleted = [path for path, action, _ in watched if action == "delete"]
        if deleted and await self._proven_deleted(did, body, deleted):
            for path in deleted:
                at = AtUri.of(did, path)
                self.triggers.fire(did, str(at), at.collection, "delete", None, None, when)

    async def _proven_deleted(self, did: str, body: dict, paths: list[str]) -> bool:
        """Whether the signed commit proves ``paths`` gone (else, when the frame lacks blocks,
        whether the author's PDS says so)."""
        try:
            deleted_paths(body, paths, await self.repos.signing_key(did))
            return True
        except Incomplete:
            pass
        except ProofError as e:
            self.counters.forged += 1
            log.warning("firehose: commit does not prove its deletes; dropped", did=did, seq=body.get("seq"), error=str(e))
            return False
        except AtrundError as e:
            log.warning("firehose: cannot verify a commit now", did=did, error=str(e))
            return False
        for path in paths:
            at = AtUri.of(did, path)
            try:
                await self.repos.get_record(did, at.collection, at.rkey)
                return False  # still there: not what the frame claims
            except NotFound:
                continue
            except AtrundError:
                return False
        return True

    async def _fetched(self, did: str, creates: list[tuple[str, bytes]]) -> list[tuple[str, str, dict]]:
        """The frame did not carry the blocks: fetch each record from the author's own PDS."""
        out = []
        for path, cid in creates:
            try:
                cid_str = libipld.encode_cid(cid)
                at = AtUri.of(did, path)
                value = await self.repos.get_verified_record(did, at.collection, at.rkey, cid_str)
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


PATH_KEY = b"dpath"  # the DAG-CBOR text "path": the key of every op's repo path in a #commit frame


def op_collections(message: bytes):
    """The collections of a commit frame's op paths, read from its bytes without decoding it:
    after each ``path`` key, the CBOR text up to its first ``/``. The same bytes inside a record
    only add a candidate that is then decoded and found to be nothing (never a missed op: every
    op's path follows its ``path`` key). Cheap: a few ``find`` calls per frame, however many
    collections triggers follow."""
    at = message.find(PATH_KEY)
    while at != -1:
        head = at + len(PATH_KEY)
        kind = message[head] if head < len(message) else 0
        if 0x60 <= kind <= 0x77:  # text, length in the head byte
            start, size = head + 1, kind - 0x60
        elif kind == 0x78 and head + 1 < len(message):  # text, one length byte
            start, size = head + 2, message[head + 1]
        elif kind == 0x79:  # text, two length bytes
            start, size = head + 3, int.from_bytes(message[head + 1:head + 3], "big")
        else:
            start, size = head, 0
        slash = message.find(b"/", start, start + size)
        if slash > start:
            yield message[start:slash]
        at = message.find(PATH_KEY, head)


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
