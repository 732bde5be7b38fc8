"""dev.atrun.trigger against the real local PDS and its firehose: a like fires once with the event
in args, a doctored frame fires nothing, deletes fire only when asked, results=none writes
nothing, a flood is rate-limited and counted without holding up other authors, wildcards are refused."""

import asyncio
import time

import coincurve
from conftest import no_result, wait_result
from relay import send
from test_firehose_scenarios import doctor, genuine_frame, resign_with

from atrund import client
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.atproto.uri import new_tid
from atrund.config import TriggersSection
from atrund.ingest import Intake
from atrund.ingest.firehose import Firehose
from atrund.records import TRIGGER, Result, firing_key, now_iso
from atrund.state import State
from atrund.triggers import Triggers

ECHO = '''
def main(args):
    return {"event": args["event"], "note": args.get("note")}
'''
LIKE, POST = "app.bsky.feed.like", "app.bsky.feed.post"


async def post(author, text: str = "hello") -> dict[str, str]:
    uri, cid = await author.session.create_record(POST, {"text": text, "createdAt": now_iso()})
    return {"uri": uri, "cid": cid}


async def like(who, subject: dict[str, str]) -> tuple[str, str]:
    return await who.session.create_record(LIKE, {"subject": subject, "createdAt": now_iso()})


async def trigger(author, bundle, runner_did, collections=(LIKE,), **fields) -> str:
    uri, _ = await client.create_trigger(author.session, author.repos, bundle["uri"], runner_did, "main", list(collections),
                                         cid=bundle["cid"], **fields)
    return uri


