"""Firehose ingest against a scripted subscribeRepos server: what a relay (or a network between
us and it) can do to the stream, and what the runner must make of it.

The server here is ours and says whatever a scenario needs; everything else is real: the
``Firehose`` client, the SQLite ``State``, and the author's records on the local PDS that every
invocation is verified against. Each connection the client makes runs the next script in the
scenario's list; later connections are held open silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import aiohttp
import coincurve
import libipld
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from relay import WAIT, Script, commit, create_op, encode, error, raw_head, send, subscribe
from structlog.testing import capture_logs

from atrund.access import AccessPolicy
from atrund.atproto.identity import Identities
from atrund.atproto.proof import CBOR_SHA256_CID, read_car
from atrund.atproto.repos import Repos
from atrund.ingest import Intake
from atrund.ingest.firehose import MAX_FRAME, Firehose
from atrund.records import INVOCATION, now_iso
from atrund.state import State

# -- scenarios ---------------------------------------------------------------------------------

async def test_normal_commit_is_accepted_once_and_moves_the_cursor(rig):
    """Normal: one genuine #commit creating an invocation for us → on_new gets its URI once, it is
    stored pending, and the stored cursor is that frame's seq (stored with it, atomically)."""
    uri, cid = await rig.invocation(1)
    rig.start(send(commit(rig.did, 41, [create_op(uri, cid)])))
    await rig.until(lambda: rig.seen, "the genuine invocation")
    assert rig.seen == [uri]
    assert rig.state.status_of(uri) == ("pending", None)
    assert rig.cursor() == "41"
    assert rig.relay.paths == [subscribe()]  # a fresh state subscribes without a cursor


async def test_forged_commits_are_never_accepted(rig, stack):
    """Forged: #commits in the author's name whose CID is not what the author's PDS holds at that
    path are never accepted, whatever CID they name: another of the author's records (the bundle),
    a made-up rkey, or any block of the PDS's own proof for the path (the signed commit, MST
    nodes), which is in the CAR and hashes correctly but is not the record. A genuine frame sent
    afterwards is accepted, which also shows the forged ones were fully processed before it."""
    uri, cid = await rig.invocation(2)
    rkey = uri.rsplit("/", 1)[1]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.pds_url}/xrpc/com.atproto.sync.getRecord",
                            params={"did": rig.did, "collection": INVOCATION, "rkey": rkey}) as resp:
            assert resp.status == 200
            _, blocks = libipld.decode_car(await resp.read())
    wanted = libipld.decode_multibase(cid)[1]
    proof = [key for key in blocks if key != wanted]
    assert proof, "sync.getRecord returned no proof blocks besides the record"
    made_up = uri.rsplit("/", 1)[0] + "/3zzzzzzzzzzzz"
    forged = [
        commit(rig.did, 50, [create_op(uri, rig.bundle["cid"])]),  # the bundle's CID on the invocation's path
        commit(rig.did, 51, [create_op(made_up, cid)]),  # a record the author never wrote
        commit(rig.did, 52, [{"action": "create", "path": uri.split("/", 3)[3], "cid": key} for key in proof]),
    ]
    real, real_cid = await rig.invocation(3)
    rig.start(send(*forged, commit(rig.did, 53, [create_op(real, real_cid)])))
    await rig.until(lambda: rig.seen, "the genuine frame after the forged ones")
    assert rig.seen == [real]
    assert rig.state.status_of(uri) is None  # the path that was forged over: never stored
    assert rig.state.status_of(made_up) is None
    assert rig.cursor() == "53"


