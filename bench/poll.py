"""Poll ingest throughput: how fast a poller takes a backlog of new invocations from one author.

    .venv/bin/python bench/poll.py              # 2,000 invocations, 3 rounds
    .venv/bin/python bench/poll.py -n 500 --rounds 5

Method
------
1. Start a LocalStack, create an author, and post N invocation records addressed to a runner DID
   (applyWrites, 200 creates a commit).
2. Each round: a fresh state store, then one real ``Poller`` (real ``Intake``, ``Repos``)
   polls the author until nothing new is listed. Timed: list pages, the per-record proofs
   (``com.atproto.sync.getRecord`` and its check against the author's signed commit, since
   issue 15), and the SQLite writes; nothing runs. Reported: invocations taken per second.
3. One more poll over the now-known backlog (a reconciliation from the start): what a round
   costs when nothing is new (no proofs: stored records are recognised by URI).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from atrund import client
from atrund.access import AccessPolicy
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.atproto.session import Session
from atrund.dev.stack import LocalStack
from atrund.ingest import Intake
from atrund.ingest.poll import Poller
from atrund.records import INVOCATION
from atrund.state import State

RUNNER = "did:plc:benchpollrunner000000000"
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"  # the bundle the invocations name (never fetched)


async def main(opts) -> int:
    with tempfile.TemporaryDirectory(prefix="atrund-poll-") as tmp_name:
        tmp = Path(tmp_name)
        with LocalStack(data_dir=tmp / "stack") as stack:  # noqa: SIM117 (the stack lives in tmp)
            author = stack.create_account("author")
            session = await Session.login(stack.pds_url, author.handle, author.app_password)
            bundle = {"uri": f"at://{author.did}/dev.atrun.bundle/x", "cid": CID}
            for first in range(0, opts.n, 200):
                await session.client.com.atproto.repo.apply_writes({"repo": author.did, "writes": [
                    {"$type": "com.atproto.repo.applyWrites#create", "collection": INVOCATION,
                     "value": {"$type": INVOCATION, **client.invocation_record(RUNNER, bundle, "main", {"i": i})}}
                    for i in range(first, min(opts.n, first + 200))]})
            await session.close()
            print(f"posted {opts.n} invocations", file=sys.stderr)

            rates, idle = [], []
            for r in range(opts.rounds):
                repos = Repos(Identities(stack.plc_url, allow_private_addresses=True))  # the stack is on loopback
                state = State(tmp / f"state{r}" / "atrund.db")
                intake = Intake(state, RUNNER, AccessPolicy("allowlist", frozenset({author.did}), frozenset()), lambda uri: None)
                poller = Poller(repos, intake, [author.did], interval=60)
                await repos.identities.pds(author.did)  # the DID document cached, as in a running poller
                t0 = time.perf_counter()
                taken = 0
                while (found := await poller.poll_author(author.did)) > 0:
                    taken += found
                rates.append(taken / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                await poller.poll_author(author.did, reconcile=True)
                idle.append(time.perf_counter() - t0)
                assert taken == opts.n, (taken, opts.n)
                state.close()
                await repos.close()
            print(f"poll: {statistics.median(rates):.0f} new invocations/s (median of {opts.rounds}: "
                  f"{', '.join(f'{x:.0f}' for x in rates)}); a reconciliation over {opts.n} known ones: "
                  f"{statistics.median(idle) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="invocations in the backlog")
    parser.add_argument("--rounds", type=int, default=3)
    sys.exit(asyncio.run(main(parser.parse_args())))
