"""The HTTP gateway against the real local PDS and real workers: /{author}/{rkey}/{path} runs the
bundle's handleRequest; errors are JSON with the documented statuses; /healthz and /metrics."""

import asyncio
import base64
import json
import re

import aiohttp

from atrund.records import BUNDLE, RUNNER

HANDLER = '''
import base64, json, time

def handleRequest(req):
    if req["path"] == "/slow":
        time.sleep(30)
    if req["path"] == "/boom":
        raise RuntimeError("secret-ish detail that must not reach the caller")
    if req["path"] == "/binary":
        return {"status": 201, "headers": {"content-type": "application/octet-stream"},
                "body": base64.b64encode(bytes(range(256))).decode(), "isBase64": True}
    if req["path"] == "/plain":
        return {"hello": "not an HTTP response"}
    return {"status": 200, "headers": {"content-type": "application/json", "x-version": "one"},
            "body": json.dumps(req)}
'''

HOSTILE = '''
def handleRequest(req):
    headers = {"x-ok": "fine", "Set-Cookie": "session=stolen; Path=/", "Transfer-Encoding": "chunked",
               "Strict-Transport-Security": "max-age=99999999", "Clear-Site-Data": "\\"*\\"",
               "x-huge": "a" * 20000, "bad name": "x", "Content-Length": "999999", "Connection": "close"}
    for i in range(200):
        headers[f"x-many-{i}"] = str(i)
    return {"status": 200, "headers": headers, "body": "still answered"}
'''


def rkey(ref: dict) -> str:
    return ref["uri"].rsplit("/", 1)[1]


async def call(method: str, url: str, **kw) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, **kw) as resp:
            return resp.status, resp.headers, await resp.read()


