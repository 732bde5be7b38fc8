"""The runner's side of a microVM's network: the streams and DNS queries atrun-init relays over
the VM's channel (guest_init.py documents the frames), handed to the worker's egress proxy.

The guest's only namespace is set up as a worker's egress namespace is on the host (AnyIP
routes, a listener per granted port, a DNS socket on its nameserver address), so every
connection the bundle makes ends in atrun-init, which opens a stream here naming the address
and port the bundle asked for. Each stream becomes one end of a Unix socket pair whose other
end goes to ``Egress.relay``: the same proxy as under ``process`` and ``container`` checks the
destination against what DNS handed out and the grant (never resolving again), connects, moves
the bytes and counts them. DNS queries go to ``Egress.answer``. The VM has no network device:
nothing outside can connect in, and the bundle never holds the channel.

Flow control: each direction of a stream has a window (``WINDOW``). This side reads from the
proxy only as much as the guest has room for, and acknowledges what the guest sent once it was
handed to the proxy, so the runner holds at most a window per stream, however slowly either
end reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct

import structlog

from atrund.execute.egress.proxy import MAX_LINKS, Egress

log = structlog.get_logger("atrund.egress")
HEADER = struct.Struct(">cI")  # guest_init.py's frame header
ID = struct.Struct(">I")
CREDIT = struct.Struct(">II")
WINDOW = 256 << 10  # guest_init.WINDOW: the two must agree
MAX_QUERIES = 32
KINDS = frozenset({b"T", b"D", b"F", b"R", b"W", b"Q"})  # guest -> host frames of the network


class Stream:
    """One connection the bundle made: its end of the pair to the proxy and what may move."""

    def __init__(self, relay: "Relay", sid: int, sock: socket.socket) -> None:
        self.relay = relay
        self.sid = sid
        self.sock = sock
        self.up: asyncio.Queue[bytes | None] = asyncio.Queue()  # from the guest; at most WINDOW bytes in it
        self.queued = 0  # bytes in ``up``
        self.credit = WINDOW  # bytes the guest will still take
        self.more = asyncio.Event()
        self.ended = False
        self.tasks = [asyncio.ensure_future(self._up()), asyncio.ensure_future(self._down())]

    async def _up(self) -> None:
        """The bundle's bytes, to the proxy; each chunk acknowledged once the proxy has it."""
        loop = asyncio.get_running_loop()
        try:
            while (data := await self.up.get()) is not None:
                self.queued -= len(data)
                await loop.sock_sendall(self.sock, data)
                self.relay.send(b"W", CREDIT.pack(self.sid, len(data)))
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.reset(tell=True)

    async def _down(self) -> None:
        """What the proxy brings back, to the guest, never past the guest's window."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self.credit <= 0:
                    self.more.clear()
                    await self.more.wait()
                data = await loop.sock_recv(self.sock, min(self.credit, 65536))
                if not data:
                    self.relay.send(b"F", ID.pack(self.sid))
                    return
                self.credit -= len(data)
                self.relay.send(b"D", ID.pack(self.sid) + data)
        except OSError:
            self.reset(tell=True)

    def frame(self, kind: bytes, payload: bytes) -> None:
        if kind == b"D":
            if self.queued + len(payload) > WINDOW:
                return self.reset(tell=True)  # past its window: a broken guest
            self.queued += len(payload)
            self.up.put_nowait(payload)
        elif kind == b"F":
            self.up.put_nowait(None)
        elif kind == b"W" and len(payload) >= 4:
            self.credit += struct.unpack_from(">I", payload)[0]
            self.more.set()
        elif kind == b"R":
            self.reset(tell=False)

    def reset(self, tell: bool) -> None:
        if self.ended:
            return
        self.ended = True
        if tell:
            self.relay.send(b"R", ID.pack(self.sid))
        self.relay.streams.pop(self.sid, None)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Relay:
    """One VM's network: its streams and queries, to ``egress``; frames back through ``send``."""

    def __init__(self, egress: Egress, writer: asyncio.StreamWriter) -> None:
        self.egress = egress
        self.writer = writer
        self.streams: dict[int, Stream] = {}
        self.queries: set[asyncio.Task] = set()

    def send(self, kind: bytes, payload: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(HEADER.pack(kind, len(payload)) + payload)

    def frame(self, kind: bytes, payload: bytes) -> None:
        """A guest -> host frame of one of ``KINDS``."""
        if len(payload) < ID.size:
            return
        sid = ID.unpack_from(payload)[0]
        rest = payload[ID.size:]
        if kind == b"T":
            self._open(sid, rest)
        elif kind == b"Q":
            if len(self.queries) < MAX_QUERIES:
                task = asyncio.ensure_future(self._answer(sid, rest))
                self.queries.add(task)
                task.add_done_callback(self.queries.discard)
        elif (stream := self.streams.get(sid)) is not None:
            stream.frame(kind, rest)

    def _open(self, sid: int, rest: bytes) -> None:
        try:
            port = struct.unpack_from(">H", rest)[0]
            address = ipaddress.ip_address(rest[2:].decode("ascii"))
        except (struct.error, ValueError, UnicodeDecodeError):
            return self.send(b"R", ID.pack(sid))
        if sid in self.streams or len(self.streams) >= MAX_LINKS:
            return self.send(b"R", ID.pack(sid))
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        stream = self.streams[sid] = Stream(self, sid, mine)
        loop = asyncio.get_running_loop()
        # A refusal is a reset for the bundle, as under the other backends (a Unix socket pair's
        # end cannot say so by itself).
        self.egress.relay(theirs, address, port, refused=lambda: loop.call_soon_threadsafe(stream.reset, True))

    async def _answer(self, qid: int, query: bytes) -> None:
        answer = await self.egress.answer(query)
        if answer is not None:
            self.send(b"A", ID.pack(qid) + answer)

    async def close(self) -> None:
        for stream in list(self.streams.values()):
            stream.reset(tell=False)
        for task in list(self.queries):
            task.cancel()
        await self.egress.close()


__all__ = ["KINDS", "Relay"]
