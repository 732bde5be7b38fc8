"""Firehose ingest against the real local PDS's subscribeRepos: invoked while running, and while
stopped (resumed from the stored cursor), each invocation runs exactly once."""

import asyncio

from conftest import no_result, wait_result

HELLO = "def main(args):\n    return {'n': args.get('n')}\n"


async def test_firehose_runs_each_invocation_once_across_a_restart(author, make_runner, new_account, reader):
    account = new_account("fh")
    sections = {"access": {"allowlist": [author.account.did]}, "ingest": {"mode": "firehose", "reconcile_interval": 3600}}
    first = await make_runner(account=account, state_name="fh", **sections)
    bundle = await author.publish(HELLO)
    live = await author.invoke(bundle, first.did, args={"n": 1})
    assert (await wait_result(reader, first.did, live))["data"] == {"n": 1}
    await first.stop()
    while_down = await author.invoke(bundle, account.did, args={"n": 2})
    second = await make_runner(account=account, state_name="fh", **sections)
    assert (await wait_result(reader, second.did, while_down))["data"] == {"n": 2}
    await asyncio.sleep(1.5)
    assert second.daemon.state.counts()["done"] == 2  # nothing ran twice


async def test_an_invocation_deleted_before_it_runs_is_not_run(author, make_runner, new_account, reader):
    """Created and deleted while the runner is down: on restart the stream replays the create
    (proven from the frame) and then the delete, which withdraws it; and if the scheduler gets to
    it first, the check just before it starts finds the record gone. Either way: not run, and no
    result record."""
    from atrund.records import INVOCATION

    account = new_account("fh")
    sections = {"access": {"allowlist": [author.account.did]}, "ingest": {"mode": "firehose", "reconcile_interval": 3600}}
    first = await make_runner(account=account, state_name="fh2", **sections)
    bundle = await author.publish(HELLO)
    await wait_result(reader, first.did, await author.invoke(bundle, first.did, args={"n": 0}))  # the cursor is saved
    await first.stop()
    doomed = await author.invoke(bundle, account.did, args={"n": 3})
    await author.session.delete_record(INVOCATION, doomed.rsplit("/", 1)[1])
    kept = await author.invoke(bundle, account.did, args={"n": 4})
    second = await make_runner(account=account, state_name="fh2", **sections)
    assert (await wait_result(reader, second.did, kept))["data"] == {"n": 4}
    assert second.daemon.state.status_of(doomed) == ("withdrawn", None)
    assert await no_result(reader, second.did, doomed, settle=0.5)
