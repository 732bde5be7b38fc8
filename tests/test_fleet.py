"""What replicas share (issue 14): two runners of one account on one Postgres (the test starts
it), each an App serving in this event loop with its own state.dir and gateway. An access edit
made with one replica's configuration reaches both; a service-auth token used on one is refused
by the other; the gateway's rate is shared out between the live gateways; concurrent runs of
one bundle on both keep its state serialisable (50 increments end at 50), and a run that lost its
namespace's lock commits nothing; each replica's /metrics says who it is, whether it leads
ingest, its lease, its claim lag and Postgres's round trip.

(Killed replicas, leadership and roles, with real `atrund serve` processes: test_replicas.py.)
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import psycopg
import pytest
from conftest import atrund, serve_config, wait_result
from test_bundle_state import COUNTER, state_of
from test_xrpc import BUNDLE, invoke, token

from atrund.access import policy_at
from atrund.atproto.uri import AtUri
from atrund.pgstate import HEARTBEAT

NOBODY = "did:plc:fleetnobodyyetxxxxxxxxxx"


@pytest.fixture
def two_replicas(make_runner, new_account, pg_url):
    """Start two replicas of one new runner account on one database: ``(a, b)``."""

    async def start(**sections) -> tuple:
        account = new_account("fleet")
        state = {**sections.pop("state", {}), "url": pg_url}
        a = await make_runner(account=account, state_name="a", state=state, **sections)
        b = await make_runner(account=account, state_name="b", state=state, **sections)
        return a, b

    return start


async def _until(check, what: str, timeout: float = 10.0) -> float:
    """Seconds until ``check()`` holds; fails naming ``what`` after ``timeout``."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_an_access_edit_made_with_one_replicas_configuration_reaches_both(two_replicas, author, stack, tmp_path,
                                                                               pg_url):
    """`atrund access allow|deny` with replica a's configuration writes the shared database;
    both replicas apply it within a second or two (each checks every second)."""
    a, b = await two_replicas(access={"allowlist": [author.account.did]})
    assert not a.app.policy.allows(NOBODY) and not b.app.policy.allows(NOBODY)
    (tmp_path / "cli").mkdir()
    config = serve_config(tmp_path / "cli", stack, a.account, author, state={"url": pg_url})  # as an operator's
    done = atrund("access", "allow", NOBODY, "-c", str(config))
    assert done.returncode == 0 and "the state database" in done.stderr, done.stderr
    await _until(lambda: a.app.policy.allows(NOBODY) and b.app.policy.allows(NOBODY), "the allow on both replicas", 3.0)
    listed = atrund("access", "list", "-c", str(config))
    assert listed.returncode == 0 and '"from": "database"' in listed.stdout and NOBODY in listed.stdout, listed.stdout
    # How soon: the edit the command makes, made here, timed from its commit.
    policy_at(None, pg_url).deny(NOBODY)
    seen = await _until(lambda: not a.app.policy.allows(NOBODY) and not b.app.policy.allows(NOBODY), "the deny on both", 3.0)
    print(f"\nan access edit reached both replicas after {seen:.2f} s")
    assert atrund("access", "deny", author.account.did, "-c", str(config)).returncode == 0  # deny wins over the config's allow
    await _until(lambda: not a.app.policy.allows(author.account.did) and not b.app.policy.allows(author.account.did),
                 "the deny on both replicas", timeout=3.0)


