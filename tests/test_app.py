"""Stopping a runner (atrund.app): running work may finish within `runner.shutdown_grace`; past it,
each invocation still running is stopped and gets an "interrupted" result, written before the
process exits; a second signal exits at once.

Everything is real: the local PDS and PLC, `atrund serve` as a subprocess receiving real signals,
bundles that really run (under the `none` backend, so they can mark a host file when they start).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import serve_config, serve_subprocess, wait_result

from atrund import config
from atrund.records import RESULT, result_rkey

ROOT = Path(__file__).resolve().parent.parent


def _sleeper(marker: Path, seconds: int) -> str:
    return (f"import time\ndef main(args):\n    open({str(marker)!r}, 'a').write('started\\n')\n"
            f"    time.sleep({seconds})\n    return {{'slept': {seconds}}}\n")


async def _serving_a_long_run(stack, new_account, author, tmp_path: Path, grace: float):
    """`atrund serve` (shutdown_grace = ``grace``) running a bundle that sleeps for a minute:
    (runner account, process, invocation URI, the bundle's start marker, the log)."""
    runner = new_account("stopping")
    config = serve_config(tmp_path, stack, runner, author, runner_extra=f"shutdown_grace = {grace}\n", executor_extra="warm = 1\n")
    marker, log = tmp_path / "started.txt", tmp_path / "serve.log"
    bundle = await author.publish(_sleeper(marker, 60))
    proc = serve_subprocess(config, log)
    try:
        uri = await author.invoke(bundle, runner.did)
        for _ in range(300):
            if marker.exists():
                return runner, config, proc, uri, marker, log
            assert proc.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        raise AssertionError(f"the bundle did not start:\n{log.read_text()[-3000:]}")
    except BaseException:
        proc.kill()
        raise


async def _exit_code(proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"`atrund serve` did not exit within {timeout} s")
        await asyncio.sleep(0.05)
    return proc.returncode


async def test_past_shutdown_grace_a_running_invocation_is_interrupted_and_its_result_written_before_exit(
        stack, new_account, author, reader, tmp_path):
    """SIGTERM while a bundle sleeps for a minute, with shutdown_grace = 1: `serve` exits cleanly
    within a few seconds (not after the bundle's minute), and the invocation's "interrupted" result
    is already on the runner's PDS when the process is gone (nobody else could have written it).
    Before: the drain had no deadline and waited up to executor.max_timeout."""
    runner, _, proc, uri, _, log = await _serving_a_long_run(stack, new_account, author, tmp_path, grace=1)
    try:
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc, timeout=30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - signalled < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    _, value = await reader.get_record(runner.did, RESULT, result_rkey(uri))  # no waiting: it is there already
    assert value["status"] == "error" and value["error"].startswith("interrupted:"), value
    text = log.read_text()
    assert "Traceback" not in text
    assert "still running at the shutdown deadline" in text


async def test_within_shutdown_grace_a_running_invocation_finishes_and_its_result_is_written(author, make_runner, reader,
                                                                                          tmp_path):
    """Stopping while a bundle runs for 2 s, with shutdown_grace = 20: the run finishes, and its
    real result is written before the runner's stop returns; nothing reads as interrupted."""
    runner = await make_runner(access={"allowlist": [author.account.did]}, runner={"shutdown_grace": 20},
                               executor={"isolation": "none"})
    marker = tmp_path / "started.txt"
    bundle = await author.publish(_sleeper(marker, 2))
    uri = await author.invoke(bundle, runner.did)
    for _ in range(300):
        if marker.exists():
            break
        await asyncio.sleep(0.1)
    assert marker.exists()
    await runner.stop()
    _, value = await reader.get_record(runner.did, RESULT, result_rkey(uri))
    assert value["status"] == "success", value


async def test_a_second_signal_exits_at_once_and_the_next_start_records_the_interruption(stack, new_account, author, reader,
                                                                                       tmp_path):
    """A second SIGTERM during a long drain (shutdown_grace = 120) exits at once, with the
    signal's exit code; the next start records the run it cut short as interrupted (at most once)."""
    runner, config, proc, uri, marker, log = await _serving_a_long_run(stack, new_account, author, tmp_path, grace=120)
    try:
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert proc.poll() is None, "the first signal must wait for the running invocation"
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc, timeout=5) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    again = serve_subprocess(config, log)
    try:
        value = await wait_result(reader, runner.did, uri)
        assert value["status"] == "error" and value["error"].startswith("interrupted:"), value
    finally:
        again.send_signal(signal.SIGTERM)
        await _exit_code(again, timeout=30)
    assert marker.read_text() == "started\n", "the invocation must run at most once"


def test_shutdown_grace_defaults_to_ten_seconds_and_a_negative_one_is_named():
    """The README's default, and a bad value refused naming its key."""
    base = {"runner": {"pds": "http://localhost:2583", "identifier": "runner.test"}}
    assert config.parse(base).runner.shutdown_grace == 10
    with pytest.raises(config.ConfigError, match="runner.shutdown_grace"):
        config.parse({"runner": {**base["runner"], "shutdown_grace": -1}})
