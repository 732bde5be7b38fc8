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
    assert second.app.state.counts()["done"] == 2  # nothing ran twice


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
    assert second.app.state.status_of(doomed) == ("withdrawn", None)
    assert await no_result(reader, second.did, doomed, settle=0.5)


class Pipe:
    """A TCP pipe on loopback between the runner and the real PDS, which the test can cut
    (every live connection reset, new ones refused) and restore on the same port. The PDS and
    its firehose are real; only the network between is ours to break."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.Transport] = set()
        self.connections = 0

    async def open(self) -> "Pipe":
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.transports |= {writer.transport, up_writer.transport}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    async def cut(self) -> None:
        self.server.close()
        for transport in self.transports:
            transport.abort()  # RST: the runner's socket dies mid-stream
        self.transports.clear()
        await self.server.wait_closed()


async def test_an_invocation_posted_while_the_socket_is_cut_runs_once_after_reconnect(author, make_runner, new_account,
                                                                                       reader, stack):
    """Real PDS firehose through a pipe: the connection is reset and new ones refused while an
    invocation is posted; when the network is back the runner reconnects from its cursor and
    runs it, once (and nothing that ran before the cut runs again)."""
    from urllib.parse import urlparse

    pipe = await Pipe(urlparse(stack.pds_url).port).open()
    sections = {"access": {"allowlist": [author.account.did]},
                "ingest": {"mode": "firehose", "reconcile_interval": 3600, "firehose_url": f"ws://127.0.0.1:{pipe.port}"}}
    runner = await make_runner(account=new_account("fhcut"), **sections)
    bundle = await author.publish(HELLO)
    before = await author.invoke(bundle, runner.did, args={"n": 1})
    assert (await wait_result(reader, runner.did, before))["data"] == {"n": 1}
    await pipe.cut()
    during = await author.invoke(bundle, runner.did, args={"n": 2})
    assert await no_result(reader, runner.did, during, settle=1.5)  # nothing reaches the runner now
    await pipe.open()
    assert (await wait_result(reader, runner.did, during))["data"] == {"n": 2}
    await asyncio.sleep(1.0)
    assert runner.app.state.counts()["done"] == 2  # the replay after reconnect ran nothing twice
    assert pipe.connections >= 2
    pipe.server.close()