async def until(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def firehose_runner(make_runner, author, **triggers):
    return await make_runner(access={"allowlist": [author.account.did]}, ingest={"mode": "firehose", "poll_interval": 0.2},
                             triggers=triggers)


async def test_a_like_of_my_post_fires_once_with_the_event_in_args(author, login_author, make_runner, reader):
    runner = await firehose_runner(make_runner, author)
    bundle = await author.publish(ECHO)
    uri = await trigger(author, bundle, runner.did, subject="self", results="all", args={"note": "liked"})
    await until(lambda: uri in runner.app.triggers.live, "the trigger taken")
    mine, other = await post(author), await post(await login_author("stranger"))
    fan = await login_author("fan")
    liked, liked_cid = await like(fan, mine)
    await like(fan, other)  # not the trigger author's: no firing
    key = firing_key(uri, liked, liked_cid)
    value = await wait_result(reader, runner.did, key)
    result = Result.model_validate(value)
    assert result.status == "success" and result.invocation is None
    assert (result.trigger.uri, result.event, result.event_cid) == (uri, liked, liked_cid)
    event = result.value()["event"]
    assert (event["uri"], event["cid"], event["action"], event["author"]) == (liked, liked_cid, "create", fan.account.did)
    assert {k: event["record"]["subject"][k] for k in ("uri", "cid")} == mine and event["time"]
    assert result.value()["note"] == "liked"
    await asyncio.sleep(1)
    fired = [inv.uri for inv in runner.app.state.with_state("done") if inv.uri.startswith(uri + "#")]
    assert fired == [key]  # once, and only for the like of my post
    listed = await client.results_of(reader, uri, runner.did)
    assert [(r["trigger"], r["event"]) for r in listed] == [(uri, liked)]


async def test_a_delete_fires_only_if_asked_and_results_none_writes_nothing(author, login_author, make_runner, reader):
    runner = await firehose_runner(make_runner, author)
    bundle = await author.publish(ECHO)
    on_create = await trigger(author, bundle, runner.did, subject="self", results="none")
    on_delete = await trigger(author, bundle, runner.did, actions=["delete"], results="all")
    await until(lambda: {on_create, on_delete} <= set(runner.app.triggers.live), "the triggers taken")
    fan = await login_author("fan")
    liked, cid = await like(fan, await post(author))
    created = firing_key(on_create, liked, cid)
    await until(lambda: runner.app.state.status_of(created) == ("done", "success"), "the create firing run")
    assert await no_result(reader, runner.did, created)  # results = none
    await fan.session.delete_record(LIKE, liked.rsplit("/", 1)[1])
    value = await wait_result(reader, runner.did, firing_key(on_delete, liked, None))
    event = Result.model_validate(value).value()["event"]
    assert (event["action"], event["uri"], event["cid"], event["record"]) == ("delete", liked, None, None)
    assert runner.app.state.status_of(firing_key(on_create, liked, None)) is None  # the create trigger did not fire on it


async def test_a_doctored_frame_does_not_fire(stack, author, login_author, reader, new_account, tmp_path):
    """The PDS's real frame of a like, re-signed with another key, fires nothing; the genuine
    frame after it fires once."""
    from relay import Relay

    runner_did = new_account("trg").did
    bundle = await author.publish(ECHO)
    relay = await Relay().start()
    repos = Repos(Identities(stack.plc_url, allow_private_addresses=True))
    state = State(tmp_path / "state" / "atrund.db")
    queued: list[str] = []
    from atrund.access import AccessPolicy

    policy = AccessPolicy("allowlist", frozenset({author.account.did}), frozenset())
    triggers = Triggers(state, repos, policy, runner_did, queued.append, TriggersSection())
    firehose = Firehose(relay.url, repos, Intake(state, runner_did, policy, lambda uri: None), triggers)
    task = None
    try:
        uri = await trigger(author, bundle, runner_did, subject="self")
        await triggers.sync([author.account.did])
        assert uri in triggers.live
        fan = await login_author("fan")
        liked, cid = await like(fan, await post(author))
        frame = await genuine_frame(stack, liked)
        relay.scripts = [send(doctor(frame, 500, resign_with(coincurve.PrivateKey())), doctor(frame, 501))]
        task = asyncio.create_task(firehose.run())
        await until(lambda: firehose.counters.frames >= 2 and triggers.fired >= 1, "both frames")
        assert firehose.counters.forged == 1 and triggers.fired == 1
        triggers.release(time.monotonic())
        assert queued == [firing_key(uri, liked, cid)]
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await relay.close()
        await repos.close()
        state.close()


async def test_a_flood_is_rate_limited_without_holding_up_other_authors(author, login_author, make_runner, reader):
    """5,000 likes of one author's post in 25 commits: the trigger takes its backlog, drops the
    rest (counted in /metrics and the status figures), and another author's invocation posted
    during the flood is answered as quickly as ever."""
    other = await login_author("other")
    runner = await make_runner(access={"allowlist": [author.account.did, other.account.did]},
                               ingest={"mode": "firehose", "poll_interval": 0.2}, triggers={"per_minute": 60, "backlog": 100})
    bundle = await author.publish(ECHO)
    uri = await trigger(author, bundle, runner.did, subject="self", results="none")
    await until(lambda: uri in runner.app.triggers.live, "the trigger taken")
    mine = await post(author)
    fan = await login_author("fan")
    flood = time.monotonic()
    for _ in range(25):
        await fan.session.apply_creates(LIKE, [(new_tid(), {"subject": mine, "createdAt": now_iso()}) for _ in range(200)])
    other_bundle = await other.publish(ECHO.replace('args["event"]', 'args.get("event")'))
    started = time.monotonic()
    inv = await other.invoke(other_bundle, runner.did, args={"note": "me too"})
    await wait_result(reader, runner.did, inv, timeout=30)
    assert time.monotonic() - started < 15
    t = runner.app.triggers
    await until(lambda: t.fired + t.dropped >= 5000, "every like matched", timeout=60)
    # the burst (60), the backlog (100), and what the rate (1/s) released meanwhile; the rest dropped
    assert t.fired <= 60 + 100 + (time.monotonic() - flood) + 1 and t.fired + t.dropped == 5000
    figures = runner.app.status.figures()["triggers"]
    assert figures["dropped"] == t.dropped and figures["by_trigger"][uri]["dropped"] == t.dropped
    metrics = runner.app.meters.render().decode()
    assert f"atrund_trigger_drops_total {float(t.dropped)}" in metrics


async def test_a_trigger_on_everything_is_refused(author, make_runner, reader):
    runner = await firehose_runner(make_runner, author)
    bundle = await author.publish(ECHO)
    rec = client.trigger_record(runner.did, bundle, "main", ["*"])
    star, _ = await author.session.create_record(TRIGGER, rec)
    fine = await trigger(author, bundle, runner.did)
    await until(lambda: fine in runner.app.triggers.live, "the valid trigger taken")
    assert star not in runner.app.triggers.live
    assert "no wildcards" in runner.app.triggers.standings.refused[star][1]
    assert runner.app.triggers.followed == {b"app.bsky.feed.like"}
