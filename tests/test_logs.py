"""What bundles print (issue 17): kept per run, read by the bundle's author and the invoker with
service auth (dev.atrun.getLogs), refused to everyone else, and never shown to anonymous HTTP
callers. Real local PDS and PLC, a real runner with its gateway, real workers."""

import asyncio
import json
import os
import sys

import aiohttp
import pytest
from conftest import _author_env, atrund, wait_result
from test_resilience import chattr, immutable_ok  # noqa: F401 - a fixture, used by name

from atrund import client
from atrund.config import LogsSection
from atrund.errors import CallFailed, StoreError
from atrund.logbook import LogBook
from atrund.state import State

BUNDLE = '''
import sys

def main(args):
    print("counting", args.get("n"))
    print("to stderr too", file=sys.stderr)
    return {"n": args.get("n")}

def quiet(args):
    return 1

def boom(args):
    print("about to fail: the secret plan")
    raise ValueError("the bundle's own words")

def handleRequest(request):
    print("serving", request["path"])
    if request["path"] == "/fail":
        raise RuntimeError("private detail")
    return {"status": 200, "headers": {}, "body": "ok"}
'''


async def test_a_record_invocations_output_is_for_its_author_and_invoker_only(login_author, author, make_runner, reader):
    other = await login_author("other")
    runner = await make_runner(access={"allowlist": [author.account.did, other.account.did]})
    bundle = await author.publish(BUNDLE)
    uri = await author.invoke(bundle, runner.did, "main", {"n": 7})
    assert (await wait_result(reader, runner.did, uri))["status"] == "success"

    out = await client.get_logs(author.session, reader, runner.did, id=uri)
    [entry] = out["logs"]
    assert entry["id"] == uri and entry["bundle"] == bundle["uri"] and entry["invoker"] == author.account.did
    assert entry["kind"] == "record" and entry["status"] == "success"
    # stdout and stderr, in the order printed, and nothing of the protocol
    assert entry["output"] == "counting 7\nto stderr too"

    with pytest.raises(CallFailed, match="HTTP 403 Forbidden: the logs of .* are for the bundle's author and the invoker"):
        await client.get_logs(other.session, reader, runner.did, id=uri)

    # A run that succeeded and printed nothing leaves no entry.
    quiet = await author.invoke(bundle, runner.did, "quiet")
    await wait_result(reader, runner.did, quiet)
    assert (await client.get_logs(author.session, reader, runner.did, id=quiet))["logs"] == []


async def test_an_invoker_reads_their_run_of_someone_elses_bundle(login_author, author, make_runner, reader):
    """The invoker may read their own run's entry; only the bundle's author may list the bundle's."""
    caller = await login_author("caller")
    runner = await make_runner(access={"allowlist": [author.account.did, caller.account.did]})
    bundle = await author.publish(BUNDLE)
    answer = await client.call(caller.session, reader, bundle["uri"], runner.did, "boom", {})
    assert answer["status"] == "error" and answer["requestId"]

    [entry] = (await client.get_logs(caller.session, reader, runner.did, id=answer["requestId"]))["logs"]
    assert entry["kind"] == "xrpc" and entry["invoker"] == caller.account.did and entry["status"] == "error"
    assert entry["output"] == "about to fail: the secret plan" and "the bundle's own words" in entry["error"]

    mine = (await client.get_logs(author.session, reader, runner.did, bundle=bundle["uri"]))["logs"]
    assert [e["id"] for e in mine] == [answer["requestId"]]
    with pytest.raises(CallFailed, match="HTTP 403 Forbidden: only the author of"):
        await client.get_logs(caller.session, reader, runner.did, bundle=bundle["uri"])


async def test_a_gateway_failure_gives_anonymous_callers_only_an_id(login_author, author, make_runner, reader):
    other = await login_author("other")
    runner = await make_runner(access={"allowlist": [author.account.did, other.account.did]})
    bundle = await author.publish(BUNDLE)
    rkey = bundle["uri"].rsplit("/", 1)[1]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{runner.app.gateway.url}/{author.account.did}/{rkey}/fail") as r:
            status, text, header = r.status, await r.text(), r.headers.get("Atrun-Request-Id")
        async with http.get(f"{runner.app.gateway.url}/{author.account.did}/{rkey}/fine") as r:
            assert r.status == 200 and r.headers.get("Atrun-Request-Id")  # it printed: there is an entry
    body = json.loads(text)
    assert status == 502 and body["error"] == "BundleFailed" and body["requestId"] == header
    assert "private detail" not in text and "serving" not in text  # the bundle's words stay with its author

    [entry] = (await client.get_logs(author.session, reader, runner.did, id=header))["logs"]
    assert entry["kind"] == "http" and "invoker" not in entry and entry["status"] == "error"
    assert entry["output"] == "serving /fail" and "private detail" in entry["error"]
    with pytest.raises(CallFailed, match="HTTP 403"):
        await client.get_logs(other.session, reader, runner.did, id=header)


