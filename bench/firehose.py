"""Firehose ingest throughput, from frames recorded off the real local PDS.

    .venv/bin/python bench/firehose.py                    # 3000 noise writes, 1000 invocations, 200k frames
    .venv/bin/python bench/firehose.py --noise 500 --invocations 300 --frames 50000

Method
------
1. Start a LocalStack (reference PDS + PLC) with a runner account, an author and ``--accounts``
   other accounts. Write a mix the way a relay would carry it: ``--noise`` records of other
   collections (posts, likes, follows) from everyone, the author included, and ``--invocations``
   dev.atrun.invocation records, 90% addressed to our runner and 10% to another runner.
   Then record every frame of the PDS's subscribeRepos from cursor 0 (#identity, #account,
   #commit, #sync: whatever the PDS sends).
2. *Non-matching* stream: the recorded frames that touch no invocation, renumbered and repeated to
   ``--frames`` frames. *Matching* stream: the frames that create invocations, each once (an
   invocation is only new once). Both are fed to ``Firehose.ingest`` in batches of BATCH, as the
   processor task does: the real code path, with a real SQLite state (fsync on) and the author's
   real DID document (fetched once before timing), minus the socket. One core, one process.
3. The same frames through the SDK's path, as an SDK user filtering for our collection would
   do it: ``MessageFrame.from_bytes`` + ``parse_subscribe_repos_message`` per frame.
4. The matching stream once more with the frames' blocks removed, so each invocation is proven by
   fetching it from the author's PDS (sync.getRecord, hashed) instead of from the frame.
5. With ``--triggers`` live dev.atrun.trigger records (default 100, spread over
   ``--trigger-collections`` distinct collections, default 64: the [triggers] max_collections
   default, so the worst case the defaults allow), none of them a collection of the stream, the
   non-matching stream again: what following collections for triggers costs the frames that
   match none (each op path's collection is read from the frame's bytes and looked up).
6. Socket end to end: a websockets server on loopback sends the non-matching stream; the time
   until our ``Firehose.run()`` has processed every frame, versus the SDK's
   ``AsyncFirehoseSubscribeReposClient`` with a handler that parses each message.

Prints frames/s for each, and the ratios; targets: >= 50,000 non-matching frames/s, >= 5,000
matching invocations/s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import libipld
import websockets
from atproto_firehose import AsyncFirehoseSubscribeReposClient, parse_subscribe_repos_message
from atproto_subscription.frames import MessageFrame

from atrund.access import AccessPolicy
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.atproto.session import Session
from atrund.client import invoke, trigger_record
from atrund.config import TriggersSection
from atrund.dev.stack import LocalStack
from atrund.ingest import Intake
from atrund.ingest.firehose import BATCH, NEEDLE, Firehose
from atrund.records import now_iso
from atrund.state import State
from atrund.triggers import Triggers

COLLECTIONS = ["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow"]


def noise_record(collection: str, i: int, dids: list[str]) -> dict:
    if collection == "app.bsky.feed.post":
        return {"$type": collection, "text": f"post number {i} " + "lorem ipsum " * random.randint(0, 20), "createdAt": now_iso()}
    subject = {"uri": f"at://{random.choice(dids)}/app.bsky.feed.post/3l{i:011d}",
               "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}
    if collection == "app.bsky.feed.like":
        return {"$type": collection, "subject": subject, "createdAt": now_iso()}
    return {"$type": collection, "subject": random.choice(dids), "createdAt": now_iso()}


async def write_mix(stack: LocalStack, opts) -> tuple[str, str, list[bytes]]:
    """Create the accounts and the records; return (runner DID, author DID, recorded frames)."""
    runner, other_runner = stack.create_account("runner"), stack.create_account("elsewhere")
    author = stack.create_account("author")
    others = [stack.create_account(f"user{i}") for i in range(opts.accounts)]
    dids = [a.did for a in others] + [author.did]
    sessions = [await Session.login(stack.pds_url, a.handle, a.app_password) for a in [*others, author]]
    mine = sessions[-1]
    bundle = {"uri": f"at://{author.did}/dev.atrun.bundle/3l00000000000",
              "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}
    jobs = [("noise", i) for i in range(opts.noise)] + [("invocation", i) for i in range(opts.invocations)]
    random.shuffle(jobs)
    todo = iter(jobs)
    t0 = time.monotonic()

    async def writer() -> None:
        for kind, i in todo:
            if kind == "noise":
                collection = random.choice(COLLECTIONS)
                await random.choice(sessions).create_record(collection, noise_record(collection, i, dids))
            else:
                target = runner.did if i % 10 else other_runner.did
                await invoke(mine, None, bundle["uri"], target, "main", {"i": i}, cid=bundle["cid"])

    await asyncio.gather(*(writer() for _ in range(8)))
    print(f"  wrote {len(jobs)} records in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    for s in sessions:
        await s.close()
    frames: list[bytes] = []
    url = stack.pds_url.replace("http", "ws", 1) + "/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
    async with websockets.connect(url, max_size=None) as ws:
        try:
            while True:
                frames.append(await asyncio.wait_for(ws.recv(), 2.0))
        except TimeoutError:
            pass
    return runner.did, author.did, frames


def renumber(frames: list[bytes], count: int) -> list[bytes]:
    """``count`` frames cycling through ``frames``, with seq 1, 2, ... (a stream that never repeats)."""
    out = []
    for seq in range(1, count + 1):
        header, body = libipld.decode_dag_cbor_multi(frames[(seq - 1) % len(frames)])[:2]
        body["seq"] = seq
        out.append(libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body))
    return out


def strip_blocks(frame: bytes) -> bytes:
    header, body = libipld.decode_dag_cbor_multi(frame)[:2]
    body["blocks"] = b""
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


class Harness:
    """A Firehose over a fresh state, serving the author; the author's signing key pre-fetched."""

    def __init__(self, stack: LocalStack, runner_did: str, author_did: str, directory: Path, url: str = "ws://unused",
                 triggers: int = 0, collections: int = 1) -> None:
        self.repos = Repos(Identities(stack.plc_url, allow_private_addresses=True))
        self.state = State(Path(tempfile.mkdtemp(dir=directory)) / "atrund.sqlite3")
        self.queued: list[str] = []
        policy = AccessPolicy("allowlist", frozenset({author_did}), frozenset())
        watch = None
        if triggers:
            watch = Triggers(self.state, self.repos, policy, runner_did, self.queued.append,
                             TriggersSection(max_per_author=triggers, max_collections=max(collections, 1)))
            bundle = {"uri": f"at://{author_did}/dev.atrun.bundle/3l00000000000",
                      "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}
            listed = [(f"at://{author_did}/dev.atrun.trigger/3l{i:011d}", bundle["cid"],
                       trigger_record(runner_did, bundle, "main", [f"com.example.bench{i % collections}.thing"], subject="self"))
                      for i in range(triggers)]
            watch.apply(*watch.standings.update(author_did, listed))
            assert len(watch.live) == triggers and len(watch.followed) == collections, (len(watch.live), len(watch.followed))
        self.triggers = watch
        self.firehose = Firehose(url, self.repos, Intake(self.state, runner_did, policy, self.queued.append), watch,
                                 (lambda did: None) if triggers else None)
        self.author_did = author_did

    async def __aenter__(self) -> "Harness":
        await self.firehose._key(self.author_did)
        await self.repos.identities.pds(self.author_did)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.repos.close()
        self.state.close()

    async def feed(self, frames: list[bytes]) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(frames), BATCH):
            await self.firehose.ingest(frames[i:i + BATCH])
        return time.perf_counter() - t0


