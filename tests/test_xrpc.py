"""POST /xrpc/dev.atrun.invoke with service-auth tokens issued by the real local PDS, and every
way a token can be wrong: forged, tampered, expired, for another audience or method, replayed."""

import asyncio
import base64
import json
import time

import aiohttp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from atrund.records import RESULT, result_rkey

INVOKE = "dev.atrun.invoke"
BUNDLE = '''
def main(args):
    return {"greeting": "hello " + args.get("name", "world")}

def boom(args):
    return 1 / 0
'''
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


async def token(author, aud: str, lxm: str | None = INVOKE, exp: int | None = None) -> str:
    """A service-auth JWT from the author's own PDS, as any client would get one."""
    params = {"aud": aud}
    if lxm is not None:
        params["lxm"] = lxm
    if exp is not None:
        params["exp"] = exp
    return (await author.session.client.com.atproto.server.get_service_auth(params)).token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def parts(jwt: str) -> tuple[dict, dict, str]:
    h, p, s = jwt.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(h))), json.loads(base64.urlsafe_b64decode(pad(p))), s


def forge(payload: dict) -> str:
    """A well-formed ES256K token (low-S, as atproto wants) signed by a key nobody published."""
    key = ec.generate_private_key(ec.SECP256K1())
    signing_input = f"{b64(json.dumps({'typ': 'JWT', 'alg': 'ES256K'}).encode())}.{b64(json.dumps(payload).encode())}"
    r, s = utils.decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    s = min(s, SECP256K1_N - s)
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


async def invoke(base: str, jwt: str | None, body: dict | bytes) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {jwt}"} if jwt else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/xrpc/{INVOKE}", data=data, headers={**headers, "Content-Type": "application/json"}) as r:
            return r.status, await r.json()