async def test_garbage_between_frames_is_skipped(rig):
    """Garbage: undecodable binary messages (not CBOR, empty, a genuine frame cut in half) and a
    text message are skipped without dropping the connection; a genuine frame after them is
    still accepted."""
    uri, cid = await rig.invocation(4)
    good = commit(rig.did, 60, [create_op(uri, cid)])
    rig.start(send(b"\xff\xfe not cbor at all", "a text message", b"", good[: len(good) // 2],
                   encode({"op": 1, "t": "#commit"}, {})[:-1], good))
    await rig.until(lambda: rig.seen, "the genuine frame after the garbage")
    assert rig.seen == [uri]
    assert rig.cursor() == "60"
    assert len(rig.relay.paths) == 1  # skipped, not disconnected


async def test_oversized_frame_is_stepped_over(rig):
    """Oversized: a message bigger than the client's max_size (MAX_FRAME) closes the connection
    (1009). A relay would resend it on every reconnect from the same cursor, so the client steps
    over it: it reconnects with ?cursor= one past the last seq it processed (70 -> 71), and a
    genuine frame on the new connection is accepted."""
    first, first_cid = await rig.invocation(5)
    second, second_cid = await rig.invocation(6)
    rig.start(
        send(commit(rig.did, 70, [create_op(first, first_cid)]), b"\0" * (MAX_FRAME + 1)),
        send(commit(rig.did, 72, [create_op(second, second_cid)])),
    )
    await rig.until(lambda: len(rig.seen) == 2, "both invocations, across the reconnect")
    assert rig.seen == [first, second]
    assert rig.relay.paths == [subscribe(), subscribe(71)]
    assert rig.cursor() == "72"


async def test_an_oversized_frame_that_keeps_coming_is_stepped_over_further(rig):
    """Sparse seqs: the oversized frame is still the first thing sent after ?cursor=71, so the
    next reconnect steps over one more (72), and so on until the stream moves again."""
    first, first_cid = await rig.invocation(12)
    second, second_cid = await rig.invocation(13)
    big = b"\0" * (MAX_FRAME + 1)
    rig.start(
        send(commit(rig.did, 70, [create_op(first, first_cid)]), big),
        send(big),
        send(commit(rig.did, 75, [create_op(second, second_cid)])),
    )
    await rig.until(lambda: len(rig.seen) == 2, "the invocation after two oversized frames")
    assert rig.relay.paths == [subscribe(), subscribe(71), subscribe(72)]
    assert rig.cursor() == "75"


async def test_future_cursor_starts_again_from_the_live_end(rig):
    """FutureCursor: our stored cursor is ahead of the relay (it was reset, or the URL now names
    another relay). Reconnecting with it would fail forever, so the client forgets it and
    subscribes without a cursor; the relay's lower seqs are then accepted as new."""
    uri, cid = await rig.invocation(14)
    rig.state.accept_page(rig.firehose.source, "5000", [])
    rig.start(
        send(error("FutureCursor", "cursor in the future"), then_close=True),
        send(commit(rig.did, 12, [create_op(uri, cid)])),
    )
    await rig.until(lambda: rig.seen, "the invocation after the cursor reset")
    assert rig.relay.paths == [subscribe(5000), subscribe()]
    assert rig.cursor() == "12"


async def test_error_frames_are_logged_and_the_client_reconnects(rig):
    """Error frames: {op: -1} FutureCursor and ConsumerTooSlow (each followed by the relay closing
    the connection, as relays do) are logged as warnings, do not end the client's loop, and the
    reconnects work: an #info OutdatedCursor and then a genuine frame on the third connection
    are handled."""
    uri, cid = await rig.invocation(7)
    with capture_logs() as logs:
        rig.start(
            send(error("FutureCursor", "cursor in the future"), then_close=True),
            send(error("ConsumerTooSlow", "you are too slow"), then_close=True),
            send(encode({"op": 1, "t": "#info"}, {"name": "OutdatedCursor"}), commit(rig.did, 80, [create_op(uri, cid)])),
        )
        await rig.until(lambda: rig.seen, "the genuine frame after two error frames")
    assert rig.seen == [uri]
    assert len(rig.relay.paths) == 3
    errors = [e.get("error") for e in logs if e["event"] == "firehose error frame"]
    assert errors == ["FutureCursor", "ConsumerTooSlow"]
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "firehose error frame")
    assert any("cursor is older" in e["event"] for e in logs)
    assert not rig.task.done()