def sdk_parse(frames: list[bytes]) -> float:
    t0 = time.perf_counter()
    for raw in frames:
        message = parse_subscribe_repos_message(MessageFrame.from_bytes(raw))
        for op in getattr(message, "ops", None) or []:
            op.path.startswith("dev.atrun.invocation/")
    return time.perf_counter() - t0


async def over_socket(frames: list[bytes], ours: Harness | None) -> float:
    """Seconds from connect until every frame is processed (ours) or parsed (the SDK's client)."""
    done = asyncio.Event()

    async def serve(ws) -> None:
        for f in frames:
            await ws.send(f)
        await ws.wait_closed()

    async with websockets.serve(serve, "127.0.0.1", 0, compression=None, max_size=None) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        t0 = time.perf_counter()
        if ours is not None:
            ours.firehose.url = url
            task = asyncio.create_task(ours.firehose.run())
            while ours.firehose.counters.frames < len(frames):
                await asyncio.sleep(0.005)
        else:
            seen = 0
            client = AsyncFirehoseSubscribeReposClient(base_uri=url + "/xrpc")

            async def on_message(message) -> None:
                nonlocal seen
                parsed = parse_subscribe_repos_message(message)
                for op in getattr(parsed, "ops", None) or []:
                    op.path.startswith("dev.atrun.invocation/")
                seen += 1
                if seen == len(frames):
                    done.set()

            task = asyncio.create_task(client.start(on_message))
            await done.wait()
        elapsed = time.perf_counter() - t0
        if ours is None:
            await client.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return elapsed


