"""No input and no fault stops the runner (issue 11): loops that survive their items, a writer that
never dies and never retries forever, a state store that fails and comes back, a PDS that hangs,
/healthz that names what is wrong, and operators' quarantine commands.

Everything is real: the local PDS and PLC, the runner's SQLite state made unwritable with
``chattr +i``, the PDS frozen with SIGSTOP, workers that really run. Each test says what it pins.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import no_result, wait_result

from atrund.atproto.session import Session
from atrund.health import Health
from atrund.records import RESULT, Result, result_rkey
from atrund.results import FALLBACK_MARK, ResultWriter
from atrund.schedule import Scheduler
from atrund.state import State
from atrund.supervise import Supervisor

HELLO = "def main(args):\n    return {'n': args.get('n')}\n"
SLOW = "import time\n\ndef main(args):\n    time.sleep(args.get('s', 2))\n    return {'slept': args.get('s', 2)}\n"
ROOT = Path(__file__).resolve().parent.parent


async def healthz(runner) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{runner.app.gateway.url}/healthz") as resp:
            assert resp.status == 200
            return await resp.json()


async def until(condition, what: str, timeout: float = 30.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


def chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True)


@pytest.fixture
def immutable_ok(tmp_path):
    """chattr +i needs root and a file system that keeps the flag (ext4 here); say so otherwise."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("making the state store unwritable needs root and chattr (e2fsprogs)")
    probe = tmp_path / "probe"
    probe.write_text("x")
    try:
        chattr("+i", probe)
    except subprocess.CalledProcessError:
        pytest.skip(f"the file system under {tmp_path} does not support chattr +i")
    chattr("-i", probe)


# -- loops: the supervisor and the scheduler's check ---------------------------------------------

async def test_a_failing_loop_is_restarted_and_named_on_health():
    """A loop that raises is restarted (with backoff), its failure is a named problem with the
    error, and cancellation still ends it: the runner never stops because one loop failed."""
    health = Health()
    runs = []

    async def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) <= 2:
            raise RuntimeError(f"boom {len(runs)}")
        await asyncio.sleep(3600)

    sup = Supervisor(health)
    task = sup.start("flaky", flaky)
    deadline = time.monotonic() + 10
    while len(runs) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(runs) == 3, runs
    problems = health.problems()
    assert "loop:flaky" in problems and "RuntimeError: boom 2" in problems["loop:flaky"]["reason"]
    assert sup.restarts["flaky"] == 2
    await sup.stop()
    assert task.done() and task.cancelled()


async def test_a_hanging_still_posted_check_never_holds_an_execution_slot():
    """The check before an invocation starts (is it still posted?) runs outside the execution
    slots: with one slot, an author whose check hangs (their PDS does not answer) does not delay
    another author's invocation, and the hanging one still runs once its check returns."""
    started: list[str] = []
    release = asyncio.Event()

    async def run(uri: str) -> None:
        started.append(uri)

    async def check(uri: str) -> bool:
        if uri.startswith("slow"):
            await release.wait()
        return True

    s = Scheduler(run, lambda uri, why: None, concurrency=1, check=check)
    s.submit("did:slow", "slow-1")
    s.submit("did:fast", "fast-1")
    s.submit("did:fast", "fast-2")
    task = asyncio.create_task(s.run())
    try:
        for _ in range(100):
            if len(started) >= 2:
                break
            await asyncio.sleep(0.02)
        assert started == ["fast-1", "fast-2"]  # not behind the hanging check
        release.set()
        for _ in range(100):
            if "slow-1" in started:
                break
            await asyncio.sleep(0.02)
        assert started[-1] == "slow-1"
    finally:
        await s.stop()
        task.cancel()


async def test_a_check_that_refuses_drops_only_that_invocation():
    """A head the check refuses (deleted while it waited) is dropped; the author's next one runs."""
    started: list[str] = []

    async def run(uri: str) -> None:
        started.append(uri)

    async def check(uri: str) -> bool:
        return uri != "a-deleted"

    s = Scheduler(run, lambda uri, why: None, concurrency=2, check=check)
    for uri in ("a-deleted", "a-kept"):
        s.submit("did:a", uri)
    task = asyncio.create_task(s.run())
    try:
        for _ in range(100):
            if started:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert started == ["a-kept"]
    finally:
        await s.stop()
        task.cancel()


