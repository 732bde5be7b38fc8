"""An invocation record on the real local PDS comes back as a result record, for every outcome."""

import asyncio

from conftest import no_result, wait_result

from atrund.records import BUNDLE, RUNNER, Result, result_rkey

HELLO = '''
def main(args):
    print("bundle output must not break anything")
    return {"greeting": "hello " + args.get("name", "world")}

def boom(args):
    return 1 / 0

def forever(args):
    import time
    time.sleep(600)

def number(args):
    return 42
'''


async def test_success_lands_at_the_computed_uri_with_metrics(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]})
    bundle = await author.publish(HELLO)
    uri = await author.invoke(bundle, runner.did, "main", {"name": "ada"})
    value = await wait_result(reader, runner.did, uri)
    result = Result.model_validate(value)
    assert result.status == "success"
    assert result.data == {"greeting": "hello ada"}
    assert result.invocation.uri == uri and result.bundle.cid == bundle["cid"]
    m = result.metrics
    assert m.isolation == runner.app.executor.isolation == "process" and m.runtime == "python"  # auto picks it here
    assert m.execution_time_ms >= 0 and m.queued_ms >= 0 and m.total_ms >= m.execution_time_ms


async def test_runner_publishes_its_declaration(make_runner, reader):
    runner = await make_runner(access={"mode": "open"}, executor={"max_timeout": 60})
    _, value = await reader.get_record(runner.did, RUNNER, "self")
    assert "python" in value["runtimes"] and value["isolation"] == "process" and value["accessMode"] == "open"
    assert "monitor" not in value  # only a microvm runner names one
    assert value["limits"]["timeoutSeconds"] == 60


async def test_failures_each_end_in_an_explained_result(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]}, executor={"max_timeout": 2, "warm": 2})
    bundle = await author.publish(HELLO)
    cases = {
        "boom": await author.invoke(bundle, runner.did, "boom"),
        "forever": await author.invoke(bundle, runner.did, "forever", timeout=60),  # capped at 2 s
        "nope": await author.invoke(bundle, runner.did, "nope"),
        "number": await author.invoke(bundle, runner.did, "number"),
    }
    got = {name: await wait_result(reader, runner.did, uri) for name, uri in cases.items()}
    assert got["boom"]["status"] == "error" and got["boom"]["error"].startswith("ZeroDivisionError: division by zero")
    assert got["forever"]["status"] == "timeout" and got["forever"]["error"] == "timed out after 2 s"
    assert got["nope"]["status"] == "error" and "unknown endpoint 'nope'" in got["nope"]["error"]
    assert got["number"]["status"] == "success"
    assert Result.model_validate(got["number"]).value() == 42


async def test_missing_bundle(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]})
    bundle = await author.publish(HELLO)
    await author.session.delete_record(BUNDLE, bundle["uri"].rsplit("/", 1)[1])
    uri = await author.invoke(bundle, runner.did)
    value = await wait_result(reader, runner.did, uri)
    assert value["status"] == "error"
    assert "does not exist" in value["error"] and bundle["uri"].rsplit("/", 1)[1] in value["error"]


async def test_bundle_changed_after_pinning_is_refused_by_cid(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]})
    bundle = await author.publish(HELLO)
    blob = await author.session.upload_blob(b"def main(args):\n    return {'evil': True}\n", "text/x-python")
    rkey = bundle["uri"].rsplit("/", 1)[1]
    _, new_cid = await author.session.put_record(BUNDLE, rkey, {"runtime": "python", "code": blob, "createdAt": "2026-01-01T00:00:00.000Z"})
    uri = await author.invoke(bundle, runner.did)  # still pins the old CID
    value = await wait_result(reader, runner.did, uri)
    assert value["status"] == "rejected"
    assert "CID mismatch" in value["error"] and bundle["cid"] in value["error"] and new_cid in value["error"]
    assert "data" not in value


async def test_invalid_invocations_are_rejected_naming_the_field(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]})
    bundle = await author.publish(HELLO)
    base = {"runner": runner.did, "bundle": bundle, "endpoint": "main", "createdAt": "2026-01-01T00:00:00.000Z"}
    no_endpoint = await author.raw_invocation({k: v for k, v in base.items() if k != "endpoint"})
    bad_args = await author.raw_invocation({**base, "args": ["not", "an", "object"]})
    bad_ref = await author.raw_invocation({**base, "bundle": {"uri": "not-a-uri"}})
    bad_timeout = await author.raw_invocation({**base, "timeout": -5})
    r1 = await wait_result(reader, runner.did, no_endpoint)
    assert r1["status"] == "rejected" and "endpoint" in r1["error"] and "invalid invocation record" in r1["error"]
    r2 = await wait_result(reader, runner.did, bad_args)
    assert r2["status"] == "rejected" and "args" in r2["error"]
    r3 = await wait_result(reader, runner.did, bad_ref)
    assert r3["status"] == "rejected" and "bundle.uri" in r3["error"] and "bundle.cid" in r3["error"]
    assert r3["bundle"]["uri"] == bad_ref  # no readable bundle: the result names the invocation itself
    r4 = await wait_result(reader, runner.did, bad_timeout)
    assert r4["status"] == "rejected" and "timeout" in r4["error"]