async def test_a_token_used_on_one_replica_is_refused_by_the_other(two_replicas, author, pg_url):
    a, b = await two_replicas(access={"allowlist": [author.account.did]})
    bundle = await author.publish(BUNDLE)
    body = {"bundle": bundle, "endpoint": "main", "args": {"name": "ada"}}
    jwt = await token(author, a.did)
    status, out = await invoke(a.app.gateway.url, jwt, body)
    assert status == 200 and out["data"] == {"greeting": "hello ada"}, out
    status, out = await invoke(b.app.gateway.url, jwt, body)
    assert status == 401 and out["error"] == "InvalidToken" and "already used" in out["message"], out
    status, out = await invoke(a.app.gateway.url, jwt, body)
    assert status == 401 and "already used" in out["message"], "and on the first replica again"
    status, out = await invoke(b.app.gateway.url, await token(author, a.did), body)
    assert status == 200, "a new token is served by either"
    with psycopg.connect(pg_url, autocommit=True) as db:  # the fleet's memory of tokens breaks
        db.execute("ALTER TABLE used_tokens RENAME TO used_tokens_gone")
    status, out = await invoke(a.app.gateway.url, await token(author, a.did), body)
    assert status == 503 and out["error"] == "StoreUnavailable", "a token whose single use cannot be checked is refused"


async def test_the_gateway_rate_is_shared_out_between_live_gateways(two_replicas, author):
    """Each of two live gateways serves half the configured burst (and rate) of a bundle, so the
    fleet serves what one runner would; when one stops, the other takes the whole rate at its
    next heartbeat."""
    a, b = await two_replicas(access={"allowlist": [author.account.did]},
                              gateway={"listen": "127.0.0.1:0", "rate_per_minute": 1, "burst": 4})
    await _until(lambda: a.app.state.replicas_with("gateway") == 2 and b.app.state.replicas_with("gateway") == 2,
                 "both replicas counting two gateways", timeout=3 * HEARTBEAT)
    bundle = await author.publish(COUNTER)
    path = f"/{author.account.did}/{AtUri.parse(bundle['uri']).rkey}/"
    async with aiohttp.ClientSession() as http:

        async def statuses(runner, n: int) -> list[int]:
            out = []
            for _ in range(n):
                async with http.get(runner.app.gateway.url + path) as resp:
                    out.append(resp.status)
            return out

        assert await statuses(a, 3) == [200, 200, 429]
        assert await statuses(b, 3) == [200, 200, 429]
        await b.stop()  # a clean stop leaves the fleet at once
        await _until(lambda: a.app.state.replicas_with("gateway") == 1, "a alone", timeout=3 * HEARTBEAT)
        assert a.app.gateway.limiter.take(("did:plc:other", "rk")) == 0.0  # a new bucket: the whole burst of 4
        assert [a.app.gateway.limiter.take(("did:plc:other", "rk")) == 0.0 for _ in range(4)] == [True, True, True, False]


async def test_50_concurrent_increments_split_between_two_replicas_end_at_exactly_50(two_replicas, author):
    """The namespace lock is the fleet's: 25 requests to each replica's gateway at once, each a
    read-modify-write of one key; every answer saw every earlier commit, whichever replica made it."""
    a, b = await two_replicas(access={"allowlist": [author.account.did]}, executor={"concurrency": 8},
                              gateway={"listen": "127.0.0.1:0", "rate_per_minute": 60000, "burst": 1000})
    bundle = await author.publish(COUNTER)
    path = f"/{author.account.did}/{AtUri.parse(bundle['uri']).rkey}/"
    async with aiohttp.ClientSession() as http:

        async def one(runner) -> int:
            async with http.get(runner.app.gateway.url + path) as resp:
                assert resp.status == 200, await resp.text()
                return int(await resp.text())

        began = time.monotonic()
        seen = await asyncio.gather(*(one(a if n % 2 else b) for n in range(50)))
        print(f"\n50 increments over two replicas: {time.monotonic() - began:.2f} s")
    assert sorted(seen) == list(range(1, 51))
    assert state_of(a, bundle) == {"n": "50"} == state_of(b, bundle)


def _metric(text: str, name: str, labels: str = "") -> float | None:
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return None if found is None else float(found.group(1))


