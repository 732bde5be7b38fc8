"""The author's everyday loop (issue 17), as a user runs it: handles where DIDs are taken, checks
before anything is written, output, publish checks, lifecycle commands. Real local stack."""

import asyncio
import json
import os
import types

from conftest import _author_env, atrund, wait_result

from atrund.errors import EndpointUndeclared, NotARunner, RunnerMismatch
from atrund.records import INVOCATION


async def _invocations(reader, did: str) -> list:
    records, _ = await reader.list_records(did, INVOCATION)
    return records


async def test_invoke_takes_the_runner_by_handle_and_the_allowlist_takes_handles(stack, author, make_runner, reader):
    """`invoke --runner HANDLE` writes the runner's DID (resolved both ways), and a runner whose
    TOML allowlist names the author by handle serves them."""
    runner = await make_runner(access={"allowlist": [author.account.handle]})
    env = _author_env(stack, author.account)
    bundle = await author.publish("def main(args):\n    return {'ok': args}\n")
    p = await asyncio.to_thread(atrund, "invoke", bundle["uri"], "--runner", runner.account.handle, "--endpoint", "main",
                                "--args", '{"n": 1}', "--wait", "--wait-seconds", "60", "--json", env=env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "success" and out["value"] == {"ok": {"n": 1}}
    assert out["result"].startswith(f"at://{runner.did}/")
    [record] = await _invocations(reader, author.account.did)
    assert record["value"]["runner"] == runner.did


async def test_invoke_refuses_before_writing(stack, author, new_account, make_runner, reader):
    """No runner record, a runtime the runner does not run, an endpoint the bundle does not
    declare: one line each, its own exit code, and no invocation record is written."""
    env = _author_env(stack, author.account)
    runner = await make_runner(access={"allowlist": [author.account.did]})
    nobody = new_account("idle")
    declared = await author.publish("def main(args):\n    return 1\n", endpoints=["main"])
    cobol = await author.publish("whatever", runtime="cobol")
    cases = [(declared, nobody.did, "main", NotARunner, "has no dev.atrun.runner record"),
             (cobol, runner.did, "main", RunnerMismatch, "not cobol"),
             (declared, runner.did, "other", EndpointUndeclared, "'other' is not one the bundle declares (main)")]
    for bundle, runner_did, endpoint, error, says in cases:
        p = await asyncio.to_thread(atrund, "invoke", bundle["uri"], "--runner", runner_did, "--endpoint", endpoint,
                                    "--wait", env=env)
        assert p.returncode == error.exit_code, p.stderr
        assert says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert await _invocations(reader, author.account.did) == []


async def test_invoke_says_when_the_author_is_over_the_runners_rate(stack, author, make_runner):
    """The runner's record announces its per-author rate; a waiting invoke past it says so."""
    runner = await make_runner(access={"allowlist": [author.account.did]},
                               limits={"per_author_per_minute": 1, "per_author_burst": 1})
    record = (await author.repos.get_record(runner.did, "dev.atrun.runner", "self"))[1]
    assert record["limits"]["perAuthorPerMinute"] == 1 and record["limits"]["perAuthorBurst"] == 1
    bundle = await author.publish("def main(args):\n    return 1\n")
    for _ in range(3):
        await author.invoke(bundle, runner.did)
    p = await asyncio.to_thread(atrund, "invoke", bundle["uri"], "--runner", runner.did, "--endpoint", "main", "--wait",
                                "--wait-seconds", "4", env=_author_env(stack, author.account))
    assert "over this runner's per-author rate (1/min, burst 1)" in p.stderr, p.stderr


def _on_a_terminal(*args: str, env: dict) -> str:
    """What `atrund ARGS` prints on stdout when stdout is a terminal (a pseudo-terminal here)."""
    import os
    import pty
    import subprocess
    import sys

    from conftest import ROOT

    main, child = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "atrund.cli", *args], stdout=child, stderr=subprocess.DEVNULL,
                         env={**os.environ, **env, "COLUMNS": "40"}, cwd=ROOT)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    p.wait(60)
    os.close(main)
    return out.decode().replace("\r\n", "\n")