async def test_request_reaches_handler_and_answer_comes_back(author, make_runner, reader):
    """Method, path, query (without cid), headers (without cookies) and body reach handleRequest;
    status, headers and a base64 body come back as the bundle set them."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    base = runner.app.gateway.url
    bundle = await author.publish(HANDLER)
    url = f"{base}/{author.account.did}/{rkey(bundle)}/some/path?a=1&a=2&b=x"
    status, headers, body = await call("POST", url, data=b'{"k": "v"}', headers={"X-Custom": "yes", "Cookie": "c=1"})
    assert status == 200, body
    assert headers["x-version"] == "one" and headers["content-type"] == "application/json"
    req = json.loads(body)
    assert req["method"] == "POST" and req["path"] == "/some/path"
    assert req["query"] == {"a": ["1", "2"], "b": "x"}
    assert req["headers"]["x-custom"] == "yes" and "cookie" not in req["headers"]
    assert req["body"] == '{"k": "v"}' and req["isBase64"] is False

    status, headers, body = await call("GET", f"{base}/{author.account.did}/{rkey(bundle)}/binary")
    assert status == 201 and body == bytes(range(256)) and headers["content-type"] == "application/octet-stream"

    # Non-UTF-8 request bodies reach the bundle as base64.
    status, _, body = await call("PUT", f"{base}/{author.account.did}/{rkey(bundle)}", data=b"\xff\xfe\x00")
    req = json.loads(body)
    assert status == 200 and req["isBase64"] is True and base64.b64decode(req["body"]) == b"\xff\xfe\x00"
    assert req["path"] == "/"

    # The author's handle names the same bundle.
    status, _, body = await call("GET", f"{base}/{author.account.handle}/{rkey(bundle)}/via-handle")
    assert status == 200 and json.loads(body)["path"] == "/via-handle"

    # The runner record says where the gateway is.
    _, value = await reader.get_record(runner.did, RUNNER, "self")
    assert value["gatewayUrl"] == base
    assert value["limits"]["gatewayRequestsPerMinute"] == 600 and value["limits"]["maxRequestBytes"] == 1_048_576


async def test_gateway_can_be_disabled(author, make_runner, reader):
    """enabled = false: nothing listens, and the runner record names no gateway."""
    runner = await make_runner(access={"mode": "open"}, gateway={"enabled": False})
    assert runner.app.gateway is None
    _, value = await reader.get_record(runner.did, RUNNER, "self")
    assert "gatewayUrl" not in value and "gatewayRequestsPerMinute" not in value["limits"]


async def test_cid_pins_a_version_and_latest_follows_updates(author, make_runner):
    """?cid= runs exactly that version (from the verified cache once the repo moved on); without
    it, the latest record runs. A CID the runner never saw and the repo no longer holds is 404."""
    runner = await make_runner(access={"allowlist": [author.account.did]}, gateway={"listen": "127.0.0.1:0", "latest_cache_seconds": 0})
    base = runner.app.gateway.url
    v1 = await author.publish(HANDLER)
    route = f"{base}/{author.account.did}/{rkey(v1)}/x"
    status, headers, _ = await call("GET", f"{route}?cid={v1['cid']}")
    assert status == 200 and headers["x-version"] == "one"

    blob = await author.session.upload_blob(HANDLER.replace('"one"', '"two"').encode(), "text/x-python")
    _, v2_cid = await author.session.put_record(BUNDLE, rkey(v1), {"runtime": "python", "code": blob,
                                                                   "createdAt": "2026-01-01T00:00:00.000Z"})
    status, headers, _ = await call("GET", route)
    assert status == 200 and headers["x-version"] == "two"
    status, headers, _ = await call("GET", f"{route}?cid={v1['cid']}")
    assert status == 200 and headers["x-version"] == "one"
    status, headers, _ = await call("GET", f"{route}?cid={v2_cid}")
    assert status == 200 and headers["x-version"] == "two"

    never_seen = await author.publish(HANDLER)
    blob = await author.session.upload_blob(b"def handleRequest(req):\n    return {'status': 200, 'body': 'v2'}\n", "text/x-python")
    await author.session.put_record(BUNDLE, rkey(never_seen), {"runtime": "python", "code": blob, "createdAt": "2026-01-01T00:00:00.000Z"})
    status, _, body = await call("GET", f"{base}/{author.account.did}/{rkey(never_seen)}?cid={never_seen['cid']}")
    assert status == 404 and json.loads(body)["error"] == "BundleNotFound" and never_seen["cid"] in json.loads(body)["message"]

    status, _, body = await call("GET", f"{route}?cid=not-a-cid")
    assert status == 400 and json.loads(body)["message"].startswith("cid: ")
    status, _, body = await call("GET", f"{base}/did:plc:..%2F..%2Fetc/{rkey(v1)}")
    assert status == 400 and "is not a DID" in json.loads(body)["message"]


async def test_errors_are_json_with_the_documented_status(login_author, author, make_runner):
    """404 unknown bundle or no handler, 403 denied author, 504 timeout, 502 crash (without the
    bundle's message or any trace, with the request id its author reads it by), 502 for an answer
    that is not HTTP, 413 oversized body."""
    outsider = await login_author("outsider")
    runner = await make_runner(access={"allowlist": [author.account.did]}, executor={"warm": 2},
                               gateway={"listen": "127.0.0.1:0", "timeout": 2, "max_body_bytes": 1000})
    base = runner.app.gateway.url
    bundle = await author.publish(HANDLER)
    no_handler = await author.publish("def main(args):\n    return 1\n")
    route = f"{base}/{author.account.did}/{rkey(bundle)}"

    async def error(method: str, url: str, **kw) -> tuple[int, dict]:
        status, headers, body = await call(method, url, **kw)
        assert headers["content-type"].startswith("application/json"), body
        doc = json.loads(body)
        assert set(doc) - {"requestId"} == {"error", "message"} and "Traceback" not in doc["message"]
        return status, doc

    status, doc = await error("GET", f"{base}/")
    assert status == 404 and doc["error"] == "NotFound"
    status, doc = await error("GET", f"{base}/{author.account.did}/3zzzzzzzzzzzz/x")
    assert status == 404 and doc["error"] == "BundleNotFound" and "3zzzzzzzzzzzz" in doc["message"]
    status, doc = await error("GET", f"{base}/nobody.invalid/{rkey(bundle)}")
    assert status == 404 and doc["error"] == "AuthorNotFound"
    status, doc = await error("GET", f"{base}/{author.account.did}/{rkey(no_handler)}")
    assert status == 404 and doc["error"] == "NoHandler"
    outsider_bundle = await outsider.publish(HANDLER)
    status, doc = await error("GET", f"{base}/{outsider.account.did}/{rkey(outsider_bundle)}")
    assert status == 403 and doc["error"] == "AuthorDenied" and outsider.account.did in doc["message"]

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, doc = await error("GET", f"{route}/slow")
    assert status == 504 and doc["error"] == "Timeout" and "2 s" in doc["message"] and doc["requestId"]  # atrund logs ID
    assert loop.time() - t0 < 10

    status, doc = await error("GET", f"{route}/boom")
    assert status == 502 and doc["error"] == "BundleFailed" and "RuntimeError" in doc["message"]
    assert "secret-ish" not in doc["message"] and doc["requestId"]
    status, doc = await error("GET", f"{route}/plain")
    assert status == 502 and doc["error"] == "InvalidResponse"

    status, doc = await error("POST", f"{route}/x", data=b"x" * 1001)
    assert status == 413 and doc["error"] == "PayloadTooLarge" and "1000" in doc["message"]

    async def chunks():  # no Content-Length: the cap applies while reading
        for _ in range(5):
            yield b"y" * 300

    status, doc = await error("POST", f"{route}/x", data=chunks())
    assert status == 413 and doc["error"] == "PayloadTooLarge"
    status, _, _ = await call("POST", f"{route}/x", data=b"z" * 1000)
    assert status == 200


async def test_rate_limit_per_bundle(author, make_runner):
    """Past the burst, a bundle gets 429 with Retry-After; another bundle is not affected."""
    runner = await make_runner(access={"allowlist": [author.account.did]},
                               gateway={"listen": "127.0.0.1:0", "burst": 2, "rate_per_minute": 6})
    base = runner.app.gateway.url
    a, b = await author.publish(HANDLER), await author.publish(HANDLER)
    statuses = [(await call("GET", f"{base}/{author.account.did}/{rkey(a)}/x"))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    status, headers, body = await call("GET", f"{base}/{author.account.did}/{rkey(a)}/x")
    assert status == 429 and json.loads(body)["error"] == "RateLimited" and 1 <= int(headers["Retry-After"]) <= 10
    assert (await call("GET", f"{base}/{author.account.did}/{rkey(b)}/x"))[0] == 200


async def test_hostile_headers_are_dropped_not_passed_on(author, make_runner):
    """Set-Cookie, HSTS, Clear-Site-Data, framing headers, a 20 kB value, an invalid name and
    headers past the 64th are dropped; the answer still goes out, sandboxed by CSP."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    bundle = await author.publish(HOSTILE)
    status, headers, body = await call("GET", f"{runner.app.gateway.url}/{author.account.did}/{rkey(bundle)}/")
    assert status == 200 and body == b"still answered"
    assert headers["x-ok"] == "fine"
    for name in ("Set-Cookie", "Strict-Transport-Security", "Clear-Site-Data", "x-huge", "bad name", "Transfer-Encoding"):
        assert name not in headers, name
    assert headers["Content-Length"] == str(len(b"still answered"))
    assert len([h for h in headers if h.lower().startswith("x-many-")]) < 64
    assert headers["Content-Security-Policy"].startswith("sandbox") and headers["X-Content-Type-Options"] == "nosniff"


async def test_deno_bundle_answers_with_a_web_response(author, make_runner):
    """A Deno handleRequest gets a web Request and may answer with a web Response."""
    runner = await make_runner(access={"allowlist": [author.account.did]})
    source = ('export function handleRequest(req) {\n'
              '  const u = new URL(req.url);\n'
              '  return new Response(`deno ${req.method} ${u.pathname} ${u.searchParams.get("q")}`,'
              ' {status: 202, headers: {"x-rt": "deno"}});\n}\n')
    bundle = await author.publish(source, runtime="deno")
    status, headers, body = await call("GET", f"{runner.app.gateway.url}/{author.account.did}/{rkey(bundle)}/p?q=1")
    assert status == 202 and headers["x-rt"] == "deno" and body == b"deno GET /p 1"


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text format (0 if absent)."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(\{{(.*)\}})? (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")) == labels:
            return float(m.group(3))
    return 0.0