async def test_each_replica_reports_itself_on_metrics_and_healthz(two_replicas, author, reader):
    a, b = await two_replicas(access={"allowlist": [author.account.did]})
    async with aiohttp.ClientSession() as http:

        async def scrape(runner) -> tuple[str, dict]:
            async with http.get(runner.app.gateway.url + "/metrics") as m, http.get(runner.app.gateway.url + "/healthz") as h:
                return await m.text(), (await h.json())["replica"]

        await _until(lambda: a.app.state.figures()["ingestLeader"] or b.app.state.figures()["ingestLeader"], "an ingest leader")
        (text_a, health_a), (text_b, health_b) = await scrape(a), await scrape(b)
        for text, health in ((text_a, health_a), (text_b, health_b)):
            assert _metric(text, "atrund_replica_info", f'{{replica="{health["id"]}"}}') == 1.0
            assert [_metric(text, "atrund_replica_role", f'{{role="{r}"}}') for r in ("ingest", "execute", "gateway")] == [1, 1, 1]
            assert _metric(text, "atrund_replica_ingest_leader") == float(health["ingestLeader"])
            assert _metric(text, "atrund_replica_postgres_up") == 1.0
            assert 0 < _metric(text, "atrund_replica_postgres_round_trip_seconds") < 1
            assert 0 <= _metric(text, "atrund_replica_lease_age_seconds") <= 2 * HEARTBEAT
            assert _metric(text, "atrund_replica_lease_seconds") == health["leaseSeconds"]
        assert _metric(text_a, "atrund_replica_ingest_leader") + _metric(text_b, "atrund_replica_ingest_leader") == 1, \
            "exactly one replica leads ingest"

        # A claim: the replica that ran the invocation counts it, with its lag, and says so on /healthz too.
        bundle = await author.publish(BUNDLE)
        before = [_metric(t, "atrund_claim_lag_seconds_count") for t in (text_a, text_b)]
        uri = await author.invoke(bundle, a.did, "main")
        await wait_result(reader, a.did, uri)
        (after_a, health_a), (after_b, health_b) = await scrape(a), await scrape(b)
        after = [_metric(t, "atrund_claim_lag_seconds_count") for t in (after_a, after_b)]
        assert sorted(n - m for n, m in zip(after, before, strict=True)) == [0, 1], (before, after)
        claimer, health = (after_a, health_a) if after[0] > before[0] else (after_b, health_b)
        lag = _metric(claimer, "atrund_claim_lag_last_seconds")
        assert 0 <= lag < 30 and health["claimLagLastSeconds"] == pytest.approx(lag, abs=0.001)
        assert health["claimLagP50Seconds"] == health["claimLagLastSeconds"]  # one claim so far
        # the lease's age moves between heartbeats and starts again at each
        ages = set()
        for _ in range(6):
            ages.add(_metric((await scrape(a))[0], "atrund_replica_lease_age_seconds"))
            await asyncio.sleep(0.5)
        assert len(ages) > 2 and max(ages) <= 2 * HEARTBEAT


SLOW_SET = '''
import time

def slow_set(args, ctx):
    ctx.state.set("n", 7)
    time.sleep(2)
    return 7
'''


async def test_a_run_whose_namespace_lock_was_taken_commits_nothing(two_replicas, author, reader, pg_url):
    """The commit's version check: the lock row of a running invocation is taken by another
    holder (as when its replica is presumed dead, or it held the lock past its bound); the run
    ends as an error that says so, and nothing it wrote is kept."""
    a, b = await two_replicas(access={"allowlist": [author.account.did]})
    bundle = await author.publish(SLOW_SET)
    uri = await author.invoke(bundle, a.did, "slow_set")
    with psycopg.connect(pg_url, autocommit=True) as db:
        def locked() -> bool:
            return db.execute("UPDATE bundle_state_locks SET holder = 'another run'").rowcount == 1

        await _until(locked, "the run holding its namespace's lock", timeout=30)
    result = await wait_result(reader, a.did, uri)
    assert result["status"] == "error" and "locked by another run" in result["error"], result
    assert state_of(a, bundle) == {}