async def test_output_is_for_people_on_a_terminal_and_json_otherwise(stack, author, make_runner):
    """On a terminal: status and value first, URIs whole even at 40 columns; --json (or a pipe):
    JSON. A failed run says its error on stderr in one line. -h and completion work."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    env = _author_env(stack, author.account)
    bundle = await author.publish("def main(args):\n    return {'x': 1}\ndef bad(args):\n    raise ValueError('no\\nway')\n")
    human = await asyncio.to_thread(_on_a_terminal, "invoke", bundle["uri"], "--runner", runner.did, "--endpoint", "main",
                                    "--wait", env=env)
    lines = dict(line.split(":", 1) for line in human.splitlines())
    assert lines["status"].strip() == "success" and json.loads(lines["value"]) == {"x": 1}, human
    assert lines["result"].strip().startswith(f"at://{runner.did}/dev.atrun.result/"), human
    as_json = await asyncio.to_thread(_on_a_terminal, "invoke", bundle["uri"], "--runner", runner.did, "--endpoint",
                                      "main", "--wait", "--json", env=env)
    assert json.loads(as_json)["value"] == {"x": 1}
    p = await asyncio.to_thread(atrund, "invoke", bundle["uri"], "--runner", runner.did, "--endpoint", "bad", "--wait",
                                env=env)
    assert p.returncode == 3 and json.loads(p.stdout)["status"] == "error"
    [line] = [x for x in p.stderr.splitlines() if x.startswith("error")]
    assert "ValueError: no way" in line, p.stderr
    assert atrund("invoke", "-h").returncode == 0 and "--runner" in atrund("bundle", "publish", "-h").stdout
    p = atrund("invoke", "at://did:plc:x/dev.atrun.bundle/x")  # a usage error is one line too
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "error: Missing option '--runner'. (see `python -m atrund.cli invoke --help`)"], p.stderr
    for shell in ("bash", "zsh", "fish"):
        p = atrund("completion", shell)
        assert p.returncode == 0 and "_ATRUND_COMPLETE" in p.stdout, p.stderr


async def test_publish_checks_the_file_for_its_runtime(stack, new_account, reader, tmp_path):
    """Another runtime's extension, a syntax error (each runtime's own checker), an endpoint the
    file does not define: refused before anything is uploaded. Endpoints not given are derived;
    --no-check publishes as given."""
    from atrund.errors import CheckFailed

    alice = new_account("pub")
    env = _author_env(stack, alice)
    (tmp_path / "bad.py").write_text("def main(args)\n    return 1\n")
    (tmp_path / "bad.ts").write_text("export function main(args) {\n  return args +;\n}\n")
    (tmp_path / "bad.mjs").write_text("export function main(args) {\n  return args +;\n}\n")
    refusals = [(("examples/hello.py", "--runtime", "deno"), "hello.py is a python file, not deno"),
                ((str(tmp_path / "bad.py"), "--runtime", "python"), "bad.py does not parse as python: "),
                ((str(tmp_path / "bad.ts"), "--runtime", "deno"), "bad.ts does not parse as deno: "),
                ((str(tmp_path / "bad.mjs"), "--runtime", "node"), "bad.mjs does not parse as node: "),
                (("examples/hello.py", "--runtime", "python", "--endpoints", "greet,nosuch"), "does not define nosuch")]
    for args, says in refusals:
        p = atrund("bundle", "publish", *args, env=env)
        assert p.returncode == CheckFailed.exit_code and says in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert (await reader.list_records(alice.did, "dev.atrun.bundle"))[0] == []
    p = atrund("bundle", "publish", "examples/hello.py", "--runtime", "python", "--json", env=env)
    assert p.returncode == 0, p.stderr
    _, record = await reader.get_record(alice.did, "dev.atrun.bundle", json.loads(p.stdout)["uri"].rsplit("/", 1)[1])
    assert record["endpoints"] == ["divide", "greet"], record
    p = atrund("bundle", "publish", "examples/hello.ts", "--runtime", "deno", env=env)
    assert p.returncode == 0, p.stderr
    p = atrund("bundle", "publish", str(tmp_path / "bad.py"), "--runtime", "python", "--no-check", env=env)
    assert p.returncode == 0, p.stderr


async def test_bundle_update_list_delete_and_results(stack, author, make_runner, reader, tmp_path):
    """update keeps the AT URI (so the gateway URL) with a new CID and the gateway runs the new
    code; list shows it; invoke --cleanup leaves no invocation record; result list finds the
    results by author, by runner, by bundle; result watch prints one as it lands; delete removes it."""
    import aiohttp

    runner = await make_runner(access={"allowlist": [author.account.did]})
    env = _author_env(stack, author.account)
    first, second = tmp_path / "v1.py", tmp_path / "v2.py"
    first.write_text("def main(args):\n    return 'v1'\ndef handleRequest(req):\n    return {'status': 200, 'body': 'v1'}\n")
    second.write_text("def main(args):\n    return 'v2'\ndef handleRequest(req):\n    return {'status': 200, 'body': 'v2'}\n")
    pub = json.loads(atrund("bundle", "publish", str(first), "--runtime", "python", env=env).stdout)
    rkey = pub["uri"].rsplit("/", 1)[1]
    gateway = (await reader.get_record(runner.did, "dev.atrun.runner", "self"))[1]["gatewayUrl"]
    url = f"{gateway}/{author.account.did}/{rkey}/"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert await resp.text() == "v1"
        p = atrund("bundle", "update", pub["uri"], str(second), env=env)
        assert p.returncode == 0, p.stderr
        upd = json.loads(p.stdout)
        assert upd["uri"] == pub["uri"] and upd["cid"] != pub["cid"]
        for _ in range(50):  # the gateway trusts "latest" for gateway.latest_cache_seconds
            async with http.get(url) as resp:
                if await resp.text() == "v2":
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the gateway URL did not serve the updated code")
    listed = json.loads(atrund("bundle", "list", env=env).stdout)
    assert [b["uri"] for b in listed] == [pub["uri"]] and listed[0]["endpoints"] == ["handleRequest", "main"]

    watch = asyncio.create_task(asyncio.to_thread(atrund, "result", "watch", "--runner", runner.did, "--count", "1",
                                                  "--interval", "0.2", env=env, timeout=60))
    await asyncio.sleep(3)  # the watcher's first look: what is there already is not repeated
    p = await asyncio.to_thread(atrund, "invoke", pub["uri"], "--runner", runner.did, "--endpoint", "main", "--wait",
                                "--cleanup", env=env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["value"] == "v2" and out["invocation"]["deleted"] is True
    assert await _invocations(reader, author.account.did) == []
    watched = await watch
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["uri"] == out["result"]

    still = await author.invoke({"uri": pub["uri"], "cid": upd["cid"]}, runner.did)
    await asyncio.sleep(0)  # its result may or may not be in yet: either is listed
    mine = json.loads(atrund("result", "list", env=env).stdout)
    assert [r["invocation"] for r in mine] == [still] and mine[0]["status"] in ("pending", "success")
    on_runner = json.loads(atrund("result", "list", "--runner", runner.account.handle, "--bundle", pub["uri"], env=env).stdout)
    assert out["result"] in [r["uri"] for r in on_runner]
    assert json.loads(atrund("result", "list", "--runner", runner.did, "--bundle", "at://did:plc:x/dev.atrun.bundle/x",
                             env=env).stdout) == []

    p = atrund("bundle", "delete", pub["uri"], env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(atrund("bundle", "list", author.account.did, env=env).stdout) == []


async def test_login_keeps_a_session_so_commands_need_no_password(stack, new_account, tmp_path):
    """`atrund login` keeps the session mode 0600; publish and invoke then take no password;
    without a session, one line says to log in; logout forgets it."""
    import stat

    from atrund.errors import NoSession

    alice = new_account("login")
    kept = tmp_path / "cfg" / "session.json"
    env = {"ATRUND_SESSION_FILE": str(kept), "ATRUND_PLC_URL": stack.plc_url, "ATRUND_PDS": stack.pds_url}
    p = atrund("bundle", "publish", "examples/hello.py", "--runtime", "python", env=env)
    assert p.returncode == NoSession.exit_code and "atrund login" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    p = atrund("login", "--identifier", alice.handle, env={**env, "ATRUND_PASSWORD": alice.app_password})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["did"] == alice.did
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and alice.app_password not in kept.read_text()
    assert len(json.loads(kept.read_text())["session"].split(":::")) >= 4  # handle, DID, access and refresh tokens
    p = atrund("bundle", "publish", "examples/hello.py", "--runtime", "python", env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["uri"].startswith(f"at://{alice.did}/")
    assert json.loads(atrund("bundle", "list", env=env).stdout)[0]["uri"] == json.loads(p.stdout)["uri"]
    p = atrund("bundle", "publish", "examples/hello.py", "--runtime", "python", "--identifier", "someone.else.test", env=env)
    assert p.returncode == NoSession.exit_code and "not someone.else.test's" in p.stderr, p.stderr
    assert atrund("logout", env=env).returncode == 0 and not kept.exists()


async def test_dev_publishes_serves_and_republishes_on_save(tmp_path):
    """`atrund dev FILE`: ready within seconds with a gateway URL; a save re-publishes under the
    same URI, and the gateway and `invoke` run the new code; a result is printed as it lands, and
    what the run printed; Ctrl-C stops it cleanly."""
    import signal
    import subprocess
    import sys

    import aiohttp
    from conftest import ROOT

    file = tmp_path / "app.py"
    file.write_text("def main(args):\n    return 'one'\ndef handleRequest(req):\n    return {'status': 200, 'body': 'one'}\n")
    errlog = tmp_path / "dev.err"
    with open(errlog, "w") as errs:
        dev = subprocess.Popen([sys.executable, "-m", "atrund.cli", "dev", str(file), "--port", "0", "--isolation",
                                "process", "--json"], stdout=subprocess.PIPE, stderr=errs, text=True, cwd=ROOT)
    try:
        lines = []
        while not lines or lines[-1] != "}":
            line = await asyncio.to_thread(dev.stdout.readline)
            assert line, errlog.read_text()
            lines.append(line.rstrip("\n"))
        info = json.loads("\n".join(lines))
        assert info["readySeconds"] < 30 and info["endpoints"] == ["handleRequest", "main"], info
        async with aiohttp.ClientSession() as http:
            async with http.get(info["gateway"]) as resp:
                assert await resp.text() == "one"
            file.write_text("def main(args):\n    print('main says two')\n    return 'two'\n"
                            "def handleRequest(req):\n    return {'status': 200, 'body': 'two'}\n")
            for _ in range(100):
                if "re-published app.py" in errlog.read_text():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(errlog.read_text())
            async with http.get(info["gateway"]) as resp:
                assert await resp.text() == "two"
        p = await asyncio.to_thread(atrund, "invoke", info["bundle"], "--runner", info["runner"], "--endpoint", "main",
                                    "--wait", env=info["env"])
        assert p.returncode == 0 and json.loads(p.stdout)["value"] == "two", p.stderr
        for _ in range(50):
            if "result success: \"two\"" in errlog.read_text() and "  | main says two" in errlog.read_text():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(errlog.read_text())
    finally:
        dev.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(dev.wait, 60)
        dev.stdout.close()
    assert code == 0, errlog.read_text()


async def test_dev_on_a_configured_pds(stack, new_account, tmp_path):
    """`atrund dev FILE -c CONFIG`: the runner account of that configuration on its PDS (here the
    local stack stands in for a real one), the author `atrund login` kept; the bundle is the
    author's, the gateway serves it, and the runner's state is temporary."""
    import signal
    import subprocess
    import sys

    import aiohttp
    from conftest import ROOT, serve_config

    from atrund.atproto.uri import authority

    alice, runner = new_account("devauthor"), new_account("devrunner")
    env = {**os.environ, "ATRUND_SESSION_FILE": str(tmp_path / "session.json"), "ATRUND_PLC_URL": stack.plc_url,
           "ATRUND_PDS": stack.pds_url}
    p = await asyncio.to_thread(atrund, "login", "--identifier", alice.handle, env={**env, "ATRUND_PASSWORD": alice.app_password})
    assert p.returncode == 0, p.stderr
    config = serve_config(tmp_path, stack, runner, types.SimpleNamespace(account=alice))
    file = tmp_path / "app.py"
    file.write_text("def handleRequest(req):\n    print('served', req['path'])\n    return {'status': 200, 'body': 'mine'}\n")
    errlog = tmp_path / "dev.err"
    with open(errlog, "w") as errs:
        dev = subprocess.Popen([sys.executable, "-m", "atrund.cli", "dev", str(file), "-c", str(config), "--port", "0", "--json"],
                               stdout=subprocess.PIPE, stderr=errs, text=True, cwd=ROOT, env=env)
    try:
        lines = []
        while not lines or lines[-1] != "}":
            line = await asyncio.to_thread(dev.stdout.readline)
            assert line, errlog.read_text()
            lines.append(line.rstrip("\n"))
        info = json.loads("\n".join(lines))
        assert info["runner"] == runner.did and authority(info["bundle"]) == alice.did, info
        async with aiohttp.ClientSession() as http:
            async with http.get(info["gateway"] + "hello") as resp:
                assert await resp.text() == "mine"
        for _ in range(50):
            if "  | served /hello" in errlog.read_text():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(errlog.read_text())
    finally:
        dev.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(dev.wait, 60)
        dev.stdout.close()
    assert code == 0, errlog.read_text()
    assert not (tmp_path / "atrund-state").exists()  # the configuration's state.dir was not used


async def test_handles_in_the_configuration_resolve_or_stop_the_start(stack, author, make_runner, reader):
    """ingest.authors takes handles like the access lists; a handle that does not resolve stops
    the runner's start with one error naming the key, before it serves anyone."""
    from atrund.errors import ConfigError

    runner = await make_runner(access={"mode": "open"}, ingest={"authors": [f"@{author.account.handle}"]})
    bundle = await author.publish("def main(args):\n    return 'polled'\n")
    assert (await wait_result(reader, runner.did, await author.invoke(bundle, runner.did)))["data"] is not None
    broken = await make_runner(state_name="broken", start=False, access={"allowlist": ["nobody-here.test"]})
    try:
        await broken.start()
        raise AssertionError("a runner started with an allowlist handle that does not resolve")
    except ConfigError as e:
        assert str(e).startswith("access.allowlist: ") and "nobody-here.test" in str(e), e
    finally:
        broken._task = None  # never started: nothing to stop
        if broken.app is not None:
            await broken.app.close()
    p = atrund("result", "uri", "at://did:plc:x/dev.atrun.invocation/3l00000000000", "--runner", runner.account.handle,
               env={"ATRUND_PDS": stack.pds_url, "ATRUND_PLC_URL": stack.plc_url})
    assert p.returncode == 0 and p.stdout.startswith(f"at://{runner.did}/dev.atrun.result/"), p.stderr
