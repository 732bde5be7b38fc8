"""Replicas: several `atrund serve` processes, one runner account, one Postgres database (the
tests start both). A replica killed with SIGKILL mid-run: another records its invocation as
interrupted within the lease, nothing runs twice, and the fleet keeps serving. The ingest leader
killed: a standby leads within seconds. Roles: an ingest-only replica's work runs on the
executing one."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import psycopg
from conftest import atrund, serve_config, serve_subprocess, wait_result

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


def _serve(count: int, stack, runner, author, tmp_path, pg_url, roles: list[str] | None = None) -> list:
    """``count`` replicas (`atrund serve` processes) of ``runner`` on one database; ``roles``: the
    roles of each, in order (default: all)."""
    procs = []
    for n in range(count):
        home = tmp_path / f"replica{n}"
        home.mkdir()
        extra = f"roles = {roles[n]}\n".replace("'", '"') if roles else ""
        procs.append(serve_subprocess(serve_config(home, stack, runner, author, runner_extra=extra, state={"url": pg_url}),
                                      home / "serve.log"))
    return procs


def _stop(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except Exception:  # noqa: BLE001 - whatever it was, it must not outlive the test
            p.kill()
            p.wait()


def _leader(url: str) -> int | None:
    """The pid of the replica holding ingest leadership (None: nobody)."""
    from atrund.pgstate import INGEST_LOCK, LOCK_CLASS

    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute("SELECT r.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                         "JOIN replicas r ON a.application_name = left('atrund ' || r.id, 63) "
                         "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.granted",
                         (LOCK_CLASS, INGEST_LOCK)).fetchone()
    return row[0] if row else None


async def test_a_replica_killed_mid_run_is_taken_over_within_the_lease(stack, new_account, author, reader, tmp_path, pg_url):
    runner = new_account("fleet")
    marker = tmp_path / "started.txt"
    slow = await author.publish(f"import os, time\ndef main(args):\n    open({str(marker)!r}, 'a').write('started\\n')\n"
                                "    time.sleep(60)\n")
    quick = await author.publish("def main(args):\n    return {'ok': True}\n")
    procs = _serve(2, stack, runner, author, tmp_path, pg_url)
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
        assert took <= 15, f"taken over after {took:.1f} s (documented: within 15 s)"
        # the survivor serves what comes next
        after = await author.invoke(quick, runner.did)
        assert (await wait_result(reader, runner.did, after))["status"] == "success"
        await asyncio.sleep(1.0)
        assert marker.read_text().count("started") == 1, "the interrupted invocation never runs again"
    finally:
        _stop(procs)


async def test_the_ingest_leader_killed_a_standby_takes_over_within_seconds(stack, new_account, author, reader, tmp_path,
                                                                         pg_url):
    """One replica ingests at a time; SIGKILL it and the other leads within a few seconds,
    resuming from the stored cursors: what is posted next runs, and once."""
    runner = new_account("lead")
    counter = tmp_path / "runs.txt"
    bundle = await author.publish(f"def main(args):\n    open({str(counter)!r}, 'a').write(args['n'] + '\\n')\n"
                                  "    return {'ok': True}\n")
    procs = _serve(2, stack, runner, author, tmp_path, pg_url)
    try:
        await _replicas_up(pg_url, 2)
        before = await author.invoke(bundle, runner.did, args={"n": "before"})
        assert (await wait_result(reader, runner.did, before))["status"] == "success"
        leader = _leader(pg_url)
        (victim,) = [p for p in procs if p.pid == leader]
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait()
        while _leader(pg_url) in (None, leader):
            assert time.monotonic() - killed < 10, "no standby took ingest leadership"
            await asyncio.sleep(0.1)
        took = time.monotonic() - killed
        print(f"ingest failover: a standby leads {took:.1f} s after the leader's SIGKILL")
        assert took <= 5
        after = await author.invoke(bundle, runner.did, args={"n": "after"})
        assert (await wait_result(reader, runner.did, after))["status"] == "success"
        await asyncio.sleep(1.0)
        assert sorted(counter.read_text().split()) == ["after", "before"], "nothing skipped, nothing repeated"
    finally:
        _stop(procs)


async def test_work_goes_to_executing_replicas_and_each_author_stays_on_one(stack, new_account, author, reader, tmp_path,
                                                                         pg_url):
    """An ingest-only replica stores invocations; the store assigns them to the executing one
    (woken by a NOTIFY), which runs them: every one once, on the executing replica."""
    runner = new_account("roles")
    bundle = await author.publish("def main(args):\n    return {'n': args['n']}\n")
    procs = _serve(2, stack, runner, author, tmp_path, pg_url, roles=[["ingest", "gateway"], ["execute"]])
    try:
        await _replicas_up(pg_url, 2)
        uris = [await author.invoke(bundle, runner.did, args={"n": n}) for n in range(5)]
        for n, uri in enumerate(uris):
            assert (await wait_result(reader, runner.did, uri))["data"] == {"n": n}
        with psycopg.connect(pg_url, autocommit=True) as db:
            ran_on = {pid for (pid,) in db.execute("SELECT r.pid FROM invocations i JOIN replicas r ON r.id = i.replica "
                                                   "WHERE i.state = 'done'")}
        assert ran_on == {procs[1].pid}, "only the executing replica runs invocations"
        assert _leader(pg_url) == procs[0].pid, "only the ingesting replica leads ingest"
        listed = atrund("status", "-c", str(tmp_path / "replica1" / "config.toml"))  # stdout not a terminal: JSON
        assert listed.returncode == 0, listed.stderr
        fleet = {r["pid"]: r for r in json.loads(listed.stdout)["replicas"]}
        assert fleet[procs[0].pid]["ingest_leader"] and fleet[procs[0].pid]["roles"] == ["ingest", "gateway"]
        assert not fleet[procs[1].pid]["ingest_leader"] and fleet[procs[1].pid]["alive"]
    finally:
        _stop(procs)
