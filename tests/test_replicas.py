"""Replicas: several `atrund serve` processes, one runner account, one Postgres database (the
tests start both). A replica killed with SIGKILL mid-run: another records its invocation as
interrupted within the lease, nothing runs twice, and the fleet keeps serving. The ingest leader
killed: a standby leads within seconds. Roles: an ingest-only replica's work runs on the
executing one. Bursts count every execution. At the end, replicas as separate hosts, each in a
network namespace over a veth (tests/netns.py; root and iproute2): a shared burst, the firehose
leader killed, and a network partition of the leader."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import os
import re
import signal
import time
from pathlib import Path

import netns
import psycopg
import pytest
from conftest import atrund, serve_config, serve_subprocess, wait_result

from atrund import client
from atrund.pgstate import HEARTBEAT, LEASE
from atrund.records import RESULT


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


def _serve(count: int, stack, runner, author, tmp_path, pg_url, roles: list[str] | None = None,
           net: netns.Subnet | None = None, edit=None, **settings) -> list:
    """``count`` replicas (`atrund serve` processes) of ``runner`` on one database; ``roles``: the
    roles of each, in order (default: all); ``net``: each in its own network namespace on it,
    reaching Postgres at the host's bridge address; ``edit``: what rewrites each config's text
    (``_firehose``, ``_open``); ``settings``: serve_config's other settings."""
    procs = []
    for n in range(count):
        home = tmp_path / f"replica{n}"
        home.mkdir()
        extra = f"roles = {roles[n]}\n".replace("'", '"') if roles else ""
        url = pg_url.replace("@127.0.0.1:", f"@{net.host}:") if net else pg_url
        config = serve_config(home, stack, runner, author, runner_extra=extra, state={"url": url}, **settings)
        if edit:
            config.write_text(edit(config.read_text()))
        wrap = None
        if net:
            net.join(n)
            wrap = functools.partial(net.command, n)
        procs.append(serve_subprocess(config, home / "serve.log", wrap=wrap))
    return procs


def _firehose(config: str) -> str:
    """Ingest from the PDS's firehose, not by polling."""
    return config.replace("[ingest]\n", '[ingest]\nmode = "firehose"\n')


def _open(config: str) -> str:
    """Firehose ingest, and every author served (authors made after the replicas start)."""
    return re.sub(r"\[access\]\nallowlist = .*\n", '[access]\nmode = "open"\n', _firehose(config))


def _no_hot_affinity(config: str) -> str:
    """Work assigned by open work alone, not by hot workers (runner.hot_affinity = false)."""
    assert "[runner]\n" in config, "serve_config writes a [runner] table"
    return config.replace("[runner]\n", "[runner]\nhot_affinity = false\n", 1)


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


def _kill_leader(procs: list, url: str) -> tuple[int, float]:
    """SIGKILL the replica leading ingest: (its pid, when)."""
    leader = _leader(url)
    (victim,) = [p for p in procs if p.pid == leader]
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    victim.wait()
    return leader, killed


async def _new_leader(url: str, old: int, since: float, within: float) -> float:
    """Wait until a replica other than ``old`` leads ingest; seconds since ``since``."""
    while _leader(url) in (None, old):
        assert time.monotonic() - since < within, "no standby took ingest leadership"
        await asyncio.sleep(0.05)
    return time.monotonic() - since


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
        leader, killed = _kill_leader(procs, pg_url)
        took = await _new_leader(pg_url, leader, killed, 10)
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


# -- bursts: many invocations from many authors over a fleet, every execution counted --------------

BURST_AUTHORS = 10
BURST_PER_AUTHOR = 100
# The per-author token bucket lifted: a burst measures the fleet, not the rate limit.
UNLIMITED = "per_author_per_minute = 1000000\nper_author_burst = 100000\n"


def _counting_bundle(runs: Path) -> str:
    """A bundle whose first act is to append its key and the pid of the replica running it (its
    worker's parent, under isolation none) to ``runs``: one line per execution, whatever happens
    after (O_APPEND: lines from many processes never mix)."""
    return (f"import os, time\ndef main(args):\n    with open({str(runs)!r}, 'a') as f:\n"
            "        f.write(args['k'] + ' ' + str(os.getppid()) + '\\n')\n"
            "    time.sleep(args['ms'] / 1000)\n    return {'k': args['k']}\n")