async def test_a_real_token_runs_the_bundle_synchronously(author, make_runner, reader):
    """The answer has the result record's shape; writeResult also stores it at the computable key."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    base = runner.app.gateway.url
    bundle = await author.publish(BUNDLE)
    status, out = await invoke(base, await token(author, runner.did), {"bundle": bundle, "endpoint": "main", "args": {"name": "ada"}})
    assert status == 200, out
    assert out["status"] == "success" and out["data"] == {"greeting": "hello ada"}
    assert out["caller"] == author.account.did and out["bundle"] == bundle and "invocation" not in out
    assert out["metrics"]["runtime"] == "python" and out["metrics"]["executionTimeMs"] >= 0 and "result" not in out

    status, out = await invoke(base, await token(author, runner.did), {"bundle": bundle, "endpoint": "boom"})
    assert status == 200 and out["status"] == "error" and out["error"].startswith("ZeroDivisionError")

    jwt = await token(author, runner.did)
    status, out = await invoke(base, jwt, {"bundle": bundle, "endpoint": "main", "writeResult": True})
    assert status == 200 and out["status"] == "success"
    jti = parts(jwt)[1]["jti"]
    rkey = result_rkey(f"at://{author.account.did}/{INVOKE}/{jti}")
    assert out["result"]["uri"] == f"at://{runner.did}/{RESULT}/{rkey}"
    _, stored = await reader.get_record(runner.did, RESULT, rkey)
    assert stored["caller"] == author.account.did and stored["data"] == {"greeting": "hello world"}
    assert "invocation" not in stored


async def test_bad_tokens_are_refused_with_401(login_author, author, make_runner):
    """Missing, forged, tampered, wrong audience, wrong or no method, replayed: 401 naming why,
    and the bundle never runs."""
    other = await login_author("other")
    # Both served: a token naming a DID the policy does not serve is refused before its signature
    # is checked (403, tests/test_resilience.py); here every refusal is the token's own.
    runner = await make_runner(access={"allowlist": [author.account.did, other.account.did]})
    base = runner.app.gateway.url
    bundle = await author.publish(BUNDLE)
    body = {"bundle": bundle, "endpoint": "main"}

    async def refused(jwt: str | None, error: str = "InvalidToken") -> str:
        status, out = await invoke(base, jwt, body)
        assert (status, out["error"]) == (401, error), out
        return out["message"]

    assert "service-auth token" in await refused(None, "AuthRequired")
    assert "not a JWT" in await refused("not.a.jwt")

    genuine = await token(author, runner.did)
    _, claims, _ = parts(genuine)
    assert "does not verify" in await refused(forge(claims))  # right claims, wrong key

    h, p, s = genuine.split(".")
    other_claims = {**claims, "iss": other.account.did}  # someone else's DID under the author's signature
    assert "does not verify" in await refused(f"{h}.{b64(json.dumps(other_claims).encode())}.{s}")

    assert "not this runner" in await refused(await token(author, other.account.did))
    assert "bound to method 'dev.atrun.other'" in await refused(await token(author, runner.did, lxm="dev.atrun.other"))
    assert "bound to method None" in await refused(await token(author, runner.did, lxm=None))

    status, out = await invoke(base, genuine, body)
    assert status == 200 and out["status"] == "success"
    assert "already used" in await refused(genuine)

    metrics = runner.app.meters.render().decode()
    assert 'atrund_xrpc_auth_failures_total{reason="replayed"} 1.0' in metrics
    assert 'atrund_xrpc_auth_failures_total{reason="signature"} 2.0' in metrics


async def test_expired_and_pre_start_tokens_are_refused(author, make_runner, stack):
    """A token past its exp is refused; so is one issued before the runner started, because the
    memory of used tokens does not survive a restart."""
    runner = await make_runner(access={"allowlist": [author.account.did]}, start=False,
                               gateway={"listen": "127.0.0.1:0", "token_leeway_seconds": 0})
    early = await token(author, runner.did)
    await asyncio.sleep(1.1)  # iat has one-second resolution
    await runner.start()
    base = runner.app.gateway.url
    bundle = await author.publish(BUNDLE)
    body = {"bundle": bundle, "endpoint": "main"}
    status, out = await invoke(base, early, body)
    assert status == 401 and "issued before this runner started" in out["message"]

    short = await token(author, runner.did, exp=int(time.time()) + 2)
    await asyncio.sleep(3)
    status, out = await invoke(base, short, body)
    assert status == 401 and out["error"] == "InvalidToken" and "expired" in out["message"]


async def test_caller_policy_and_input_errors(login_author, author, make_runner):
    """A caller the access policy refuses gets 403; a malformed input 400 naming the field; other
    methods 501; GET 405."""
    outsider = await login_author("outsider")
    runner = await make_runner(access={"allowlist": [author.account.did]})
    base = runner.app.gateway.url
    bundle = await author.publish(BUNDLE)
    status, out = await invoke(base, await token(outsider, runner.did), {"bundle": bundle, "endpoint": "main"})
    assert status == 403 and out["error"] == "Forbidden" and outsider.account.did in out["message"]

    status, out = await invoke(base, await token(author, runner.did), {"bundle": {"uri": "x"}, "endpoint": "main"})
    assert status == 400 and out["error"] == "InvalidRequest" and "bundle.uri" in out["message"] and "bundle.cid" in out["message"]
    status, out = await invoke(base, await token(author, runner.did), b"{not json")
    assert status == 400 and "not JSON" in out["message"]
    status, out = await invoke(base, await token(author, runner.did), {"bundle": bundle, "endpoint": "main", "surprise": 1})
    assert status == 400 and "surprise" in out["message"]

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/xrpc/{INVOKE}") as r:
            assert r.status == 405 and (await r.json())["error"] == "InvalidRequest"
        async with http.post(f"{base}/xrpc/com.atproto.repo.getRecord") as r:
            assert r.status == 501 and (await r.json())["error"] == "MethodNotImplemented"