async def test_healthz_and_metrics_move_after_requests(login_author, author, make_runner, reader):
    """/healthz reports ok, uptime and the pool; /metrics counts gateway requests, runs by status
    and runtime, latency, denials and record invocations (with their ingest lag)."""
    from conftest import wait_result

    outsider = await login_author("outsider")
    runner = await make_runner(access={"allowlist": [author.account.did]})
    base = runner.app.gateway.url
    status, _, body = await call("GET", f"{base}/healthz")
    health = json.loads(body)
    assert status == 200 and health["ok"] is True and health["uptimeSeconds"] > 0 and health["did"] == runner.did
    assert health["pool"]["isolation"] == runner.app.executor.isolation and "python" in health["pool"]["warm"]

    _, headers, before = await call("GET", f"{base}/metrics")
    assert headers["content-type"].startswith("text/plain")
    before = before.decode()
    bundle = await author.publish(HANDLER + "\ndef main(args):\n    return {'ok': True}\n")
    assert (await call("GET", f"{base}/{author.account.did}/{rkey(bundle)}/x"))[0] == 200
    assert (await call("GET", f"{base}/{author.account.did}/{rkey(bundle)}/boom"))[0] == 502
    assert (await call("GET", f"{base}/{outsider.account.did}/{rkey(bundle)}"))[0] == 403
    uri = await author.invoke(bundle, runner.did)
    assert (await wait_result(reader, runner.did, uri))["status"] == "success"
    after = (await call("GET", f"{base}/metrics"))[2].decode()

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("atrund_invocations_total", source="gateway", status="success", runtime="python") == 1
    assert moved("atrund_invocations_total", source="gateway", status="error", runtime="python") == 1
    assert moved("atrund_invocations_total", source="record", status="success", runtime="python") == 1
    assert moved("atrund_gateway_requests_total", route="bundle", status="200") == 1
    assert moved("atrund_gateway_requests_total", route="bundle", status="502") == 1
    assert moved("atrund_denials_total", source="gateway") == 1
    assert moved("atrund_execution_seconds_count", runtime="python") == 3
    assert moved("atrund_invocation_seconds_count", source="gateway") == 2
    assert moved("atrund_ingest_lag_seconds_count") == 1 and sample(after, "atrund_ingest_lag_last_seconds") >= 0
    assert moved("atrund_claim_lag_seconds_count") == 1 and sample(after, "atrund_claim_lag_last_seconds") >= 0
    assert "atrund_replica_" not in after and health["replica"] is None  # one SQLite runner: no replica figures
    assert moved("atrund_pool_completed_total") == 2 and moved("atrund_pool_failed_total") == 1
    assert sample(after, "atrund_queue_depth", kind="invocation") == 0
    assert "atrund_pool_warm_workers" in after and "atrund_running" in after
    assert json.loads((await call("GET", f"{base}/healthz"))[2])["ingestLagSeconds"] >= 0


