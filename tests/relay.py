"""A scripted subscribeRepos relay on loopback, the firehose wire format, and the `rig` fixture
(a real Firehose client, State and Intake against the local PDS) that the firehose scenarios and
the bounds tests drive. Shared test code, not tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import libipld
import pytest
import websockets

from atrund.access import AccessPolicy
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.records import INVOCATION, now_iso
from atrund.state import State

HELLO = "def main(args):\n    return {'n': args.get('n')}\n"
WAIT = 10.0  # seconds: the longest any single expectation may take before the test fails

Script = Callable[[websockets.ServerConnection], Awaitable[None]]


# -- the wire format ---------------------------------------------------------------------------

def encode(header: dict, body) -> bytes:
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


def create_op(uri: str, cid: str) -> dict:
    return {"action": "create", "path": uri.split("/", 3)[3], "cid": libipld.decode_multibase(cid)[1]}


def commit(did: str, seq: int, ops: list) -> bytes:
    return encode({"op": 1, "t": "#commit"}, {
        "seq": seq, "repo": did, "rebase": False, "tooBig": False, "rev": f"3l{seq:011d}", "since": None,
        "blocks": b"", "ops": ops, "blobs": [], "time": now_iso(),
    })


def error(name: str, message: str = "") -> bytes:
    return encode({"op": -1}, {"error": name, "message": message})


def raw_head(n: int) -> bytes:
    """An unmasked, final, binary WebSocket frame header for ``n`` payload bytes (RFC 6455 5.2)."""
    if n < 126:
        return bytes([0x82, n])
    if n < 1 << 16:
        return bytes([0x82, 126]) + n.to_bytes(2, "big")
    return bytes([0x82, 127]) + n.to_bytes(8, "big")


# -- the scripted server -----------------------------------------------------------------------

class Relay:
    """A subscribeRepos endpoint on loopback, any path: connection ``i`` runs ``scripts[i]``."""

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.paths: list[str] = []  # the request path (with query) of each connection, in order
        self.handlers: set[asyncio.Task] = set()
        self.server = None

    async def start(self) -> "Relay":
        self.server = await websockets.serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, ws: websockets.ServerConnection) -> None:
        self.handlers.add(asyncio.current_task())
        index = len(self.paths)
        self.paths.append(ws.request.path)
        try:
            if index < len(self.scripts):
                await self.scripts[index](ws)
            else:
                await ws.wait_closed()
        except websockets.ConnectionClosed:
            pass  # the client went away mid-script (as it does on an oversized frame)
        finally:
            self.handlers.discard(asyncio.current_task())

    async def close(self) -> None:
        for task in list(self.handlers):
            task.cancel()
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), WAIT)


def send(*messages: bytes | str, pause: float = 0.0, then_close: bool = False) -> Script:
    """A script: wait ``pause`` seconds, send these messages, then either hold the connection
    open or close it cleanly (code 1000, as a relay does after an error frame)."""

    async def script(ws: websockets.ServerConnection) -> None:
        if pause:
            await asyncio.sleep(pause)
        for m in messages:
            await ws.send(m)
        if then_close:
            await ws.close()
        else:
            await ws.wait_closed()

    return script


# -- the rig -----------------------------------------------------------------------------------

class FirehoseDied(AssertionError):
    """``Firehose.run()`` ended by itself; in the daemon that stops the whole runner."""


@dataclass
class Rig:
    author: object
    reader: Repos
    relay: Relay
    state: State
    firehose: Firehose
    bundle: dict
    runner_did: str
    seen: list[str] = field(default_factory=list)
    task: asyncio.Task | None = None

    @property
    def did(self) -> str:
        return self.author.account.did

    async def invocation(self, n: int) -> tuple[str, str]:
        """A genuine invocation on the local PDS, addressed to our runner: (uri, cid)."""
        uri = await self.author.invoke(self.bundle, self.runner_did, args={"n": n})
        cid, _ = await self.reader.get_record(self.did, INVOCATION, uri.rsplit("/", 1)[1])
        return uri, cid

    def start(self, *scripts: Script) -> None:
        self.relay.scripts = list(scripts)
        self.task = asyncio.create_task(self.firehose.run(), name="firehose-under-test")

    def cursor(self) -> str | None:
        return self.state.cursor(self.firehose.source)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Wait for ``condition``; fail at once if the client's loop has ended, or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.task.done():
                exc = None if self.task.cancelled() else self.task.exception()
                raise FirehoseDied(f"firehose.run() ended while waiting for {what}: {exc!r}") from exc
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                     f"seen={self.seen} connections={self.relay.paths} cursor={self.cursor()}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def rig(stack, author, reader, new_account, tmp_path):
    runner = new_account("fhs")
    bundle = await author.publish(HELLO)
    relay = await Relay().start()
    repos = Repos(Identities(stack.plc_url, allow_private_addresses=True))
    state = State(tmp_path / "state" / "atrund.db")
    policy = AccessPolicy("allowlist", frozenset({author.account.did}), frozenset())
    seen: list[str] = []
    firehose = Firehose(relay.url, repos, Intake(state, runner.did, policy, seen.append))
    r = Rig(author, reader, relay, state, firehose, bundle, runner.did, seen)
    try:
        yield r
    finally:
        if r.task is not None:
            r.task.cancel()
            await asyncio.wait_for(asyncio.gather(r.task, return_exceptions=True), WAIT)
        await relay.close()
        await repos.close()
        state.close()


def subscribe(cursor: int | None = None) -> str:
    return "/xrpc/com.atproto.sync.subscribeRepos" + (f"?cursor={cursor}" if cursor is not None else "")