async def test_undeclared_endpoint_and_oversized_bundle_are_rejected(author, make_runner, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]}, bundles={"max_bytes": 2000})
    declared = await author.publish(HELLO, endpoints=["main"])
    big = await author.publish("x = 1\n" * 1000 + "def main(args): return 1\n")
    r1 = await wait_result(reader, runner.did, await author.invoke(declared, runner.did, "boom"))
    assert r1["status"] == "rejected" and "not one the bundle declares (main)" in r1["error"]
    r2 = await wait_result(reader, runner.did, await author.invoke(big, runner.did))
    assert r2["status"] == "rejected" and "more than this runner's limit of 2000" in r2["error"]


async def test_allowlist_ignores_outsiders(login_author, author, make_runner, reader):
    outsider = await login_author("outsider")
    acct = outsider.account
    runner = await make_runner(access={"allowlist": [author.account.did]}, ingest={"authors": [author.account.did, acct.did]})
    bundle = await author.publish(HELLO)
    theirs = await outsider.invoke(bundle, runner.did)
    ours = await author.invoke(bundle, runner.did)
    assert (await wait_result(reader, runner.did, ours))["status"] == "success"
    assert await no_result(reader, runner.did, theirs)
    assert runner.app.intake.denied == 1
    assert runner.app.state.status_of(theirs) == ("denied", None)


async def test_blocklist_and_open_modes(login_author, author, make_runner, reader):
    blocked = await login_author("blocked")
    acct = blocked.account
    authors = [author.account.did, acct.did]
    bl = await make_runner(state_name="bl", access={"mode": "blocklist", "blocklist": [acct.did]}, ingest={"authors": authors})
    op = await make_runner(state_name="op", access={"mode": "open"}, ingest={"authors": authors})
    bundle = await author.publish(HELLO)
    invs = {(r.did, who): await a.invoke(bundle, r.did) for r in (bl, op) for who, a in (("ok", author), ("blocked", blocked))}
    assert (await wait_result(reader, bl.did, invs[(bl.did, "ok")]))["status"] == "success"
    assert (await wait_result(reader, op.did, invs[(op.did, "ok")]))["status"] == "success"
    assert (await wait_result(reader, op.did, invs[(op.did, "blocked")]))["status"] == "success"
    assert await no_result(reader, bl.did, invs[(bl.did, "blocked")])


async def test_invocations_for_another_runner_are_left_alone(author, make_runner, new_account, reader):
    runner = await make_runner(access={"allowlist": [author.account.did]})
    other = new_account("elsewhere")
    bundle = await author.publish(HELLO)
    uri = await author.invoke(bundle, other.did)
    mine = await author.invoke(bundle, runner.did)
    await wait_result(reader, runner.did, mine)
    assert runner.app.state.status_of(uri) is None
    assert await no_result(reader, runner.did, uri, settle=0.5)


async def test_restart_runs_nothing_twice(author, make_runner, new_account, reader, tmp_path, state_section):
    """Each run of the bundle appends a line to a file: the count is the number of executions
    (on each state backend)."""
    counter = tmp_path / "runs.txt"
    source = f"def main(args):\n    open({str(counter)!r}, 'a').write('run\\n')\n    return {{'ok': True}}\n"
    account = new_account("runner")
    # isolation none: the bundle counts its runs in a host file, which the process fence forbids.
    first = await make_runner(account=account, state_name="same", access={"allowlist": [author.account.did]}, executor={"isolation": "none"},
                              state=state_section)
    bundle = await author.publish(source)
    before = await author.invoke(bundle, first.did)
    await wait_result(reader, first.did, before)
    await first.stop()
    during = await author.invoke(bundle, account.did)  # posted while the runner is down
    second = await make_runner(account=account, state_name="same", access={"allowlist": [author.account.did]}, executor={"isolation": "none"},
                               state=state_section)
    assert (await wait_result(reader, second.did, during))["status"] == "success"
    await asyncio.sleep(1.0)  # a few more polls: nothing more may run
    assert counter.read_text().count("run") == 2