async def _post(authors: list, bundle: dict, runner_did: str, per_author: int, ms: int, tag: str = "") -> dict[str, str]:
    """Each author posts ``per_author`` invocations at once (applyWrites), each to run ``ms``
    milliseconds (a record holds no floats); key -> invocation URI."""
    async def post(n: int, a) -> dict[str, str]:
        keys = [f"{tag}{n}-{i}" for i in range(per_author)]
        uris = await client.invoke_many(a.session, bundle, runner_did, "main", [{"k": k, "ms": ms} for k in keys])
        return dict(zip(keys, uris, strict=True))

    return {k: u for part in await asyncio.gather(*(post(n, a) for n, a in enumerate(authors))) for k, u in part.items()}


async def _results(reader, runner_did: str) -> dict[str, dict]:
    """Every result record in the runner's repo: invocation URI -> result."""
    out, cursor = {}, None
    while True:
        page, cursor = await reader.list_records(runner_did, RESULT, cursor)
        for record in page:
            out[record["value"]["invocation"]["uri"]] = record["value"]
        if not cursor or not page:
            return out


async def _all_results(reader, runner_did: str, uris: set[str], tmp_path: Path, timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = await _results(reader, runner_did)
        if uris <= found.keys():
            return found
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("replica*/serve.log")))
            raise AssertionError(f"{len(uris - found.keys())} of {len(uris)} invocations have no result after {timeout} s\n{logs}")
        await asyncio.sleep(1.0)


def _ran_once(uris: dict[str, str], results: dict[str, dict], runs: Path, killed: int | None = None) -> collections.Counter:
    """Every invocation has its one result, and the executions ``runs`` counted agree: a success
    ran exactly once, an interrupted one at most once and only on the replica ``killed`` (pid).
    Returns the statuses counted."""
    ran: dict[str, list[int]] = collections.defaultdict(list)
    for line in runs.read_text().splitlines() if runs.exists() else []:
        key, pid = line.split()
        ran[key].append(int(pid))
    assert ran.keys() <= uris.keys(), f"executions of keys nobody posted: {sorted(ran.keys() - uris.keys())[:5]}"
    statuses: collections.Counter = collections.Counter()
    for key, uri in uris.items():
        value = results[uri]
        if value["status"] == "success":
            assert len(ran[key]) == 1, f"{key} succeeded after {len(ran[key])} executions on {ran[key]}"
            assert value["data"] == {"k": key}, value
            statuses["success"] += 1
        elif value["status"] == "error" and value["error"].startswith("interrupted:"):
            assert len(ran[key]) <= 1, f"{key}, interrupted, ran {len(ran[key])} times on {ran[key]}"
            assert set(ran[key]) <= {killed}, f"{key} was recorded as interrupted but ran on a live replica ({ran[key]})"
            statuses["interrupted"] += 1
        else:
            raise AssertionError(f"{key}: unexpected result {value}")
    return statuses


def _count(url: str, sql: str, *params) -> int:
    with psycopg.connect(url, autocommit=True) as db:
        return db.execute(sql, params).fetchone()[0]