async def test_gateway_requests_share_the_executor_slots(author, make_runner):
    """With concurrency 1, two slow requests run one after the other, not side by side."""
    runner = await make_runner(access={"allowlist": [author.account.did]}, executor={"concurrency": 1, "warm": 2})
    source = "import time\ndef handleRequest(req):\n    time.sleep(1)\n    return {'status': 200, 'body': 'ok'}\n"
    bundle = await author.publish(source)
    url = f"{runner.app.gateway.url}/{author.account.did}/{rkey(bundle)}/"
    await call("GET", url)  # fetch and cache the bundle first
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(call("GET", url), call("GET", url))
    assert [r[0] for r in results] == [200, 200]
    assert loop.time() - t0 >= 2.0


async def test_too_many_waiting_requests_get_503(author, make_runner):
    """With every slot busy and max_waiting requests already waiting, the next one is refused
    at once (503, Retry-After) instead of queueing without bound."""
    runner = await make_runner(access={"allowlist": [author.account.did]}, executor={"concurrency": 1, "warm": 2},
                               gateway={"listen": "127.0.0.1:0", "max_waiting": 1})
    source = "import time\ndef handleRequest(req):\n    time.sleep(1.5)\n    return {'status': 200, 'body': 'ok'}\n"
    bundle = await author.publish(source)
    url = f"{runner.app.gateway.url}/{author.account.did}/{rkey(bundle)}/"
    await call("GET", url)  # fetch and cache the bundle first
    running = asyncio.create_task(call("GET", url))
    await asyncio.sleep(0.5)
    waiting = asyncio.create_task(call("GET", url))
    await asyncio.sleep(0.3)
    status, headers, body = await call("GET", url)
    assert status == 503 and json.loads(body)["error"] == "Busy" and headers["Retry-After"] == "1"
    assert [(await running)[0], (await waiting)[0]] == [200, 200]


def test_rate_limiter_table_stays_bounded():
    """Keys come from anonymous callers: the bucket table never grows past its bound, and a key
    that is still limited stays limited while others come and go."""
    from atrund.gateway import MAX_BUCKETS, RateLimiter

    limiter = RateLimiter(per_minute=1, burst=1)
    assert limiter.take("hot") == 0 and limiter.take("hot") > 0
    for i in range(MAX_BUCKETS // 4):
        limiter.take(i)
    assert limiter.take("hot") > 0
    for i in range(3 * MAX_BUCKETS):
        limiter.take(("flood", i))
    assert len(limiter.buckets) <= MAX_BUCKETS
