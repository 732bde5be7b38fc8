"""The atrund command line, run as a user runs it: a real subprocess against the local stack."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import _author_env, atrund, serve_config, serve_subprocess, wait_result

from atrund.errors import CallFailed, ConfigError, LoginFailed
from atrund.records import result_uri

ROOT = Path(__file__).resolve().parents[2]


def test_exec_prints_the_exec_response():
    p = atrund("exec", "examples/hello.py", "--runtime", "python", "--endpoint", "greet", "--args", '{"name": "ada"}')
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["success"] is True and out["data"] == {"greeting": "hello, ada!"}


def test_exec_failure_exits_3_and_explains():
    p = atrund("exec", "examples/hello.py", "--runtime", "python", "--endpoint", "divide", "--args", '{"a": 1, "b": 0}')
    assert p.returncode == 3
    assert json.loads(p.stdout)["error"].startswith("ZeroDivisionError")


@pytest.mark.parametrize("args, message", [("[1]", "must be a JSON object"), ("{nope", "not JSON")])
def test_exec_bad_args_names_the_option(args, message):
    p = atrund("exec", "examples/hello.py", "--runtime", "python", "--endpoint", "greet", "--args", args)
    assert p.returncode == 2 and "--args" in p.stderr and message in p.stderr


def test_check_config_names_the_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[runner]\npds = "http://x"\nidentifier = "r.test"\n[executor]\nwarm = -1\n')
    p = atrund("check-config", "-c", str(cfg))
    assert p.returncode == ConfigError.exit_code and "executor.warm" in p.stderr
    assert atrund("check-config", "-c", str(ROOT / "config.toml.example")).returncode == 0


def test_schema_exports_both_messages():
    out = json.loads(atrund("schema").stdout)
    assert {"ExecRequest", "ExecResponse"} <= set(out["$defs"])
    assert "codePath" in out["$defs"]["ExecRequest"]["properties"]


async def test_publish_invoke_wait_and_get(stack, new_account, make_runner):
    alice = new_account("cli")
    runner = await make_runner(access={"allowlist": [alice.did]})
    env = _author_env(stack, alice)
    pub = atrund("bundle", "publish", "examples/hello.py", "--runtime", "python", "--endpoints", "greet,divide", env=env)
    assert pub.returncode == 0, pub.stderr
    bundle = json.loads(pub.stdout)
    assert bundle["uri"].startswith(f"at://{alice.did}/dev.atrun.bundle/")
    # --wait blocks this process; the runner lives in the test's event loop, so run the CLI in a thread.
    import asyncio

    inv = await asyncio.to_thread(atrund, "invoke", bundle["uri"], "--runner", runner.did, "--endpoint", "greet",
                                  "--args", '{"name": "cli"}', "--wait", "--wait-seconds", "60", env=env)
    assert inv.returncode == 0, inv.stderr
    out = json.loads(inv.stdout)
    assert out["status"] == "success" and out["value"] == {"greeting": "hello, cli!"}
    assert out["result"] == result_uri(runner.did, out["invocation"]["uri"])
    got = atrund("result", "get", out["result"], "--plc-url", stack.plc_url)
    assert got.returncode == 0 and json.loads(got.stdout)["value"] == {"greeting": "hello, cli!"}
    uri = atrund("result", "uri", out["invocation"]["uri"], "--runner", runner.did)
    assert uri.stdout.strip() == out["result"]
    bad = await asyncio.to_thread(atrund, "invoke", bundle["uri"], "--runner", runner.did, "--endpoint", "divide",
                                  "--args", '{"a": 1, "b": 0}', "--wait", env=env)
    assert bad.returncode == 3 and json.loads(bad.stdout)["status"] == "error"


async def test_call_runs_now_through_xrpc(stack, new_account, make_runner):
    """`atrund call` finds the runner's gateway in its record, authenticates with a service-auth
    token and prints the answer; a caller the runner does not serve gets one clear line."""
    import asyncio

    alice, mallory = new_account("cli"), new_account("cli")
    runner = await make_runner(access={"allowlist": [alice.did]})
    env = _author_env(stack, alice)
    bundle = json.loads(atrund("bundle", "publish", "examples/hello.py", "--runtime", "python", env=env).stdout)
    p = await asyncio.to_thread(atrund, "call", bundle["uri"], "--runner", runner.did, "--endpoint", "greet",
                                "--args", '{"name": "xrpc"}', env=env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "success" and out["value"] == {"greeting": "hello, xrpc!"} and out["caller"] == alice.did
    p = await asyncio.to_thread(atrund, "call", bundle["uri"], "--runner", runner.did, "--endpoint", "divide",
                                "--args", '{"a": 1, "b": 0}', env=env)
    assert p.returncode == 3 and json.loads(p.stdout)["status"] == "error"
    p = await asyncio.to_thread(atrund, "call", bundle["uri"], "--runner", runner.did, "--endpoint", "greet",
                                env=_author_env(stack, mallory))
    assert p.returncode == CallFailed.exit_code and "HTTP 403 Forbidden" in p.stderr and "Traceback" not in p.stderr


def test_login_failure_is_one_clear_line(stack, new_account):
    alice = new_account("cli")
    env = {**_author_env(stack, alice), "ATRUND_PASSWORD": "wrong-wrong-wrong"}
    p = atrund("bundle", "publish", "examples/hello.py", "--runtime", "python", env=env)
    assert p.returncode == LoginFailed.exit_code and "login to" in p.stderr and "Traceback" not in p.stderr


def _worker_pid(marker: Path) -> int:
    return int(marker.read_text().split()[1])


def _dead(pid: int) -> bool:
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


async def test_runner_killed_mid_run_never_runs_it_twice(stack, new_account, author, reader, tmp_path, state_section):
    """SIGKILL `atrund serve` while a bundle runs: after restart the invocation gets an
    "interrupted" error result and the bundle has started exactly once (on each state backend)."""
    import asyncio

    runner = new_account("crash")
    config = serve_config(tmp_path, stack, runner, author, state=state_section)
    marker = tmp_path / "started.txt"
    bundle = await author.publish(
        f"import os, time\ndef main(args):\n    open({str(marker)!r}, 'a').write(f'started {{os.getpid()}}\\n')\n    time.sleep(30)\n"
    )
    log = tmp_path / "serve.log"
    first = serve_subprocess(config, log)
    try:
        uri = await author.invoke(bundle, runner.did)
        for _ in range(200):
            if marker.exists():
                break
            await asyncio.sleep(0.1)
        assert marker.exists(), log.read_text()
        worker = _worker_pid(marker)
    finally:
        first.kill()  # SIGKILL: no chance to clean up
        first.wait()
    second = serve_subprocess(config, log)
    try:
        assert _dead(worker), "the worker outlived the runner"
        value = await wait_result(reader, runner.did, uri)
        assert value["status"] == "error" and value["error"].startswith("interrupted:")
        time.sleep(1)
        assert marker.read_text().count("started") == 1
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0, log.read_text()


def test_doctor_reports_the_probe():
    p = atrund("doctor")
    assert p.returncode == 0, p.stderr
    assert "process ← auto" in p.stdout and "ran the python test bundle" in p.stdout and "Landlock ABI: " in p.stdout
    assert "network egress: proxy (" in p.stdout  # the runner's egress proxy can be set up here
    assert "seccomp (process): allowlist" in p.stdout and "allowlist, " in p.stdout  # the mode, and each runtime's list
    assert "seccomp (container): allowlist" in p.stdout
    assert f"runner user: uid {os.geteuid()} (runner.user unset" in p.stdout  # the uid serve would run as
    # The microVM line names the monitor and the accelerator found (KVM only if a guest booted under it).
    import shutil

    if shutil.which("qemu-system-x86_64"):
        assert re.search(r"microVM monitor: qemu; accelerator: (kvm|tcg|none) ", p.stdout), p.stdout


def test_exec_refuses_a_private_range_that_is_not_one():
    p = atrund("exec", "examples/hello.py", "--runtime", "python", "--endpoint", "greet", "--allow-private", "10.0.0.0/33")
    assert p.returncode == 2 and "--allow-private" in p.stderr and "10.0.0.0/33" in p.stderr and "Traceback" not in p.stderr


def test_exec_refuses_a_timeout_below_one_second_as_usage():
    """--timeout 0 is a usage error naming the option (exit 2), not a validation traceback."""
    p = atrund("exec", "examples/hello.py", "--runtime", "python", "--endpoint", "greet", "--timeout", "0")
    assert p.returncode == 2 and "--timeout" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_exec_says_firecracker_is_the_old_name_of_microvm():
    """--isolation firecracker still works, as microvm, and says so on stderr (here it stops at the
    unknown runtime, before any VM is built)."""
    p = atrund("exec", "examples/hello.py", "--runtime", "nosuch", "--endpoint", "greet", "--isolation", "firecracker")
    assert "warning: --isolation firecracker is the old name of microvm; it still works" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
