"""Poll mode proves what it takes: every listed invocation the runner has not seen, and every
bundle record it fetches, is checked against com.atproto.sync.getRecord's inclusion proof (the
author's signed commit, the MST path, the block hashes), as a firehose frame is. A PDS that
doctors its listRecords or getRecord answers cannot make the runner run what the author did not
sign: the doctored record is refused (or replaced by the signed version), logged and counted.

The PDS and PLC are the real local stack. Between them and the runner's reader sits a small
aiohttp proxy (``Doctor``) that passes every answer through, rewrites DID documents so that
the author's PDS is the proxy, and alters the answers a test asks it to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import aiohttp
import libipld
import pytest
from aiohttp import web
from loopback import serve

from atrund.access import AccessPolicy
from atrund.atproto.identity import Identities
from atrund.atproto.proof import read_car
from atrund.atproto.repos import Repos
from atrund.atproto.uri import AtUri
from atrund.bundles import BundleStore
from atrund.errors import BundleRefused
from atrund.ingest import Intake
from atrund.ingest.poll import Poller
from atrund.records import BUNDLE, INVOCATION, StrongRef
from atrund.state import State

pytestmark = pytest.mark.stack

RUNNER = "did:plc:pollproofrunner00000000"
HELLO = "def main(args):\n    return {'n': args.get('n')}\n"
LIST, SYNC = "com.atproto.repo.listRecords", "com.atproto.sync.getRecord"


class Doctor:
    """A proxy for the stack's PLC (``GET /{did}``, its PDS pointed at the proxy) and PDS
    (``/xrpc/{method}``, forwarded); ``alter[method](query, body)`` rewrites an answer's body."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.alter: dict[str, Callable[[dict[str, str], bytes], bytes]] = {}
        self.url = ""

    async def start(self) -> Doctor:
        self._http = aiohttp.ClientSession()

        async def doc(request: web.Request) -> web.Response:
            async with self._http.get(f"{self.stack.plc_url}/{request.match_info['did']}") as resp:
                body = await resp.json(content_type=None)
            for service in body.get("service", []):
                if service.get("id") == "#atproto_pds":
                    service["serviceEndpoint"] = self.url
            return web.json_response(body)

        async def xrpc(request: web.Request) -> web.Response:
            method = request.match_info["method"]
            async with self._http.get(f"{self.stack.pds_url}/xrpc/{method}", params=request.query) as resp:
                body, status, kind = await resp.read(), resp.status, resp.headers.get("Content-Type", "")
            if status == 200 and method in self.alter:
                body = self.alter[method](dict(request.query), body)
            return web.Response(body=body, status=status, headers={"Content-Type": kind})

        app = web.Application()
        app.router.add_get("/xrpc/{method}", xrpc)
        app.router.add_get("/{did}", doc)
        self._runner, self.url = await serve(app)
        return self

    async def close(self) -> None:
        await self._runner.cleanup()
        await self._http.close()


@pytest.fixture
async def doctor(stack):
    d = await Doctor(stack).start()
    yield d
    await d.close()


@pytest.fixture
async def poll(doctor, author, tmp_path):
    """A real Poller (real Intake and State) reading ``author``'s repo through the doctor."""
    repos = Repos(Identities(doctor.url, allow_private_addresses=True))
    state = State(tmp_path / "state" / "atrund.db")
    intake = Intake(state, RUNNER, AccessPolicy("allowlist", frozenset({author.account.did}), frozenset()), lambda uri: None)
    poller = Poller(repos, intake, [author.account.did], interval=60)
    yield poller
    state.close()
    await repos.close()