async def main(opts) -> int:
    with tempfile.TemporaryDirectory(prefix="atrund-bench-") as tmp, LocalStack(Path(tmp) / "stack") as stack:
        print(f"firehose bench: writing {opts.noise} noise records from {opts.accounts + 1} accounts and "
              f"{opts.invocations} invocations on the local PDS, then recording its firehose", file=sys.stderr)
        runner_did, author_did, frames = await write_mix(stack, opts)
        kinds: dict[str, int] = {}
        for f in frames:
            kind = libipld.decode_dag_cbor_multi(f)[0].get("t")
            kinds[kind] = kinds.get(kind, 0) + 1
        matching = [f for f in frames if NEEDLE in f]
        other = [f for f in frames if NEEDLE not in f]
        print(f"  recorded {len(frames)} frames ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
              f"{len(matching)} touch invocations; mean frame {sum(map(len, frames)) / len(frames):.0f} bytes", file=sys.stderr)
        stream = renumber(other, opts.frames)
        wanted = renumber(matching, len(matching))

        async with Harness(stack, runner_did, author_did, Path(tmp)) as h:
            t_non = await h.feed(stream)
            fast = h.firehose.counters.skipped_fast
        async with Harness(stack, runner_did, author_did, Path(tmp), triggers=opts.triggers,
                           collections=opts.trigger_collections) as h:
            t_trig = await h.feed(stream)
            fast_trig = h.firehose.counters.skipped_fast
        async with Harness(stack, runner_did, author_did, Path(tmp)) as h:
            t_match = await h.feed(wanted)
            proven, queued = h.firehose.counters.proven, len(h.queued)
        async with Harness(stack, runner_did, author_did, Path(tmp)) as h:
            t_fetch = await h.feed([strip_blocks(f) for f in wanted])
            fetched = h.firehose.counters.fetched
        t_sdk_non = sdk_parse(stream)
        t_sdk_match = sdk_parse(wanted)
        async with Harness(stack, runner_did, author_did, Path(tmp)) as h:
            t_sock = await over_socket(stream, h)
        t_sock_sdk = await over_socket(stream, None)

        n, m = len(stream), len(wanted)
        print()
        print(f"atrund firehose ingest bench: {n} non-matching frames, {m} matching frames "
              f"({proven} invocations proven, {queued} queued for this runner), batch {BATCH}, one core")
        print(f"  non-matching, Firehose.ingest:         {n / t_non:>10,.0f} frames/s  ({t_non / n * 1e6:.2f} us/frame; "
              f"{fast} of {n} never decoded)")
        print(f"  non-matching, {opts.triggers} live triggers on {opts.trigger_collections} collections: "
              f"{n / t_trig:>8,.0f} frames/s  ({t_trig / n * 1e6:.2f} us/frame; {fast_trig} of {n} never decoded)")
        print(f"  non-matching, SDK parse per frame:     {n / t_sdk_non:>10,.0f} frames/s  -> ours is {t_sdk_non / t_non:.1f}x")
        print(f"  matching, proven from the frame:       {proven / t_match:>10,.0f} invocations/s  ({t_match / proven * 1e6:.0f} us each, "
              "signature + MST + hashes + SQLite)")
        print(f"  matching, SDK parse only (no proof):   {m / t_sdk_match:>10,.0f} frames/s")
        print(f"  matching, fetched from the PDS:        {fetched / t_fetch:>10,.0f} invocations/s  ({fetched} fetched) "
              f"-> the local proof is {t_fetch / t_match:.1f}x faster")
        print(f"  socket end to end, ours:               {n / t_sock:>10,.0f} frames/s")
        print(f"  socket end to end, SDK client+parse:   {n / t_sock_sdk:>10,.0f} frames/s  -> ours is {t_sock_sdk / t_sock:.1f}x")
        ok = n / t_non >= 50_000 and n / t_trig >= 50_000 and proven / t_match >= 5_000
        print(f"  targets (>= 50,000 non-matching frames/s, with and without triggers; >= 5,000 matching invocations/s): "
              f"{'met' if ok else 'NOT met'}")
        return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/firehose.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--noise", type=int, default=3000, help="records of other collections to write")
    p.add_argument("--invocations", type=int, default=1000, help="invocation records to write")
    p.add_argument("--accounts", type=int, default=8, help="accounts besides the author writing noise")
    p.add_argument("--frames", type=int, default=200_000, help="non-matching frames to feed")
    p.add_argument("--triggers", type=int, default=100, help="live triggers while the non-matching stream is fed again")
    p.add_argument("--trigger-collections", type=int, default=64, help="distinct collections those triggers follow")
    sys.exit(asyncio.run(main(p.parse_args())))
