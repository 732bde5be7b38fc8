"""Bundles' durable state end to end (issue 18), against the real local PDS and a real runner:
a run's writes commit with its result (State.finish), a gateway run's in a transaction of their
own before it is answered; a run that fails, times out, crashes or passes a quota commits
nothing; concurrent runs of one namespace are serialised; state survives a restart.

The protocol and the runtimes' ctx.state are tested in tests/execute/test_state.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest
from conftest import _author_env, atrund, serve_config, serve_subprocess, wait_result

from atrund import client
from atrund.atproto.uri import AtUri
from atrund.errors import CallFailed
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

def set_then_mark(args, ctx):
    ctx.state.set("n", -1)
    open(args["mark"], "w").write("running")
    time.sleep(600)

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


async def test_the_author_reads_their_bundles_state_and_no_one_else_does(login_author, make_runner, reader, stack):
    author, other = await login_author("author"), await login_author("other")
    runner = await make_runner(access={"allowlist": [author.account.did, other.account.did]})
    bundle = await author.publish(COUNTER)
    await wait_result(reader, runner.did, await author.invoke(bundle, runner.did, "count"))
    out = await client.get_state(author.session, reader, bundle["uri"], runner.did, key="n")
    assert out["entries"] == [{"key": "n", "value": 1}] and "cursor" not in out
    assert (await client.get_state(author.session, reader, bundle["uri"], runner.did, key="absent"))["entries"] == []
    with pytest.raises(CallFailed, match="HTTP 403 Forbidden: only the bundle's author"):
        await client.get_state(other.session, reader, bundle["uri"], runner.did)
    rkey = AtUri.parse(bundle["uri"]).rkey
    cli = await asyncio.to_thread(atrund, "state", "get", "--runner", runner.did, "--bundle", rkey, "n",
                                  env=_author_env(stack, author.account))
    assert cli.returncode == 0 and json.loads(cli.stdout) == 1, cli.stderr
    cli = await asyncio.to_thread(atrund, "state", "get", "--runner", runner.did, "--bundle", rkey,
                                  env=_author_env(stack, other.account))
    assert cli.returncode == 0 and json.loads(cli.stdout) == {}  # the CLI asks for the caller's own namespace: empty


async def test_a_runner_killed_mid_run_commits_nothing_and_operators_read_the_store(author, new_account, stack, reader, tmp_path):
    account = new_account("runner")
    config = serve_config(tmp_path, stack, account, author)
    log = tmp_path / "serve.log"
    bundle = await author.publish(COUNTER)
    rkey = AtUri.parse(bundle["uri"]).rkey
    proc = serve_subprocess(config, log)
    try:
        await wait_result(reader, account.did, await author.invoke(bundle, account.did, "count"))
        mark = tmp_path / "mark"
        uri = await author.invoke(bundle, account.did, "set_then_mark", {"mark": str(mark)}, timeout=120)
        deadline = time.monotonic() + 30
        while not mark.exists():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            await asyncio.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        proc = serve_subprocess(config, log)
        result = await wait_result(reader, account.did, uri)
        assert result["status"] == "error" and result["error"].startswith("interrupted")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    ns = ["--author", author.account.did, "--bundle", rkey]
    got = await asyncio.to_thread(atrund, "state", "get", "-c", str(config), *ns, "n")
    assert got.returncode == 0 and json.loads(got.stdout) == 1, got.stderr  # the killed run's -1 never landed
    listed = await asyncio.to_thread(atrund, "state", "list", "-c", str(config), *ns)
    assert listed.stdout.split() == ["n"]
    exported = await asyncio.to_thread(atrund, "state", "export", "-c", str(config), *ns)
    assert json.loads(exported.stdout) == {"n": 1}
    deleted = await asyncio.to_thread(atrund, "state", "delete", "-c", str(config), *ns, "n")
    assert deleted.returncode == 0 and "deleted 1 key(s)" in deleted.stderr
    gone = await asyncio.to_thread(atrund, "state", "get", "-c", str(config), *ns, "n")
    assert gone.returncode == 3 and "no key 'n'" in gone.stderr


async def test_operators_are_told_why_a_running_runners_store_is_closed(author, make_runner, tmp_path):
    runner = await make_runner(access={"allowlist": [author.account.did]})
    config = tmp_path / "config.toml"
    config.write_text(f'[runner]\npds = "http://x.invalid"\nidentifier = "r.test"\n[state]\ndir = "{runner.cfg.state.dir}"\n')
    out = await asyncio.to_thread(atrund, "state", "list", "-c", str(config), "--author", author.account.did, "--bundle", "x")
    assert out.returncode == 14 and "in use by a running runner" in out.stderr and "Traceback" not in out.stderr
