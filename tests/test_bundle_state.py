"""Bundles' durable state end to end (issue 18), against the real local PDS and a real runner:
a run's writes commit with its result (State.finish), a gateway run's in a transaction of their
own before it is answered; a run that fails, times out, crashes or passes a quota commits
nothing; concurrent runs of one namespace are serialised; state survives a restart.

The protocol and the runtimes' ctx.state are tested in tests/execute/test_state.py.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from conftest import wait_result

from atrund.atproto.uri import AtUri
from atrund.records import decode_data

COUNTER = '''
import os, time

def count(args, ctx):
    n = (ctx.state.get("n") or 0) + 1
    ctx.state.set("n", n)
    return n

def set_then_sleep(args, ctx):
    ctx.state.set("n", -1)
    time.sleep(600)

def set_then_crash(args, ctx):
    ctx.state.set("n", -1)
    os._exit(3)

def set_then_fail(args, ctx):
    ctx.state.set("n", -1)
    raise ValueError("no")

def swallow_quota(args, ctx):
    ctx.state.set("n", -1)
    try:
        ctx.state.set("big", "x" * 5000)
    except Exception:
        pass
    return "I ignored the error"

def handleRequest(request, ctx):
    n = ctx.state.get("n") or 0
    time.sleep(0.005)  # a lost update would need this window
    ctx.state.set("n", n + 1)
    return {"status": 200, "body": str(n + 1)}
'''

LIMITS = {"per_author_per_minute": 6000, "per_author_burst": 200}


def state_of(runner, bundle: dict[str, str]) -> dict[str, str]:
    at = AtUri.parse(bundle["uri"])
    return dict(runner.app.state.state_keys(at.did, at.rkey))


async def test_invocations_count_exactly_and_failures_commit_nothing(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]}, limits=LIMITS,
                               bundle_state={"max_value_bytes": 1000})
    bundle = await author.publish(COUNTER)
    uris = [await author.invoke(bundle, runner.did, "count") for _ in range(20)]
    results = [await wait_result(reader, runner.did, uri) for uri in uris]
    assert sorted(decode_data(r["data"]) for r in results) == list(range(1, 21))
    assert state_of(runner, bundle) == {"n": "20"}
    for endpoint, status, error in [("set_then_sleep", "timeout", "timed out"), ("set_then_crash", "error", "exited with code 3"),
                                    ("set_then_fail", "error", "ValueError"),
                                    ("swallow_quota", "error", "state quota exceeded: the value of 'big'")]:
        uri = await author.invoke(bundle, runner.did, endpoint, timeout=2)
        result = await wait_result(reader, runner.did, uri)
        assert result["status"] == status and error in result["error"], (endpoint, result)
        assert state_of(runner, bundle) == {"n": "20"}, endpoint


async def test_50_concurrent_gateway_increments_end_at_exactly_50(author, make_runner):
    runner = await make_runner(access={"allowlist": [author.account.did]}, executor={"concurrency": 8})
    bundle = await author.publish(COUNTER)
    url = f"{runner.app.gateway.url}/{author.account.did}/{AtUri.parse(bundle['uri']).rkey}/"
    async with aiohttp.ClientSession() as http:

        async def one() -> int:
            async with http.get(url) as resp:
                assert resp.status == 200, await resp.text()
                return int(await resp.text())

        seen = await asyncio.gather(*(one() for _ in range(50)))
    assert sorted(seen) == list(range(1, 51))  # each answer saw every earlier commit
    assert state_of(runner, bundle) == {"n": "50"}


async def test_state_survives_a_restart(author, make_runner, new_account, reader):
    account = new_account("runner")
    first = await make_runner(account=account, state_name="same", access={"allowlist": [author.account.did]})
    bundle = await author.publish(COUNTER)
    assert decode_data((await wait_result(reader, first.did, await author.invoke(bundle, first.did, "count")))["data"]) == 1
    await first.stop()
    second = await make_runner(account=account, state_name="same", access={"allowlist": [author.account.did]})
    assert decode_data((await wait_result(reader, second.did, await author.invoke(bundle, second.did, "count")))["data"]) == 2
    assert json.loads(state_of(second, bundle)["n"]) == 2
