"""Replicas: several `atrund serve` processes, one runner account, one Postgres database (the
tests start both). A replica killed with SIGKILL mid-run: another records its invocation as
interrupted within the lease, nothing runs twice, and the fleet keeps serving."""

from __future__ import annotations

import asyncio
import signal
import time

import psycopg
from conftest import serve_config, serve_subprocess, wait_result

from atrund.pgstate import HEARTBEAT, LEASE


async def _replicas_up(url: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(url, autocommit=True) as db:
                if db.execute("SELECT count(*) FROM replicas").fetchone()[0] >= count:
                    return
        except psycopg.Error:
            pass  # not migrated yet
        await asyncio.sleep(0.2)
    raise AssertionError(f"{count} replicas did not register within {timeout} s")


async def test_a_replica_killed_mid_run_is_taken_over_within_the_lease(stack, new_account, author, reader, tmp_path, pg_url):
    runner = new_account("fleet")
    marker = tmp_path / "started.txt"
    slow = await author.publish(f"import os, time\ndef main(args):\n    open({str(marker)!r}, 'a').write('started\\n')\n"
                                "    time.sleep(60)\n")
    quick = await author.publish("def main(args):\n    return {'ok': True}\n")
    procs = []
    for n in range(2):
        home = tmp_path / f"replica{n}"
        home.mkdir()
        procs.append(serve_subprocess(serve_config(home, stack, runner, author, state={"url": pg_url}), home / "serve.log"))
    try:
        await _replicas_up(pg_url, 2)
        uri = await author.invoke(slow, runner.did)
        for _ in range(300):
            if marker.exists():
                break
            await asyncio.sleep(0.1)
        assert marker.exists(), (tmp_path / "replica0" / "serve.log").read_text()[-3000:]
        with psycopg.connect(pg_url, autocommit=True) as db:
            (pid,) = db.execute("SELECT r.pid FROM invocations i JOIN replicas r ON r.id = i.replica WHERE i.uri = %s "
                                "AND i.state = 'running'", (uri,)).fetchone()
        (victim,) = [p for p in procs if p.pid == pid]
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait()
        value = await wait_result(reader, runner.did, uri, timeout=LEASE + HEARTBEAT + 20)
        took = time.monotonic() - killed
        print(f"failover: the dead replica's run recorded as interrupted {took:.1f} s after SIGKILL (lease {LEASE} s)")
        assert value["status"] == "error" and value["error"].startswith("interrupted:"), value
        assert took <= LEASE + 2 * HEARTBEAT + 3, f"taken over after {took:.1f} s"
        # the survivor serves what comes next
        after = await author.invoke(quick, runner.did)
        assert (await wait_result(reader, runner.did, after))["status"] == "success"
        await asyncio.sleep(1.0)
        assert marker.read_text().count("started") == 1, "the interrupted invocation never runs again"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except Exception:  # noqa: BLE001 - whatever it was, it must not outlive the test
                p.kill()
                p.wait()