# -- the result writer -------------------------------------------------------------------------

@pytest.fixture
async def writer_rig(stack, new_account, author, tmp_path):
    """A ResultWriter on a real runner account and a real SQLite state, with one published bundle."""
    acct = new_account("writer")
    session = await Session.login(acct.pds_url, acct.handle, acct.app_password)
    state = State(tmp_path / "state" / "atrund.sqlite3")
    bundle = await author.publish(HELLO)
    writer = ResultWriter(session, state)
    yield session, state, writer, bundle, acct
    writer.quarantine.close()
    state.close()
    await session.close()


def queue(state: State, bundle: dict, n: int, **fields) -> str:
    uri = f"at://did:plc:authorxyz/dev.atrun.invocation/3kresil{n:06d}"
    state.accept(uri, "did:plc:authorxyz", bundle["cid"], {})
    record = {"invocation": {"uri": uri, "cid": bundle["cid"]}, "bundle": bundle, "status": "success",
              "createdAt": "2026-12-06T00:00:00.000Z", **fields}
    assert state.finish(uri, "success", result_rkey(uri), record)
    return uri


async def read_result(reader, runner_did: str, uri: str) -> dict:
    return await wait_result(reader, runner_did, uri, timeout=15)


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in-a-batch"])
async def test_a_result_that_cannot_be_sent_becomes_an_error_result(writer_rig, reader, batched):
    """A result holding a lone surrogate cannot be encoded as UTF-8, so it can never be sent: it
    is replaced by an error result that says so (valid Unicode), and a result written beside it
    is not held up. Before: the serializer's UnicodeEncodeError killed the writer loop, and the
    daemon with it, at every restart."""
    session, state, writer, bundle, acct = writer_rig
    bad = queue(state, bundle, 1, data={"text": "\ud800"})
    good = queue(state, bundle, 2, data={"text": "fine"}) if batched else None
    await writer.flush()
    await writer.flush()  # the fallback is due at once
    value = await read_result(reader, acct.did, bad)
    assert value["status"] == "error" and value["error"].startswith(FALLBACK_MARK)
    assert "cannot be sent" in value["error"] and "not valid Unicode" in value["error"]
    if good:
        assert (await read_result(reader, acct.did, good))["data"] == {"text": "fine"}
    assert state.outbox_figures()[0] == 0


async def test_a_result_the_pds_refuses_is_written_as_an_error_without_the_bundles_figures(writer_rig, reader):
    """The PDS refuses floats: a result whose metrics a bundle made 1e30 is refused for good, and
    its fallback error result (which leaves out the figures) is written. Before: the fallback kept
    the metrics, was refused again, and the result was retried forever."""
    session, state, writer, bundle, acct = writer_rig
    uri = queue(state, bundle, 3, metrics={"executionTimeMs": 1e30})
    for _ in range(3):
        await writer.flush()
    value = await read_result(reader, acct.did, uri)
    assert value["status"] == "error" and "metrics" not in value
    Result.model_validate(value)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atrund.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