async def test_result_write_survives_an_unreachable_pds(stack, author, make_runner, reader, tmp_path):
    """Freeze the PDS (SIGSTOP) while the bundle runs: the result write times out, stays in the
    outbox, and lands once the PDS is back. Nothing is lost and the bundle ran once."""
    import os
    import signal

    marker = tmp_path / "ran"
    runner = await make_runner(access={"allowlist": [author.account.did]}, executor={"isolation": "none"})  # host marker file
    bundle = await author.publish(
        f"import time\ndef main(args):\n    open({str(marker)!r}, 'a').write('x')\n    time.sleep(1)\n    return {{'done': 1}}\n"
    )
    uri = await author.invoke(bundle, runner.did)
    for _ in range(300):
        if marker.exists():
            break
        await asyncio.sleep(0.05)
    os.kill(stack.pid, signal.SIGSTOP)
    try:
        for _ in range(400):
            row = runner.app.state.db.execute("SELECT attempts, last_error FROM outbox WHERE invocation_uri = ?", (uri,)).fetchone()
            if row and row[0] >= 1:
                break
            await asyncio.sleep(0.05)
        assert row and row[0] >= 1 and row[1], "the write should have failed while the PDS was frozen"
    finally:
        os.kill(stack.pid, signal.SIGCONT)
    value = await wait_result(reader, runner.did, uri, timeout=90)
    assert value["status"] == "success" and value["data"] == {"done": 1}
    assert marker.read_text() == "x"