async def _until(url: str, sql: str, at_least: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _count(url, sql) < at_least:
        assert time.monotonic() < deadline, f"{sql!r} stayed below {at_least} for {timeout} s"
        await asyncio.sleep(0.1)


DONE = "SELECT count(*) FROM invocations WHERE state = 'done'"


@contextlib.asynccontextmanager
async def _burst(name: str, stack, new_account, login_author, tmp_path: Path, pg_url: str, authors: int = BURST_AUTHORS,
                 per_author: int = BURST_PER_AUTHOR, ms: int = 50, net: netns.Subnet | None = None, edit=None):
    """Three replicas of a new runner (each in a network namespace on ``net``, if given; each
    config rewritten by ``edit``, if given);
    ``authors`` authors (10) each post ``per_author`` invocations (100) of ``ms`` milliseconds
    (50) of one bundle that counts its executions in ``runs``. Yields (runner, replicas, key ->
    URI, runs) once they are posted; the replicas are stopped after (those in the list then)."""
    runner = new_account(name)
    logins = [await login_author(f"{name}{n}x") for n in range(authors)]
    runs = tmp_path / "runs.txt"
    bundle = await logins[0].publish(_counting_bundle(runs))
    procs = _serve(3, stack, runner, logins[0], tmp_path, pg_url, net=net, allow=[a.account.did for a in logins],
                   limits=UNLIMITED, edit=edit)
    try:
        await _replicas_up(pg_url, 3)
        yield runner, procs, await _post(logins, bundle, runner.did, per_author, ms=ms), runs
    finally:
        _stop(procs)


async def test_a_burst_of_1000_survives_kill_9_of_a_busy_replica_and_nothing_runs_twice(stack, new_account, login_author,
                                                                                     reader, tmp_path, pg_url):
    """1,000 invocations from 10 authors on 3 replicas; the replica running the most is killed
    with SIGKILL a fifth of the way in, and started again (a new replica: new id, same
    configuration). Every invocation gets exactly one result: success, or interrupted for what
    the dead replica was running; every execution is counted, and none ran twice."""
    async with _burst("burst", stack, new_account, login_author, tmp_path, pg_url) as (runner, procs, uris, runs):
        began = time.monotonic()
        await _until(pg_url, DONE, len(uris) // 5)
        with psycopg.connect(pg_url, autocommit=True) as db:  # the replica running the most, now
            while (busiest := db.execute(
                    "SELECT r.pid, r.id FROM invocations i JOIN replicas r ON r.id = i.replica WHERE i.state = 'running' "
                    "GROUP BY r.pid, r.id ORDER BY count(*) DESC LIMIT 1").fetchone()) is None:
                await asyncio.sleep(0.01)  # between two runs
        victim_pid, victim_id = busiest
        n = next(n for n, p in enumerate(procs) if p.pid == victim_pid)
        procs[n].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[n].wait()
        home = tmp_path / f"replica{n}"
        procs[n] = serve_subprocess(home / "config.toml", home / "serve.log")
        held = "SELECT count(*) FROM invocations WHERE replica = %s AND state IN ('pending', 'running')"
        while _count(pg_url, held, victim_id):
            assert time.monotonic() - killed < LEASE + HEARTBEAT + 20, "nobody took over what the dead replica held"
            await asyncio.sleep(0.2)
        took = time.monotonic() - killed
        results = await _all_results(reader, runner.did, set(uris.values()), tmp_path, timeout=300)
        finished = time.monotonic() - began
        statuses = _ran_once(uris, results, runs, killed=victim_pid)
        print(f"kill -9 burst: {len(uris)} invocations from {BURST_AUTHORS} authors on 3 replicas, every result in "
              f"{finished:.1f} s; {dict(statuses)}; the dead replica's work taken over {took:.1f} s after SIGKILL")
        assert statuses["interrupted"] >= 1, "the replica was killed while it ran something"
        assert took <= 15, f"taken over after {took:.1f} s (documented: within 15 s)"


async def test_postgres_restarted_twice_mid_burst_the_replicas_heal_and_nothing_runs_twice(stack, new_account, login_author,
                                                                                        reader, tmp_path, postgres, pg_url):
    """1,000 invocations from 10 authors on 3 replicas, and Postgres stopped under them twice
    (pg_ctl stop -m fast, then -m immediate, each down a second) and started again: the replicas
    reconnect by themselves, none exits, every invocation succeeds exactly once."""
    async with _burst("pgdown", stack, new_account, login_author, tmp_path, pg_url) as (runner, procs, uris, runs):
        began = time.monotonic()
        healed = []
        for share, mode in ((5, "fast"), (2, "immediate")):
            await _until(pg_url, DONE, len(uris) // share)
            before = _count(pg_url, DONE)
            await asyncio.to_thread(postgres.restart, mode, 1.0)
            back = time.monotonic()
            await _until(pg_url, DONE, before + 10, timeout=60)  # work goes on
            healed.append(time.monotonic() - back)
        results = await _all_results(reader, runner.did, set(uris.values()), tmp_path, timeout=300)
        finished = time.monotonic() - began
        statuses = _ran_once(uris, results, runs)
        print(f"Postgres restarted twice mid-burst: {len(uris)} invocations on 3 replicas, every result in {finished:.1f} s; "
              f"{dict(statuses)}; ten more done {healed[0]:.1f} s and {healed[1]:.1f} s after each start")
        assert statuses == {"success": len(uris)}, "a restart of the database loses nothing and interrupts nothing"
        assert [p.poll() for p in procs] == [None] * len(procs), "no replica exited"


def _slot_of(url: str, did: str, replicas: int) -> int:
    """Which of ``replicas`` live executing replicas (in id order) an author is assigned to when
    nothing is open anywhere (migration 8's tie between replicas of equally little open work is
    broken by migration 3's hash): known before the replicas start."""
    with psycopg.connect(url, autocommit=True) as db:
        return db.execute("SELECT (hashtext(%s) & 2147483647) %% %s", (did, replicas)).fetchone()[0]


async def test_two_authors_flood_500_each_and_the_others_still_start_within_a_few_executions(stack, new_account, login_author,
                                                                                           reader, tmp_path, pg_url):
    """Fairness across the fleet: two authors post 500 invocations each, each allowed to take
    every slot of its replica (per-author concurrency = concurrency = 4); the second flood goes
    to the other replica (the least open work: migration 8), so both are flooded (firehose
    ingest: both floods are stored within seconds, before they have run down). Once they are
    under way, three others post three each, necessarily onto a flooded replica. Round-robin
    between authors (atrund.schedule) bounds each of theirs: few of its replica's flood's
    executions start between its arrival and its start, where first-come-first-served would put
    it behind hundreds."""
    runner = new_account("flood")
    floods = [await login_author(f"flooder{n}") for n in range(2)]
    others = [await login_author("other") for _ in range(3)]
    runs = tmp_path / "runs.txt"
    procs = _serve(2, stack, runner, floods[0], tmp_path, pg_url, allow=[a.account.did for a in [*floods, *others]],
                   limits=UNLIMITED + "per_author_concurrency = 4\n", edit=_firehose)
    try:
        await _replicas_up(pg_url, 2)
        bundles = [await flood.publish(_counting_bundle(runs)) for flood in floods]
        await asyncio.gather(*(_post([flood], bundle, runner.did, 500, ms=100, tag=f"flood{n}")
                               for n, (flood, bundle) in enumerate(zip(floods, bundles, strict=True))))
        await _until(pg_url, "SELECT count(*) FROM invocations", 1000, 60)
        await _until(pg_url, DONE, 40)
        with psycopg.connect(pg_url, autocommit=True) as db:
            flooded = dict(db.execute("SELECT DISTINCT replica, author FROM invocations").fetchall())  # replica -> flooder
        assert sorted(flooded.values()) == sorted(f.account.did for f in floods), "one flood on each replica"
        mine = [await a.publish(_counting_bundle(runs)) for a in others]
        posted = [await _post([a], b, runner.did, 3, ms=100, tag=f"other{n}") for n, (a, b) in enumerate(zip(others, mine,
                                                                                                           strict=True))]
        theirs = {k: u for part in posted for k, u in part.items()}
        results = await _all_results(reader, runner.did, set(theirs.values()), tmp_path, timeout=120)
        assert all(results[u]["status"] == "success" for u in theirs.values())
        with psycopg.connect(pg_url, autocommit=True) as db:
            starts = {did: sorted(t for (t,) in db.execute("SELECT started_at FROM invocations WHERE author = %s AND "
                                                           "started_at IS NOT NULL", (did,))) for did in flooded.values()}
            rows = db.execute("SELECT uri, seen_at, started_at, replica FROM invocations WHERE uri = ANY(%s)",
                              (list(theirs.values()),)).fetchall()
        assert {replica for *_, replica in rows} <= set(flooded), "every other ran on a flooded replica"
        ahead = {uri: sum(seen < t < started for t in starts[flooded[replica]]) for uri, seen, started, replica in rows}
        backlog = {uri: 500 - sum(t < seen for t in starts[flooded[replica]]) for uri, seen, _, replica in rows}  # FIFO
        print(f"fairness flood: the others' invocations started after {sorted(ahead.values())} of their replica's flood's "
              f"executions (first-come-first-served: behind {min(backlog.values())}-{max(backlog.values())}); "
              f"{len(rows)} on the 2 flooded replicas")
        assert min(backlog.values()) >= 100, "the others came while the floods were still waiting"
        # Measured: at most 10 (the flood keeps starting while the store tells the replica of new
        # work, and the ring gives the flood one turn in three). 4 per slot of the replica:
        assert max(ahead.values()) <= 4 * 4, "each starts within a few of the flood's executions per slot"
    finally:
        _stop(procs)


async def test_new_authors_invocations_of_a_bundle_go_to_the_replica_hot_for_it(stack, new_account, login_author, reader,
                                                                               tmp_path, pg_url):
    """Hot routing with real replicas: once one replica has run a bundle (and keeps a worker hot
    for it), new authors' invocations of it run there too, even those of authors the hash sends
    to the other replica; they reuse its hot worker."""
    runner = new_account("hot")
    first = await login_author("hotfirst")
    others = []  # authors the hash puts on the replica the first author's is not on
    while len(others) < 3:
        a = await login_author("hotother")
        if _slot_of(pg_url, a.account.did, 2) != _slot_of(pg_url, first.account.did, 2):
            others.append(a)
    bundle = await first.publish("import os\ndef main(args):\n    return {'pid': os.getpid()}\n")
    procs = _serve(2, stack, runner, first, tmp_path, pg_url, allow=[a.account.did for a in [first, *others]])
    try:
        await _replicas_up(pg_url, 2)
        worker = (await wait_result(reader, runner.did, await first.invoke(bundle, runner.did)))["data"]["pid"]
        told = "SELECT count(*) FROM replicas WHERE %s = ANY(hot)"
        deadline = time.monotonic() + 2 * HEARTBEAT
        while not _count(pg_url, told, bundle["cid"]):
            assert time.monotonic() < deadline, "the replica that ran the bundle told the fleet it is hot for it"
            await asyncio.sleep(0.05)
        pids = [(await wait_result(reader, runner.did, await a.invoke(bundle, runner.did)))["data"]["pid"] for a in others]
        with psycopg.connect(pg_url, autocommit=True) as db:
            ran_on = {r for (r,) in db.execute("SELECT DISTINCT replica FROM invocations WHERE state = 'done'")}
        assert len(ran_on) == 1, "every one ran on the hot replica, not where the hash of its author points"
        assert pids == [worker] * len(others), "in the worker kept hot from the first run"
    finally:
        _stop(procs)


# -- replicas as separate hosts: each in its own network namespace, over veth (tests/netns.py) ----

@pytest.fixture
def hosts(stack):
    """A bridge with the host's relay to the stack, and a Postgres of its own listening on the
    bridge's host address too; replicas join it each in a network namespace of its own (all
    removed after the test, failed or not). (the Subnet, the Postgres URL on loopback)"""
    from urllib.parse import urlsplit

    from atrund.dev.postgres import LocalPostgres, server_bin

    if why := netns.available():
        pytest.skip(why)
    if server_bin() is None:
        pytest.skip("Postgres is not installed (scripts/setup installs Debian's postgresql)")
    with netns.Subnet([urlsplit(stack.pds_url).port, urlsplit(stack.plc_url).port]) as net, \
            LocalPostgres(also_listen=net.host, trusted=f"{net.prefix}.0/24") as pg:
        yield net, pg.url


def _in_namespaces(procs: list, net: netns.Subnet, pg_url: str) -> None:
    """Each replica runs in its own namespace, none in this host's, and Postgres sees each
    connect from its namespace's address."""
    spaces = [os.stat(f"/proc/{p.pid}/ns/net").st_ino for p in procs]
    assert len(set(spaces)) == len(procs) and os.stat("/proc/self/ns/net").st_ino not in spaces, spaces
    assert spaces == [os.stat(f"/run/netns/{name}").st_ino for name in net.spaces]
    with psycopg.connect(pg_url, autocommit=True) as db:
        seen = {str(a) for (a,) in db.execute("SELECT DISTINCT client_addr FROM pg_stat_activity "
                                               "WHERE application_name LIKE 'atrund%'")}
    assert seen == {net.address(n) for n in range(len(procs))}, seen


async def test_three_replicas_each_in_its_own_network_namespace_share_a_burst_and_nothing_runs_twice(
        stack, new_account, login_author, reader, tmp_path, hosts):
    """Three replicas, each a host of its own (a network namespace, a veth to a bridge, an
    address), reach Postgres, the PDS and the PLC over the bridge; 10 authors post 30 each: every
    invocation gets exactly one result, each ran once, and the work was spread over them.

    Hot affinity is off here: with it, all of one bundle's work goes to the replica hot for it
    while that replica keeps up (which a 20 ms bundle lets it do: CI once saw 300 of 300 there),
    and spreading is what the least open work gives (migration 8: an author with nothing open
    goes to the replica holding the fewest open invocations; the hash only breaks ties)."""
    hosts, pg_url = hosts
    async with _burst("nsburst", stack, new_account, login_author, tmp_path, pg_url, authors=10, per_author=30, ms=20,
                      net=hosts, edit=_no_hot_affinity) as (runner, procs, uris, runs):
        began = time.monotonic()
        _in_namespaces(procs, hosts, pg_url)
        results = await _all_results(reader, runner.did, set(uris.values()), tmp_path, timeout=240)
        statuses = _ran_once(uris, results, runs)
        ran_on = collections.Counter(int(line.split()[1]) for line in runs.read_text().splitlines())
        print(f"namespaced burst: {len(uris)} invocations from 10 authors on 3 replicas over veth, every result in "
              f"{time.monotonic() - began:.1f} s; executions per replica {sorted(ran_on.values())}")
        assert statuses == {"success": len(uris)}
        assert set(ran_on) <= {p.pid for p in procs} and len(ran_on) >= 2, f"ran on {ran_on}"


async def test_the_firehose_ingest_leader_in_its_namespace_killed_the_standby_resumes_from_the_cursor(
        stack, new_account, author, reader, tmp_path, hosts):
    """Two namespaced replicas ingesting from the PDS's firehose; the leader is killed with
    SIGKILL and invocations are posted while nobody leads: the standby takes the lead, resumes
    from the stored cursor, and runs each of them, with those from before, exactly once."""
    hosts, pg_url = hosts
    runner = new_account("nsfire")
    counter = tmp_path / "runs.txt"
    bundle = await author.publish(f"def main(args):\n    open({str(counter)!r}, 'a').write(args['n'] + '\\n')\n"
                                  "    return {'ok': True}\n")
    procs = _serve(2, stack, runner, author, tmp_path, pg_url, net=hosts, edit=_firehose)
    try:
        await _replicas_up(pg_url, 2)
        _in_namespaces(procs, hosts, pg_url)
        before = [await author.invoke(bundle, runner.did, args={"n": f"before{i}"}) for i in range(3)]
        for uri in before:
            assert (await wait_result(reader, runner.did, uri))["status"] == "success"
        leader, killed = _kill_leader(procs, pg_url)
        during = [await author.invoke(bundle, runner.did, args={"n": f"during{i}"}) for i in range(3)]
        took = await _new_leader(pg_url, leader, killed, 10)
        after = [await author.invoke(bundle, runner.did, args={"n": f"after{i}"}) for i in range(3)]
        for uri in during + after:
            assert (await wait_result(reader, runner.did, uri))["status"] == "success"
        ran = time.monotonic() - killed
        print(f"firehose ingest failover over veth: a standby leads {took:.2f} s after the leader's SIGKILL; "
              f"what was posted meanwhile ran within {ran:.1f} s")
        assert took <= 5
        await asyncio.sleep(1.0)
        assert sorted(counter.read_text().split()) == sorted(f"{w}{i}" for w in ("before", "during", "after")
                                                            for i in range(3)), "nothing skipped, nothing repeated"
    finally:
        _stop(procs)


def _ids(url: str) -> list[tuple[str, int]]:
    """The live replicas, (id, pid), in id order: the order migration 3's hash indexes."""
    with psycopg.connect(url, autocommit=True) as db:
        return db.execute("SELECT id, pid FROM replicas WHERE heartbeat_at > clock_timestamp() - make_interval(secs => %s) "
                          "ORDER BY id", (LEASE,)).fetchall()


async def _author_on(url: str, login_author, slot: int, replicas: int):
    """A new author whom the hash assigns to the ``slot``-th of ``replicas`` live replicas (when
    nothing is open anywhere: ``_slot_of``)."""
    while _slot_of(url, (a := await login_author("nscut")).account.did, replicas) != slot:
        pass
    return a


async def test_the_ingest_leader_cut_off_by_its_veth_is_presumed_dead_deposed_and_rejoins_when_the_link_is_back(
        stack, new_account, login_author, reader, tmp_path, hosts):
    """A network partition: the veth of the ingest leader, running a 12 s invocation, goes
    down. Postgres keeps its session (and so the ingest lock) until TCP gives up; once its lease
    lapses another replica records the run as interrupted, ends that session and leads, and the
    fleet goes on serving. When the link is back the cut-off replica heartbeats again under its
    id, stands by, its run's late end writes no second result (nothing ran twice; its log says
    the outcome was not kept), and it runs new work."""
    hosts, pg_url = hosts
    runner = new_account("nscut")
    runs, ends = tmp_path / "runs.txt", tmp_path / "ends.txt"
    source = (f"import os, time\ndef main(args):\n    open({str(runs)!r}, 'a').write(args['k'] + ' ' + str(os.getppid()) + '\\n')\n"
              f"    time.sleep(args['ms'] / 1000)\n    open({str(ends)!r}, 'a').write(args['k'] + '\\n')\n"
              "    return {'k': args['k']}\n")
    procs = _serve(3, stack, runner, None, tmp_path, pg_url, net=hosts, edit=_open, allow=["did:plc:none"])
    try:
        await _replicas_up(pg_url, 3)
        deadline = time.monotonic() + 10
        while (leader := _leader(pg_url)) is None:
            assert time.monotonic() < deadline, "nobody leads ingest"
            await asyncio.sleep(0.1)
        fleet = _ids(pg_url)
        slot, (victim_id, victim_pid) = next((n, r) for n, r in enumerate(fleet) if r[1] == leader)
        n = next(n for n, p in enumerate(procs) if p.pid == victim_pid)
        slow_author = await _author_on(pg_url, login_author, slot, 3)
        slow = await slow_author.invoke(await slow_author.publish(source + "# slow\n"), runner.did, args={"k": "slow", "ms": 12000})
        await _until(pg_url, f"SELECT count(*) FROM invocations WHERE state = 'running' AND replica = '{victim_id}'", 1, 30)
        hosts.cut(n)
        cut = time.monotonic()
        value = await wait_result(reader, runner.did, slow, timeout=LEASE + HEARTBEAT + 20)
        interrupted = time.monotonic() - cut
        assert value["status"] == "error" and value["error"].startswith("interrupted:"), value
        deposed = await _new_leader(pg_url, leader, cut, LEASE + HEARTBEAT + 10)
        other = await login_author("nsother")  # the fleet serves on meanwhile
        quick = await other.invoke(await other.publish(source + "# meanwhile\n"), runner.did, args={"k": "meanwhile", "ms": 0})
        assert (await wait_result(reader, runner.did, quick))["status"] == "success"
        hosts.mend(n)
        mended = time.monotonic()
        while victim_id not in dict(_ids(pg_url)):
            assert time.monotonic() - mended < 60, "the cut-off replica did not heartbeat again after the link came back"
            await asyncio.sleep(0.2)
        rejoined = time.monotonic() - mended
        assert procs[n].poll() is None, "the cut-off replica kept running"
        late_author = await _author_on(pg_url, login_author, [i for i, _ in _ids(pg_url)].index(victim_id), 3)
        late = await late_author.invoke(await late_author.publish(source + "# late\n"), runner.did, args={"k": "late", "ms": 0})
        assert (await wait_result(reader, runner.did, late))["status"] == "success"
        for _ in range(300):  # the slow run ends on the rejoined replica: its result is not written again
            if ends.exists() and "slow" in ends.read_text().split():
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2 * HEARTBEAT)
        print(f"partition over veth: the cut-off leader's run recorded as interrupted {interrupted:.1f} s after the cut "
              f"(lease {LEASE} s), a standby leads ingest after {deposed:.1f} s; back {rejoined:.1f} s after the link came up")
        assert _leader(pg_url) not in (None, leader), "the deposed leader stands by"
        records = [r for r in (await reader.list_records(runner.did, RESULT, None))[0]
                   if r["value"]["invocation"]["uri"] == slow]
        assert [r["value"]["status"] for r in records] == ["error"], "one result: the interrupted one"
        ran = collections.Counter(line.split()[0] for line in runs.read_text().splitlines())
        assert ran == {"slow": 1, "meanwhile": 1, "late": 1}, ran
        assert f"late {victim_pid}" in runs.read_text().splitlines(), "the rejoined replica runs new work"
        log = (tmp_path / f"replica{n}" / "serve.log").read_text()
        assert "outcome not kept" in log, "the late end is logged as dropped"
        assert "ingest leadership lost" in log
        assert interrupted <= 15, f"interrupted after {interrupted:.1f} s (documented: within 15 s)"
    finally:
        _stop(procs)