async def test_a_result_refused_even_as_an_error_is_quarantined_and_operators_can_act(writer_rig, reader, tmp_path):
    """A result whose fallback is refused too (here: its bundle reference carries a float, which the
    fallback keeps) goes to quarantine and off the outbox, so nothing is retried forever, and
    results after it are written. `atrund quarantine list` shows it with the reason; `retry` puts it
    back on the outbox (where it is refused again, and so quarantined again with one more attempt);
    `drop` forgets it. Errors of the command are one line, no traceback."""
    session, state, writer, bundle, acct = writer_rig
    poisoned = queue(state, {**bundle, "weight": 0.5}, 4)
    for _ in range(3):
        await writer.flush()
    after = queue(state, bundle, 5)
    await writer.flush()
    assert (await read_result(reader, acct.did, after))["status"] == "success"
    assert await no_result(reader, acct.did, poisoned, settle=0.1)
    assert state.outbox_figures()[0] == 0
    assert writer.quarantined == 1
    config = tmp_path / "config.toml"
    config.write_text(f'[runner]\npds = "{acct.pds_url}"\nidentifier = "{acct.handle}"\n\n'
                      f'[state]\ndir = "{state.path.parent}"\n')
    listed = cli("quarantine", "list", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)
    assert [(i["kind"], i["key"]) for i in items] == [("result", poisoned)]
    assert "refused even as an error result" in items[0]["reason"]
    first_attempts = items[0]["attempts"]
    assert cli("quarantine", "retry", "-c", str(config)).returncode == 2  # neither ids nor --all: a usage error
    retried = cli("quarantine", "retry", str(items[0]["id"]), "-c", str(config))
    assert retried.returncode == 0 and "1 item(s) marked for retry" in retried.stderr
    for held in writer.quarantine.take_retries():  # what the daemon's retry loop does
        state.requeue_result(held.key, held.item["rkey"], held.item["record"])
    for _ in range(3):
        await writer.flush()
    again = json.loads(cli("quarantine", "list", "-c", str(config)).stdout)
    assert len(again) == 1 and again[0]["key"] == poisoned and again[0]["attempts"] >= 1
    assert cli("quarantine", "drop", "--all", "-c", str(config)).returncode == 0
    assert json.loads(cli("quarantine", "list", "-c", str(config)).stdout) == []
    missing = cli("quarantine", "list", "-c", str(tmp_path / "nowhere.toml"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert first_attempts >= 1


# -- a runner: polls, health, metrics ----------------------------------------------------------

async def test_an_author_whose_polls_fail_is_named_and_the_others_are_served(author, login_author, make_runner, reader, stack):
    """Poll mode: an allowed DID that does not resolve makes every poll of it fail. /healthz turns
    `degraded` naming that author; /metrics counts the failures; every other author is served."""
    ghost = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
    other = await login_author("other")
    runner = await make_runner(access={"allowlist": [author.account.did, other.account.did, ghost]})
    bundle = await author.publish(HELLO)
    report = await until(lambda: _degraded_with(runner, f"poll:{ghost}"), "the failing author on /healthz")
    assert report["ok"] is True and report["status"] == "degraded"
    for who, n in ((author, 1), (other, 2)):
        uri = await who.invoke(bundle, runner.did, args={"n": n})
        assert Result.model_validate(await wait_result(reader, runner.did, uri)).value() == {"n": n}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{runner.app.gateway.url}/metrics") as resp:
            text = await resp.text()
    assert f'atrund_poll_failures_total{{author="{ghost}"}}' in text
    for name in ("atrund_outbox_depth", "atrund_outbox_oldest_seconds", "atrund_result_write_failures_total",
                 "atrund_quarantined", "atrund_loop_restarts_total", "atrund_state_store_failing",
                 "atrund_results_written_total 2.0", "atrund_invocations_accepted_total 2.0"):
        assert name in text, name


async def _degraded_with(runner, name: str) -> dict | None:
    report = await healthz(runner)
    return report if name in report["problems"] else None


async def test_a_healthy_runner_says_ok_with_no_problems(author, make_runner):
    runner = await make_runner(access={"allowlist": [author.account.did]})
    report = await healthz(runner)
    assert report["status"] == "ok" and report["problems"] == {} and report["ok"] is True


# -- faults: the state store, the PDS ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["poll", "firehose"])
async def test_an_unwritable_state_store_degrades_then_recovers_without_losing_or_mislabelling(
        mode, immutable_ok, author, login_author, make_runner, reader):
    """The state store becomes unwritable (chattr +i on its files) for several seconds, while a
    bundle is running and while new invocations arrive from two authors. The runner stays up and
    /healthz names the store; once the files are writable again, the bundle that finished during
    the fault gets its real result (not "interrupted"), every invocation posted during the fault is
    answered, and a restart on the same state serves. Before: queued invocations were dropped
    from the live queue, the writer died, and the process died of SIGBUS (memory-mapped WAL index)."""
    other = await login_author("other")
    ingest = {"mode": mode, "reconcile_interval": 3600} if mode == "firehose" else {}
    runner = await make_runner(access={"allowlist": [author.account.did, other.account.did]}, ingest=ingest)
    slow = await author.publish(SLOW)
    hello = await other.publish(HELLO)
    state_dir = Path(runner.cfg.state.dir)
    files = [p for p in state_dir.iterdir() if p.name.startswith("atrund.sqlite3")]
    assert not (state_dir / "atrund.sqlite3-shm").exists()  # no memory-mapped index: no SIGBUS
    running = await author.invoke(slow, runner.did, args={"s": 3})
    await until(lambda: _status(runner, running, "running"), "the slow invocation to start")
    chattr("+i", *files)
    try:
        during = [await author.invoke(slow, runner.did, args={"s": 0}), await other.invoke(hello, runner.did, args={"n": 7})]
        report = await until(lambda: _degraded_with(runner, "state"), "/healthz to name the state store", timeout=20)
        assert report["ok"] is True
        await asyncio.sleep(4)  # the slow bundle finishes while the store refuses writes
        assert runner.app.runs.held, "the finished outcome should be held, not lost"
    finally:
        chattr("-i", *files)
    first = Result.model_validate(await wait_result(reader, runner.did, running, timeout=40))
    assert first.status == "success" and first.value() == {"slept": 3}
    for uri in during:
        assert Result.model_validate(await wait_result(reader, runner.did, uri, timeout=40)).status == "success"
    await until(lambda: _problems_gone(runner, "state", "held-outcomes"), "the store problem to clear", timeout=20)
    await still_serves(runner, [author, other], make_runner, reader,
                       access={"allowlist": [author.account.did, other.account.did]}, ingest=ingest)


async def _status(runner, uri: str, state: str) -> bool:
    found = runner.app.state.status_of(uri)
    return found is not None and found[0] == state


async def _executing(runner, uri: str) -> bool:
    return await _status(runner, uri, "running") and runner.app.executor.stats().busy >= 1


async def _problems_gone(runner, *names: str) -> bool:
    report = await healthz(runner)
    return not any(n in report["problems"] for n in names)


@pytest.mark.parametrize("mode", ["poll", "firehose"])
async def test_a_frozen_pds_degrades_health_and_results_are_written_when_it_thaws(mode, author, login_author, make_runner,
                                                                                  reader, stack):
    """The PDS stops answering (SIGSTOP) while a bundle runs: its result cannot be written, and
    /healthz (served by the runner itself) says degraded and why. When the PDS answers again the
    result is written and the problem clears; the next invocations of this author and of another
    are answered, and a restart on the same state serves: nothing was lost or needed a restart."""
    other = await login_author("other")
    ingest = {"mode": mode, "reconcile_interval": 3600} if mode == "firehose" else {}
    allow = {"allowlist": [author.account.did, other.account.did]}
    runner = await make_runner(access=allow, ingest=ingest)
    slow = await author.publish(SLOW)
    uri = await author.invoke(slow, runner.did, args={"s": 2})
    # Running in a worker, not only claimed: the claim comes before the bundle is fetched from
    # the PDS, and a PDS frozen during that fetch is another scenario (retried fetches).
    await until(lambda: _executing(runner, uri), "the bundle to run")
    os.kill(stack.pid, signal.SIGSTOP)
    try:
        report = await until(lambda: _degraded_with(runner, "results"), "/healthz to name the result writes", timeout=40)
        assert report["ok"] is True
        assert "does not take result writes" in report["problems"]["results"]["reason"]
    finally:
        os.kill(stack.pid, signal.SIGCONT)
    assert Result.model_validate(await wait_result(reader, runner.did, uri, timeout=60)).status == "success"
    await until(lambda: _problems_gone(runner, "results"), "the results problem to clear", timeout=60)
    await still_serves(runner, [author, other], make_runner, reader, access=allow, ingest=ingest)


async def still_serves(runner, authors, make_runner, reader, **sections) -> None:
    """After a fault: each author's next invocation is answered; then a restart on the same state
    comes up and serves too."""
    for round_ in (1, 2):
        for i, who in enumerate(authors):
            bundle = await who.publish(HELLO)
            uri = await who.invoke(bundle, runner.did, args={"n": i})
            assert Result.model_validate(await wait_result(reader, runner.did, uri, timeout=60)).value() == {"n": i}
        if round_ == 1:
            await runner.stop()
            runner = await make_runner(account=runner.account, state_name="runner", **sections)


# -- edges: access before resolution -----------------------------------------------------------

async def test_an_unlisted_did_web_caller_makes_the_runner_connect_nowhere(author, make_runner):
    """XRPC with a token whose iss is did:web:<host> of a DID the allowlist does not name is refused
    (403) before its DID document is fetched: a listener on that host sees no connection. Before:
    the runner connected out to the host first, then refused."""
    import base64

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    runner = await make_runner(access={"allowlist": [author.account.did]})

    def b64(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    iss = f"did:web:localhost%3A{port}"
    token = ".".join([b64({"alg": "ES256K", "typ": "JWT"}),
                      b64({"iss": iss, "aud": runner.did, "lxm": "dev.atrun.invoke", "exp": now + 60, "iat": now,
                           "jti": "x" * 16}), b64({"sig": 1})])
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{runner.app.gateway.url}/xrpc/dev.atrun.invoke", json={},
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
                body = await resp.json()
                assert resp.status == 403, body
                assert iss in body["message"]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


async def test_an_unlisted_handle_on_the_gateway_is_refused_before_its_did_is_resolved(author, login_author, make_runner):
    """Gateway: a handle that names a DID the allowlist does not serve gets 403, and the runner
    never fetched that DID's document (its identity cache has no entry for it)."""
    stranger = await login_author("stranger")
    runner = await make_runner(access={"allowlist": [author.account.did]})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{runner.app.gateway.url}/{stranger.account.handle}/3kaaaaaaaaaaa/") as resp:
            body = await resp.json()
            assert resp.status == 403 and body["error"] == "AuthorDenied", body
    assert stranger.account.did not in runner.app.identities._cache


# -- logs and signals --------------------------------------------------------------------------

def test_json_logs_carry_the_traceback_text(capsys):
    """A failure logged with its exception carries the traceback as text in JSON logs (before:
    only "exc_info": true)."""
    import structlog

    from atrund import log

    log.setup("info", json_logs=True)
    try:
        raise ValueError("the detail")
    except ValueError:
        structlog.get_logger("t").exception("it failed")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert "Traceback" in line["exception"] and "ValueError: the detail" in line["exception"]
    log.setup("warning", json_logs=False)


@pytest.mark.parametrize("after", [0.15, 0.4, 1.0, 2.0])
def test_sigterm_at_any_point_of_start_up_stops_serve_cleanly(after, author, stack, tmp_path):
    """A SIGTERM during start-up (imports, config, login, publishing) ends `atrund serve` cleanly:
    exit code 0 and no traceback, never killed by the default action mid-start."""
    pw = tmp_path / "pw"
    pw.write_text(author.account.app_password)
    config = tmp_path / "config.toml"
    config.write_text(f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{author.account.handle}"\npassword_file = "{pw}"\n\n'
                      f'{stack.identity_toml()}\n[access]\nallowlist = ["{author.account.did}"]\n\n'
                      f'[gateway]\nlisten = "127.0.0.1:0"\n\n[state]\ndir = "{tmp_path / "state"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "atrund.cli", "serve", "-c", str(config), "--json-logs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err


# -- one record key, one run -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["poll", "firehose"])
@pytest.mark.parametrize("how", ["deleted-and-created-again", "edited"])
async def test_a_record_key_used_again_before_it_ran_gets_an_explained_rejection(mode, how, author, make_runner, reader):
    """An invocation waits behind a slow one; its author deletes it and creates it again at the same
    record key with new args (or edits it in place). Neither version runs: the key gets a
    `rejected` result about the new version (its CID) that says why. Before: nothing ran, and the
    result at the key, if any, named the old CID. A fresh invocation afterwards runs as usual."""
    from atrund.records import INVOCATION, now_iso

    ingest = {"mode": mode, "reconcile_interval": 3600} if mode == "firehose" else {}
    runner = await make_runner(access={"allowlist": [author.account.did]}, ingest=ingest)
    slow, hello = await author.publish(SLOW), await author.publish(HELLO)
    blocker = await author.invoke(slow, runner.did, args={"s": 4})
    await until(lambda: _status(runner, blocker, "running"), "the slow invocation to start")
    from atrund.atproto.uri import new_tid

    rkey = new_tid()  # after every key the author used so far: a poll's cursor has not passed it
    record = {"runner": runner.did, "bundle": hello, "endpoint": "main", "args": {"n": 1}, "createdAt": now_iso()}
    uri, first_cid = await author.session.put_record(INVOCATION, rkey, record)
    await until(lambda: _status(runner, uri, "pending"), "the first version to be seen")
    if how == "deleted-and-created-again":
        await author.session.delete_record(INVOCATION, rkey)
    _, second_cid = await author.session.put_record(INVOCATION, rkey, {**record, "args": {"n": 2}})
    assert second_cid != first_cid
    value = await wait_result(reader, runner.did, uri, timeout=30)
    result = Result.model_validate(value)
    assert result.status == "rejected" and "runs at most once" in result.error
    assert result.invocation.cid == second_cid
    fresh = await author.invoke(hello, runner.did, args={"n": 3})
    assert Result.model_validate(await wait_result(reader, runner.did, fresh)).value() == {"n": 3}


async def test_a_pds_that_drops_the_connection_is_a_network_failure_not_a_refusal():
    """A server that closes the connection without answering (a PDS restarting, a dropped
    keep-alive) surfaces in httpx as RemoteProtocolError, which the SDK passes through as it is.
    It must reach the result writer as Unreachable (retried), never as a refusal that would
    replace a good result with an error. A real socket on loopback that accepts and closes."""
    from atproto import AsyncClient

    from atrund.errors import Unreachable

    async def hang_up(reader, writer):
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = Session(AsyncClient(base_url=f"http://127.0.0.1:{port}/xrpc"), "did:plc:x", "x.test", f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(Unreachable, match="RemoteProtocolError"):
            await session.put_record(RESULT, "k", {"status": "success"})
    finally:
        await session.close()
        server.close()
        await server.wait_closed()


async def test_a_store_that_cannot_record_a_write_stops_the_writer_instead_of_resending(writer_rig, immutable_ok, reader):
    """The PDS takes a result but the state store cannot record that it did (its files are
    immutable): the writer stops with StoreError, so its loop backs off, rather than sending the
    same result again and again at once (before: thousands of putRecord calls a second, and a
    flush that never returned). The result is on the PDS; once the store answers it is recorded."""
    from atrund.state import StoreError

    session, state, writer, bundle, acct = writer_rig
    uri = queue(state, bundle, 6)
    files = [p for p in state.path.parent.iterdir() if p.name.startswith("atrund.sqlite3")]
    chattr("+i", *files)
    try:
        with pytest.raises(StoreError):
            await asyncio.wait_for(writer.flush(), 20)
        assert writer.written == 0
    finally:
        chattr("-i", *files)
    assert (await read_result(reader, acct.did, uri))["status"] == "success"
    await writer.flush()
    assert state.outbox_figures()[0] == 0


def test_a_listed_uri_or_cid_that_is_not_ascii_is_not_taken():
    """AT URIs and CIDs are ASCII. One with a lone surrogate (JSON can carry it) could not even be
    stored: the poller treats it as not this author's invocation, so the page, and the author's
    later invocations, go on (before: every poll of the author failed at that page)."""
    from atrund.ingest.poll import _fields

    cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
    assert _fields({"uri": "at://did:plc:a/dev.atrun.invocation/3k\ud800", "cid": cid, "value": {}})[0] is None
    assert _fields({"uri": "at://did:plc:a/dev.atrun.invocation/3kabc", "cid": cid + "\ud800", "value": {}})[1] is None
    assert _fields({"uri": "at://did:plc:a/dev.atrun.invocation/3kabc", "cid": cid, "value": {}})[:2] == (
        "at://did:plc:a/dev.atrun.invocation/3kabc", cid)