async def test_permissions_are_granted_or_the_bundle_is_refused(author, make_runner, reader):
    """A bundle asking for network the runner does not grant is rejected, naming it; when the
    runner grants it (and, the address being loopback, the operator's net_private holds it),
    the sandboxed bundle really can connect (and only there)."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    source = (
        "import socket\n"
        "def main(args):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', args['port']), timeout=2).close()\n"
        "        return {'connected': True}\n"
        "    except OSError as e:\n"
        "        return {'connected': False, 'why': type(e).__name__}\n"
    )
    asking = await author.publish(source, permissions={"net": [f"127.0.0.1:{port}"]})
    silent = await author.publish(source)
    stingy = await make_runner(state_name="stingy", access={"allowlist": [author.account.did]})
    generous = await make_runner(state_name="generous", access={"allowlist": [author.account.did]},
                                 permissions={"net": [f"127.0.0.1:{port}"], "net_private": ["127.0.0.1/32"]})
    try:
        r1 = await wait_result(reader, stingy.did, await author.invoke(asking, stingy.did, args={"port": port}))
        assert r1["status"] == "rejected" and f"net 127.0.0.1:{port}" in r1["error"]
        r2 = await wait_result(reader, generous.did, await author.invoke(asking, generous.did, args={"port": port}))
        assert r2["status"] == "success" and r2["data"] == {"connected": True}
        if r2["metrics"]["isolation"] == "process":  # the egress proxy's count of this run, in the result
            assert r2["metrics"]["egressConnections"] == 1 and r2["metrics"]["egressRefused"] == 0
        r3 = await wait_result(reader, generous.did, await author.invoke(silent, generous.did, args={"port": port}))
        assert r3["status"] == "success" and r3["data"]["connected"] is False  # not asked, not granted
    finally:
        server.close()


async def test_batched_result_writes_fall_back_one_by_one(new_account, stack, reader, tmp_path):
    """Results go out in one applyWrites; when the PDS refuses the batch (here: one result key
    already holds a record, so #create fails) each is written on its own, and all land."""
    from atrund.atproto.session import Session
    from atrund.records import RESULT
    from atrund.results import ResultWriter
    from atrund.state import State

    acct = new_account("writer")
    session = await Session.login(acct.pds_url, acct.handle, acct.app_password)
    state = State(tmp_path / "s.sqlite3")
    try:
        ref = {"uri": "at://did:plc:x/dev.atrun.bundle/b", "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}
        uris = [f"at://did:plc:author/dev.atrun.invocation/3k{i}" for i in range(3)]
        for i, uri in enumerate(uris):
            state.accept(uri, "did:plc:author", ref["cid"], {})
            state.finish(uri, "success", result_rkey(uri), {"invocation": {"uri": uri, "cid": ref["cid"]}, "bundle": ref,
                                                           "status": "success", "data": {"n": i}, "createdAt": "2026-01-01T00:00:00.000Z"})
        await session.put_record(RESULT, result_rkey(uris[1]), {"stale": True})  # a key already taken
        writer = ResultWriter(session, state)
        assert await writer.flush() == 3
        for i, uri in enumerate(uris):
            _, value = await reader.get_record(acct.did, RESULT, result_rkey(uri))
            assert value["data"] == {"n": i}
        assert state.counts()["unwritten"] == 0
        await session.apply_creates(RESULT, [("batchone", {"n": 1}), ("batchtwo", {"n": 2})])  # the batch itself works
        assert (await reader.get_record(acct.did, RESULT, "batchtwo"))[1] == {"$type": RESULT, "n": 2}
    finally:
        state.close()
        await session.close()


async def test_reconciliation_finds_an_invocation_behind_the_cursor(author, make_runner, reader):
    """An invocation whose record key sorts before the poll cursor (an author choosing an old
    key; or a PDS committing concurrent writes out of key order) is invisible to cursor polling;
    the periodic full rescan finds it, and nothing seen before runs again."""
    from atrund.records import INVOCATION

    runner = await make_runner(access={"allowlist": [author.account.did]}, ingest={"reconcile_interval": 1.5})
    bundle = await author.publish(HELLO)
    first = await author.invoke(bundle, runner.did)
    await wait_result(reader, runner.did, first)
    behind, _ = await author.session.put_record(INVOCATION, "2222222222222", {
        "runner": runner.did, "bundle": bundle, "endpoint": "main", "args": {"name": "late"},
        "createdAt": "2026-01-01T00:00:00.000Z"})
    value = await wait_result(reader, runner.did, behind, timeout=30)
    assert value["data"] == {"greeting": "hello late"}
    assert runner.app.state.counts()["done"] == 2


async def test_one_authors_flood_does_not_hold_up_another(login_author, make_runner, reader):
    """Fifteen slow invocations from one author, then one from another: the second author's
    result comes within a few executions, and every flooded invocation still ends in a result
    (success, or rejected if it found the backlog full)."""
    flooder, other = await login_author("flood"), await login_author("other")
    runner = await make_runner(access={"allowlist": [flooder.account.did, other.account.did]},
                               executor={"concurrency": 1, "isolation": "none"},
                               limits={"per_author_backlog": 12})
    slow = "import time\ndef main(args):\n    time.sleep(0.3)\n    return {'i': args['i']}\n"
    fb, ob = await flooder.publish(slow), await other.publish(slow)
    flood = [await flooder.invoke(fb, runner.did, args={"i": i}) for i in range(15)]
    single = await other.invoke(ob, runner.did, args={"i": 99})
    assert (await wait_result(reader, runner.did, single, timeout=60))["status"] == "success"
    # Counted from the moment the runner stored the single one: flood invocations that ran while
    # the flood was still being posted (before the single one existed) are not ahead of it.
    times = {u: (seen, started) for u, seen, started in
             runner.app.state.db.execute("SELECT uri, seen_at, started_at FROM invocations").fetchall()}
    seen, started = times[single]
    ahead = [u for u in flood if u in times and times[u][1] is not None and seen < times[u][1] < started]
    assert len(ahead) <= 2, f"{len(ahead)} of the flood started between the other author's being stored and starting"
    statuses = [(await wait_result(reader, runner.did, u, timeout=60))["status"] for u in flood]
    rejected = [s for s in statuses if s == "rejected"]
    assert statuses.count("success") + len(rejected) == 15


async def test_an_invocation_deleted_while_it_waits_is_withdrawn(author, make_runner, reader):
    """Poll mode, one slot per author: the first invocation sleeps 3 s, the second waits behind
    it and is deleted meanwhile. Just before it would start, the runner finds it gone from the
    author's repo (it waited longer than STALE_AFTER, so it is checked): withdrawn, not run, no
    result. A third, posted after the first finished, runs normally."""
    from atrund.records import INVOCATION

    runner = await make_runner(access={"allowlist": [author.account.did]}, limits={"per_author_concurrency": 1})
    bundle = await author.publish("import time\n\ndef main(args):\n    time.sleep(args['s'])\n    return args\n")
    slow = await author.invoke(bundle, runner.did, args={"s": 3})
    doomed = await author.invoke(bundle, runner.did, args={"s": 0})
    for _ in range(100):  # until the poller has stored both
        if runner.app.state.status_of(doomed) is not None:
            break
        await asyncio.sleep(0.05)
    assert runner.app.state.status_of(doomed) == ("pending", None)
    await author.session.delete_record(INVOCATION, doomed.rsplit("/", 1)[1])
    assert (await wait_result(reader, runner.did, slow))["status"] == "success"
    after = await author.invoke(bundle, runner.did, args={"s": 0})
    assert (await wait_result(reader, runner.did, after))["status"] == "success"
    assert runner.app.state.status_of(doomed) == ("withdrawn", None)
    assert await no_result(reader, runner.did, doomed, settle=0.2)