async def invocation(author, n: int) -> tuple[str, str]:
    """A real invocation record addressed to RUNNER, in the author's repo: (its URI, rkey)."""
    uri = await author.raw_invocation({"$type": INVOCATION, "runner": RUNNER, "endpoint": "main", "args": {"n": n},
                                       "bundle": {"uri": f"at://{author.account.did}/{BUNDLE}/x", "cid": "bafyreib"},
                                       "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return uri, AtUri.parse(uri).rkey


def stored(poller: Poller, uri: str) -> dict | None:
    row = poller.intake.state.pending(uri)
    return None if row is None else row.value


def listing(edit: Callable[[dict], None]) -> Callable[[dict[str, str], bytes], bytes]:
    """An alteration of listRecords: ``edit`` changes each listed record (a dict) in place."""
    def alter(query: dict[str, str], body: bytes) -> bytes:
        answer = json.loads(body)
        for record in answer["records"]:
            edit(record)
        return json.dumps(answer).encode()
    return alter


def car_with(car: bytes, cid: str, change: Callable[[dict], None]) -> bytes:
    """``car`` with the block of ``cid`` decoded, changed and re-encoded, still under its old CID."""
    size, pos = car[0], 1  # a getRecord CAR's header is under 128 bytes
    assert size < 0x80
    out = bytearray(car[:pos + size])
    wanted = libipld.decode_multibase(cid)[1]
    for key, block in read_car(car).items():
        if key == wanted:
            value = libipld.decode_dag_cbor(block)
            change(value)
            block = libipld.encode_dag_cbor(value)
        section = key + block
        n = len(section)
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        out += section
    return bytes(out)


async def test_an_honest_pds_answer_is_proven_and_taken(poll, author):
    uri, _ = await invocation(author, 1)
    assert await poll.poll_author(author.account.did) == 1
    assert stored(poll, uri)["args"] == {"n": 1} and poll.unproven == 0


async def test_a_doctored_listing_is_replaced_by_what_the_author_signed(poll, doctor, author, capsys):
    """The PDS lists the invocation with other args: the signed version is stored, and the
    doctored one is logged and counted."""
    uri, _ = await invocation(author, 2)
    doctor.alter[LIST] = listing(lambda record: record["value"].update(args={"n": 666}))
    assert await poll.poll_author(author.account.did) == 1
    assert stored(poll, uri)["args"] == {"n": 2}
    assert poll.unproven == 1 and "differs from the author's signed repo" in capsys.readouterr().out


async def test_a_listed_invocation_the_repo_does_not_hold_is_refused(poll, doctor, author, capsys):
    """The PDS lists an invocation under a record key the author never wrote: its proof (or
    the PDS's own answer) says the signed repo has no such record, so it is refused."""
    real, rkey = await invocation(author, 3)
    fake_rkey = "3zzzzzzzzzzzz"
    doctor.alter[LIST] = lambda query, body: json.dumps({"records": [
        *json.loads(body)["records"],
        {**json.loads(body)["records"][0], "uri": real.replace(rkey, fake_rkey)}]}).encode()
    assert await poll.poll_author(author.account.did) == 1
    assert poll.intake.state.status_of(real.replace(rkey, fake_rkey)) is None
    assert stored(poll, real)["args"] == {"n": 3}
    assert poll.unproven == 1 and "listed invocation refused" in capsys.readouterr().out


async def test_a_doctored_get_record_proof_is_refused(poll, doctor, author, capsys):
    """The PDS lists doctored args and doctors the record block of its getRecord CAR to match:
    the block no longer hashes to the CID the signed tree names, so nothing is taken."""
    uri, _ = await invocation(author, 4)
    doctor.alter[LIST] = listing(lambda record: record["value"].update(args={"n": 666}))
    doctor.alter[SYNC] = lambda query, body: car_with(body, cid_of[0], lambda value: value.update(args={"n": 666}))
    cid_of = [(await author.repos.get_record(author.account.did, INVOCATION, AtUri.parse(uri).rkey))[0]]
    assert await poll.poll_author(author.account.did) == 0
    assert poll.intake.state.status_of(uri) is None
    assert poll.unproven == 1 and "does not hash to its CID" in capsys.readouterr().out


async def test_a_bundle_record_behind_a_doctored_proof_is_refused(doctor, author, tmp_path, capsys):
    """The bundle record the runner fetches is proven too: a getRecord CAR whose record block
    was changed (its permissions widened) is a BundleRefused naming the proof, and logged."""
    ref = await author.publish(HELLO)
    repos = Repos(Identities(doctor.url, allow_private_addresses=True))
    try:
        store = BundleStore(repos, tmp_path / "bundles", 1 << 20)
        doctor.alter[SYNC] = lambda query, body: car_with(body, ref["cid"], lambda value: value.update(description="doctored"))
        with pytest.raises(BundleRefused, match="does not prove it is .*does not hash to its CID"):
            await store.get(StrongRef(uri=ref["uri"], cid=ref["cid"]))
        assert "bundle record refused" in capsys.readouterr().out
        del doctor.alter[SYNC]
        verified = await store.get(StrongRef(uri=ref["uri"], cid=ref["cid"]))
        assert verified.record.runtime == "python"
        # The cache is the runner's alone (a worker gets a copy): no other uid may even stat in it.
        cached = [verified.code_path, *(tmp_path / "bundles" / "records").iterdir()]
        assert {oct(p.stat().st_mode & 0o777) for p in cached} == {"0o400"}
        assert {oct(p.parent.stat().st_mode & 0o777) for p in cached} == {"0o700"}
    finally:
        await repos.close()