async def test_logs_and_tail_commands(stack, author, make_runner, reader):
    """`atrund logs URI` reads the runner from the invocation record; `atrund tail` shows the
    newest entries, then new ones as their runs end."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    env = _author_env(stack, author.account)
    bundle = await author.publish(BUNDLE)
    uri = await author.invoke(bundle, runner.did, "boom")
    await wait_result(reader, runner.did, uri)

    p = await asyncio.to_thread(atrund, "logs", uri, env=env)
    assert p.returncode == 0, p.stderr
    [entry] = json.loads(p.stdout)["logs"]  # JSON: stdout is not a terminal here
    assert entry["id"] == uri and entry["status"] == "error" and entry["output"] == "about to fail: the secret plan"
    assert entry["error"].startswith("ValueError: the bundle's own words")

    p = await asyncio.to_thread(atrund, "logs", "3kabcdefghi2c", env=env)
    assert p.returncode == 2 and "give --runner" in p.stderr

    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "atrund.cli", "tail", bundle["uri"], "--runner", runner.account.handle, "--count", "2",
        "--interval", "0.3", env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        second = await author.invoke(bundle, runner.did, "main", {"n": 2})
        out, errs = await asyncio.wait_for(tail.communicate(), 60)
    finally:
        if tail.returncode is None:
            tail.kill()
    assert tail.returncode == 0, errs
    entries = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["id"] for e in entries] == [uri, second]  # the newest one there was, then the new run
    assert entries[1]["output"] == "counting 2\nto stderr too"


@pytest.mark.usefixtures("immutable_ok")
def test_entries_wait_while_the_store_fails_and_are_kept_once_it_answers(tmp_path):
    """The state store's files made unwritable (chattr +i): a flush fails with StoreError and
    keeps what it held; what comes meanwhile is held too; once writable, one flush keeps all."""
    state = State(tmp_path / "state" / "atrund.sqlite3")
    files = [p for p in (tmp_path / "state").iterdir() if p.name.startswith("atrund.sqlite3")]
    bundle = "at://did:plc:a/dev.atrun.bundle/b"
    try:
        book = LogBook(state, LogsSection())
        book.note("before", bundle, None, "http", "error", "boom", "out 1")
        chattr("+i", *files)
        try:
            with pytest.raises(StoreError):
                book.flush()
            book.note("during", bundle, None, "http", "error", "boom", "out 2")
        finally:
            chattr("-i", *files)
        book.flush()
        assert [(e.id, e.output) for e in state.logs(bundle=bundle)] == [("before", "out 1"), ("during", "out 2")]
        assert book.dropped == 0
    finally:
        state.close()


def test_the_logbook_keeps_within_retention_and_max_entries(tmp_path):
    """Past max_entries the oldest go; past retention_hours every entry goes (a real SQLite store)."""
    state = State(tmp_path / "state.sqlite")
    try:
        book = LogBook(state, LogsSection(max_entries=3))
        bundle = "at://did:plc:a/dev.atrun.bundle/b"
        for i in range(5):
            assert book.note(f"req{i}", bundle, None, "http", "error", "boom", f"out {i}")
        assert not book.note("quiet", bundle, None, "http", "success")  # nothing to see: nothing kept
        book.flush()
        assert [e.id for e in state.logs(bundle=bundle)] == ["req2", "req3", "req4"]
        assert [e.id for e in state.logs(bundle=bundle, after=state.logs(bundle=bundle)[0].seq)] == ["req3", "req4"]
        assert state.forget_logs(before=float("inf"), keep=10) == 3 and state.logs(bundle=bundle) == []
    finally:
        state.close()


async def test_get_logs_refuses_bad_queries_naming_what_is_wrong(author, make_runner):
    """Each malformed dev.atrun.getLogs query is a 400 naming the parameter (a token is spent on
    each: they are single-use); no token is a 401; the runner goes on answering good ones."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    bundle = await author.publish(BUNDLE)
    url = f"{runner.app.gateway.url}/xrpc/dev.atrun.getLogs"

    async def get(params: dict, token: bool = True) -> tuple[int, dict]:
        headers = {}
        if token:
            jwt = (await author.session.client.com.atproto.server.get_service_auth(
                {"aud": runner.did, "lxm": "dev.atrun.getLogs"})).token
            headers["Authorization"] = f"Bearer {jwt}"
        async with aiohttp.ClientSession() as http:
            async with http.get(url, params=params, headers=headers) as r:
                return r.status, await r.json()

    for params, says in [({}, "exactly one of id"), ({"id": "x", "bundle": bundle["uri"]}, "exactly one of id"),
                         ({"bundle": bundle["uri"], "cursor": "later"}, "cursor and limit must be integers"),
                         ({"bundle": bundle["uri"].replace("dev.atrun.bundle", "app.bsky.feed.post")}, "is not a dev.atrun.bundle"),
                         ({"bundle": "not-a-uri"}, "bundle: ")]:
        status, body = await get(params)
        assert (status, body["error"]) == (400, "InvalidRequest") and says in body["message"], (params, body)
    status, body = await get({"bundle": bundle["uri"]}, token=False)
    assert (status, body["error"]) == (401, "AuthRequired")
    status, body = await get({"bundle": bundle["uri"]})
    assert status == 200 and body == {"logs": [], "cursor": "0"}