async def test_tcp_reset_mid_frame_loses_nothing_and_repeats_nothing(rig):
    """TCP reset mid-frame: the connection is aborted (RST) halfway through a frame. The half
    frame is never acted on; the client reconnects from the stored cursor; the relay replays the
    frame before the cut (same seq, same URI) and then the cut one in full: each invocation is
    accepted exactly once."""
    before, before_cid = await rig.invocation(8)
    cut, cut_cid = await rig.invocation(9)
    cut_frame = commit(rig.did, 91, [create_op(cut, cut_cid)])
    replayed = commit(rig.did, 90, [create_op(before, before_cid)])
    at_reconnect: dict[str, object] = {}

    async def reset_mid_frame(ws):
        await ws.send(replayed)
        await rig.until(lambda: rig.seen, "the frame before the cut")
        ws.transport.write(raw_head(len(cut_frame)) + cut_frame[: len(cut_frame) // 2])
        await asyncio.sleep(0.2)  # let the half frame reach the client before the reset
        ws.transport.abort()

    async def replay(ws):
        at_reconnect["cut"] = rig.state.status_of(cut)
        await ws.send(replayed)
        await ws.send(cut_frame)
        await ws.wait_closed()

    rig.start(reset_mid_frame, replay)
    await rig.until(lambda: len(rig.seen) >= 2, "the cut invocation, after the reconnect")
    await asyncio.sleep(0.3)  # room for a wrong second acceptance to show up
    assert rig.seen == [before, cut]
    assert at_reconnect == {"cut": None}  # nothing from the half frame was stored
    assert rig.relay.paths == [subscribe(), subscribe(90)]
    assert rig.state.status_of(before) == rig.state.status_of(cut) == ("pending", None)
    assert rig.cursor() == "91"


async def test_a_frame_after_a_long_silence_is_delivered(rig):
    """Silence: the relay sends nothing for 2.5 s, then a genuine frame; it is delivered on the
    same connection (no idle timeout drops a quiet stream)."""
    uri, cid = await rig.invocation(10)
    rig.start(send(commit(rig.did, 100, [create_op(uri, cid)]), pause=2.5))
    await rig.until(lambda: rig.seen, "the frame after the silence")
    assert rig.seen == [uri]
    assert len(rig.relay.paths) == 1


# Frames that decode as DAG-CBOR but not into the shape of a subscribeRepos message. A relay can
# send anything; none of this may stop the stream (it once did: each raised out of
# the frame handler, ended run(), and the daemon shut the runner down).
def _poison(did: str, uri: str, cid: str) -> dict[str, bytes]:
    path = uri.split("/", 3)[3]
    return {
        "header-not-a-map": libipld.encode_dag_cbor(1) + libipld.encode_dag_cbor(2),
        "body-not-a-map": libipld.encode_dag_cbor({"op": 1, "t": "#commit"}) + libipld.encode_dag_cbor("x"),
        "error-body-not-a-map": libipld.encode_dag_cbor({"op": -1}) + libipld.encode_dag_cbor(7),
        "ops-not-a-list": encode({"op": 1, "t": "#commit"}, {"seq": 1, "repo": did, "ops": 5}),
        "op-not-a-map": commit(did, 1, ["op", create_op(uri, cid)]),
        "cid-bytes-not-a-cid": commit(did, 1, [{"action": "create", "path": path, "cid": b"\x01\x02"}]),
    }


POISON = ["header-not-a-map", "body-not-a-map", "error-body-not-a-map", "ops-not-a-list", "op-not-a-map",
          "cid-bytes-not-a-cid"]


@pytest.mark.parametrize("kind", POISON)
async def test_a_decodable_frame_of_the_wrong_shape_is_skipped(rig, kind):
    """Wrong shape: a frame that is valid DAG-CBOR but not a well-formed message (see _poison) is
    skipped like garbage; the loop goes on, and a genuine frame after it is accepted."""
    uri, cid = await rig.invocation(11)
    rig.start(send(_poison(rig.did, uri, cid)[kind], commit(rig.did, 110, [create_op(uri, cid)])))
    await rig.until(lambda: rig.seen, f"the genuine frame after a {kind} frame")
    assert rig.seen == [uri]


async def test_an_inactive_account_is_not_served_until_active_again(rig):
    """#account active=false (takedown, deactivation) stops service for that author; a later
    #account active=true resumes it."""
    uri1, cid1 = await rig.invocation(21)
    uri2, cid2 = await rig.invocation(22)
    rig.start(send(
        encode({"op": 1, "t": "#account"}, {"seq": 200, "did": rig.did, "active": False, "status": "takendown"}),
        commit(rig.did, 201, [create_op(uri1, cid1)]),
        encode({"op": 1, "t": "#account"}, {"seq": 202, "did": rig.did, "active": True}),
        commit(rig.did, 203, [create_op(uri2, cid2)]),
    ))
    await rig.until(lambda: rig.seen, "the invocation after the account came back")
    assert rig.seen == [uri2]
    assert rig.state.status_of(uri1) is None


async def test_the_poll_rescan_does_not_take_what_an_inactive_account_posted(rig):
    """The stream says the author was taken down; the periodic poll rescan, sharing the same
    Intake, reads the author's PDS (which still serves the records) and takes nothing of theirs
    until the account is reported active again."""
    from atrund.ingest.poll import Poller

    uri, _ = await rig.invocation(23)
    rig.start(send(encode({"op": 1, "t": "#account"}, {"seq": 210, "did": rig.did, "active": False, "status": "takendown"})))
    await rig.until(lambda: rig.did in rig.firehose.intake.inactive, "the account marked inactive")
    poller = Poller(rig.reader, rig.firehose.intake, [rig.did], interval=60)
    assert await poller.poll_author(rig.did, reconcile=True) == 0
    assert rig.state.status_of(uri) is None
    rig.firehose.intake.inactive.discard(rig.did)  # as an #account active=true frame does
    assert await poller.poll_author(rig.did, reconcile=True) >= 1
    assert rig.state.status_of(uri) == ("pending", None)


# -- real frames: what the local PDS itself sent, relayed as is or doctored -----------------------

async def genuine_frame(stack, uri: str) -> bytes:
    """The local PDS's own #commit frame that created ``uri``: its real CAR slice and signature."""
    path = uri.split("/", 3)[3].encode()
    url = stack.pds_url.replace("http", "ws", 1) + "/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
    async with websockets.connect(url, max_size=None) as ws:
        while True:
            message = await asyncio.wait_for(ws.recv(), WAIT)
            if path in message:
                return message


def doctor(frame: bytes, seq: int, change: Callable[[dict, dict[bytes, bytes]], None] = lambda body, blocks: None) -> bytes:
    """``frame`` with a new seq, after ``change`` edited its body and blocks in place."""
    header, body = libipld.decode_dag_cbor_multi(frame)[:2]
    blocks = read_car(body["blocks"])
    change(body, blocks)
    body["seq"], body["blocks"] = seq, write_car(body["commit"], blocks)
    return encode(header, body)


def write_car(root: bytes, blocks: dict[bytes, bytes]) -> bytes:
    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    head = libipld.encode_dag_cbor({"roots": [root], "version": 1})
    return varint(len(head)) + head + b"".join(varint(len(c) + len(b)) + c + b for c, b in blocks.items())


def put_block(blocks: dict[bytes, bytes], value) -> bytes:
    raw = libipld.encode_dag_cbor(value)
    cid = CBOR_SHA256_CID + hashlib.sha256(raw).digest()
    blocks[cid] = raw
    return cid


def resign_with(key: coincurve.PrivateKey) -> Callable[[dict, dict[bytes, bytes]], None]:
    """A complete, self-consistent forgery: the same commit, signed by someone else's key."""

    def change(body: dict, blocks: dict[bytes, bytes]) -> None:
        commit_ = libipld.decode_dag_cbor(blocks.pop(body["commit"]))
        unsigned = {k: v for k, v in commit_.items() if k != "sig"}
        r, s = decode_dss_signature(key.sign(libipld.encode_dag_cbor(unsigned)))
        body["commit"] = put_block(blocks, {**unsigned, "sig": r.to_bytes(32, "big") + s.to_bytes(32, "big")})

    return change


async def test_a_genuine_frame_is_proven_from_its_own_blocks(rig, stack):
    """The PDS's real frame, relayed: accepted on the strength of its signature and MST path,
    with no request to the author's PDS."""
    uri, _ = await rig.invocation(30)
    rig.start(send(doctor(await genuine_frame(stack, uri), 300)))
    await rig.until(lambda: rig.seen, "the genuine frame")
    assert rig.seen == [uri]
    assert (rig.firehose.counters.proven, rig.firehose.counters.fetched, rig.firehose.counters.forged) == (1, 0, 0)
    assert rig.state.status_of(uri) == ("pending", None)


def _tamper_record(body: dict, blocks: dict[bytes, bytes]) -> None:
    cid = body["ops"][0]["cid"]
    record = libipld.decode_dag_cbor(blocks[cid])
    blocks[cid] = libipld.encode_dag_cbor({**record, "args": {"n": 999}})  # under the old CID


def _point_op_at_own_record(body: dict, blocks: dict[bytes, bytes]) -> None:
    record = libipld.decode_dag_cbor(blocks[body["ops"][0]["cid"]])
    body["ops"][0]["cid"] = put_block(blocks, {**record, "args": {"n": 999}})  # hashes fine, not in the tree


def _break_signature(body: dict, blocks: dict[bytes, bytes]) -> None:
    commit_ = libipld.decode_dag_cbor(blocks.pop(body["commit"]))
    commit_["sig"] = bytes(64 - len(commit_["sig"][:1])) + commit_["sig"][:1]
    body["commit"] = put_block(blocks, commit_)


@pytest.mark.parametrize("forgery", ["resigned", "signature", "record", "op-cid", "other-repo"])
async def test_a_doctored_real_frame_is_refused(rig, stack, new_account, forgery):
    """Forgeries built from a real frame, each self-consistent where it can be: the commit
    re-signed with another key; a broken signature; the record block altered under its CID; the
    op pointed at a new record block that hashes correctly but is not in the signed tree; and
    another author's genuine commit relabelled as our author's. None is stored, none makes the
    client ask the author's PDS (the refusal is local), and a genuine frame afterwards is accepted."""
    uri, _ = await rig.invocation(31)
    frame = await genuine_frame(stack, uri)
    if forgery == "other-repo":
        frame = doctor(frame, 310, lambda body, blocks: body.update(repo=new_account("fhs").did))
    else:
        change = {"resigned": resign_with(coincurve.PrivateKey()), "signature": _break_signature,
                  "record": _tamper_record, "op-cid": _point_op_at_own_record}[forgery]
        frame = doctor(frame, 310, change)
    genuine, _ = await rig.invocation(32)
    if forgery == "other-repo":
        # relabelled to a DID the policy does not serve it is skipped unverified; allow it so the proof is what refuses it
        rig.firehose.intake.policy = AccessPolicy("open", frozenset(), frozenset())
    rig.start(send(frame, doctor(await genuine_frame(stack, genuine), 311)))
    await rig.until(lambda: rig.seen, "the genuine frame after the forgery")
    assert rig.seen == [genuine]
    assert rig.state.status_of(uri) is None
    assert (rig.firehose.counters.forged, rig.firehose.counters.fetched) == (1, 0)


async def test_a_deleted_invocation_is_withdrawn_by_the_delete_frame(rig, stack):
    """A create and then its delete, both real frames: the invocation is stored pending and then
    withdrawn; it will not run."""
    uri, _ = await rig.invocation(33)
    created = await genuine_frame(stack, uri)
    await rig.author.session.delete_record(INVOCATION, uri.rsplit("/", 1)[1])
    delete = encode({"op": 1, "t": "#commit"}, {
        "seq": 331, "repo": rig.did, "rebase": False, "tooBig": False, "rev": "3l00000000331", "since": None,
        "blocks": b"", "ops": [{"action": "delete", "path": uri.split("/", 3)[3], "cid": None}], "blobs": [], "time": now_iso()})
    rig.start(send(doctor(created, 330), delete))
    await rig.until(lambda: rig.state.status_of(uri) == ("withdrawn", None), "the invocation withdrawn")
    assert rig.cursor() == "331"


async def test_a_stuck_processor_stops_the_reader_instead_of_buffering(rig, stack, tmp_path, monkeypatch):
    """Backpressure: the processor is stuck on a genuine invocation whose author's DID document
    cannot be read (the PLC directory here accepts connections and never answers), while the
    relay pushes 25 MiB of frames behind it. The reader must stop taking frames once the inbox
    holds INBOX_BYTES (set to 256 KiB here), so the relay's sends back up instead of this
    process buffering everything: the inbox never exceeds the bound by more than one frame."""
    import atrund.ingest.firehose as firehose_module

    monkeypatch.setattr(firehose_module, "INBOX_BYTES", 256 * 1024)
    silent = await asyncio.start_server(lambda r, w: asyncio.sleep(3600), "127.0.0.1", 0)
    repos = Repos(Identities(f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}", timeout=60, allow_private_addresses=True))
    state = State(tmp_path / "stuck" / "atrund.db")
    policy = AccessPolicy("allowlist", frozenset({rig.did}), frozenset())
    stuck = Firehose(rig.relay.url, repos, Intake(state, rig.runner_did, policy, lambda uri: None))
    uri, _ = await rig.invocation(40)
    first = doctor(await genuine_frame(stack, uri), 400)
    filler = [encode({"op": 1, "t": "#commit"}, {"seq": 401 + i, "repo": rig.did, "ops": [], "blocks": b"\0" * 65536})
              for i in range(400)]
    sent = 0

    async def push(ws) -> None:
        nonlocal sent
        await ws.send(first)
        for frame in filler:
            await ws.send(frame)
            sent += 1
        await ws.wait_closed()

    rig.relay.scripts = [push]
    task = asyncio.create_task(stuck.run())
    try:
        peak, deadline = 0, time.monotonic() + 4.0
        while time.monotonic() < deadline:
            peak = max(peak, stuck._inbox_bytes)
            await asyncio.sleep(0.01)
        assert 0 < peak <= 256 * 1024 + len(filler[0]), peak
        assert sent < len(filler), "the relay sent everything: nothing pushed back"
        assert state.cursor(stuck.source) is None  # nothing behind the stuck frame was taken as processed
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        silent.close()
        await repos.close()
        state.close()


# -- seqs that do not move forward plausibly, and stalls (issue 11) ---------------------------

def info(seq: int) -> bytes:
    return encode({"op": 1, "t": "#info"}, {"seq": seq, "name": "Nonsense"})


async def test_a_huge_seq_in_one_frame_does_not_hide_the_genuine_frames_after_it(rig):
    """A frame with seq 2^62 (or anything past 2^53) is never taken as our position: the genuine
    frames after it (seq 91, 92) are processed and the cursor stays on them. Before: every later
    genuine frame looked like a replay of something already processed, until a reconnect."""
    first, first_cid = await rig.invocation(20)
    second, second_cid = await rig.invocation(21)
    rig.start(send(commit(rig.did, 90, []), info(2**62), commit(rig.did, 91, [create_op(first, first_cid)]),
                   commit(rig.did, 92, [create_op(second, second_cid)])))
    await rig.until(lambda: len(rig.seen) == 2, "both genuine frames after the huge seq")
    assert rig.seen == [first, second]
    assert rig.cursor() == "92"
    assert rig.firehose.counters.implausible == 1


async def test_a_seq_that_jumps_far_ahead_alone_is_dropped(rig):
    """One frame that jumps a million and more ahead, followed by frames that carry on from where
    the stream was, is dropped (counted); the stream goes on from 101."""
    uri, cid = await rig.invocation(22)
    rig.start(send(commit(rig.did, 100, []), info(100 + 5_000_000), commit(rig.did, 101, [create_op(uri, cid)])))
    await rig.until(lambda: rig.seen, "the genuine frame after the lone jump")
    assert rig.cursor() == "101"
    assert rig.firehose.counters.implausible == 1


async def test_a_jump_the_next_frame_agrees_with_is_followed(rig):
    """A relay that really moved on (a jump, then frames that carry on from it) is followed: both
    frames are processed and the cursor is the new seq."""
    first, first_cid = await rig.invocation(23)
    second, second_cid = await rig.invocation(24)
    far = 110 + 5_000_000
    rig.start(send(commit(rig.did, 110, []), commit(rig.did, far, [create_op(first, first_cid)]),
                   commit(rig.did, far + 1, [create_op(second, second_cid)])))
    await rig.until(lambda: len(rig.seen) == 2, "both frames after the agreed jump")
    assert rig.seen == [first, second]
    assert rig.cursor() == str(far + 1)
    assert rig.firehose.counters.implausible == 0


def replaying(did: str, seq: int, times: int) -> Script:
    """A script: one commit at ``seq``, then ``times`` frames at ``seq - 1`` (none moves forward),
    50 a second, then the connection held open."""

    async def script(ws: websockets.ServerConnection) -> None:
        await ws.send(commit(did, seq, []))
        for _ in range(times):
            await ws.send(info(seq - 1))
            await asyncio.sleep(0.02)
        await ws.wait_closed()

    return script


async def test_a_stream_that_only_replays_is_a_stall_and_is_reconnected(rig):
    """Frames keep arriving but none moves forward (a relay resending seq 119 over and over): after
    the stall time the firehose says so (a warning, and `stalled` for /healthz while it lasts) and
    connects again; on the new connection a genuine frame is processed and the report clears."""
    uri, cid = await rig.invocation(25)
    rig.firehose.stall_seconds = 1.2
    reported: list[dict] = []

    def stalled_or_seen() -> bool:
        if "firehose" in (found := rig.firehose.conditions()):
            reported.append(found)
        return bool(rig.seen)

    with capture_logs() as logs:
        rig.start(replaying(rig.did, 120, times=200), send(commit(rig.did, 121, [create_op(uri, cid)])))
        await rig.until(stalled_or_seen, "the genuine frame on the new connection")
    assert any(e["event"].startswith("firehose stalled") for e in logs)
    assert rig.firehose.counters.stalls >= 1 and len(rig.relay.paths) >= 2
    assert all("stalled" in r["firehose"] for r in reported)
    assert rig.firehose.conditions() == {}


async def test_a_stall_is_reported_while_it_lasts(rig):
    """While frames arrive without moving forward and the connection is not yet made again,
    /healthz's firehose condition says `stalled`, naming the last seq."""
    rig.firehose.stall_seconds = 3600  # the watchdog does not reconnect within this test
    rig.start(replaying(rig.did, 130, times=100))
    await rig.until(lambda: rig.firehose._stuck_since is not None, "frames that do not move forward")
    rig.firehose.stall_seconds = 0.1
    await asyncio.sleep(0.2)
    assert "stalled" in rig.firehose.conditions().get("firehose", "")


async def test_a_disconnected_firehose_is_reported(rig, monkeypatch):
    """No connection for longer than DISCONNECTED_DEGRADED: /healthz says disconnected, and why."""
    from atrund.ingest import firehose as module

    monkeypatch.setattr(module, "DISCONNECTED_DEGRADED", 0.5)
    rig.firehose.url = "ws://127.0.0.1:9"  # the discard port: nothing listens on loopback here
    rig.start()
    await rig.until(lambda: "firehose" in rig.firehose.conditions(), "the disconnection to be reported")
    assert "disconnected" in rig.firehose.conditions()["firehose"]
