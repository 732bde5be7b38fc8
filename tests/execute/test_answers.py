"""Answers from workers are untrusted data (issue 11, item 4; and 1xx statuses at the gateway).

A bundle shares its worker with the runtime's wrapper that writes the answer: in Python it can
always write an answer line of its own, and in Node and Deno it can rewrite globals before the
wrapper answers. So:

- the runner checks every answer against the at-run-exec schema, strictly (a forged answer is a
  ProtocolError naming the field and the rule), and the executor keeps serving;
- the Node and Deno wrappers keep their answer channel (tests/hostile/<runtime>/steal_*, forge_*,
  fake_*): the answer that arrives is the wrapper's, with real metrics;
- values no record can hold (lone surrogates) are refused with an explanation, text meant for
  people is repaired, integers past 2^53 - 1 are kept exactly as a jsonValue; the result writer
  can always send what was built (end to end against the real PDS below);
- ``atrund exec`` prints such answers without a traceback, and the gateway answers a 1xx status
  with a 502 that says why.

Every request goes through a real executor and real workers, on every backend the host offers.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import aiohttp
import pytest
from conftest import ISOLATIONS, atrund, executor_settings, require_isolation, wait_result

from atrund.bounds import MAX_DEPTH
from atrund.execute import ExecRequest, create_executor
from atrund.records import JSON_VALUE, MAX_SAFE_INTEGER, Result, StrongRef, UnstorableValue, decode_data, encode_data
from atrund.results import build

HOSTILE = Path(__file__).resolve().parents[1] / "hostile"
FORGE = str(HOSTILE / "python" / "forge_answer.py")
EXTENSION = {"python": ".py", "deno": ".ts", "node": ".mjs"}
NOT_AN_ANSWER = "at-run-exec answered with something that is not an ExecResponse: "
TIMEOUT = 10  # seconds: a metric may claim at most 11000 ms (timeout + 1000 ms of slack)


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.fixture(scope="module", params=ISOLATIONS)
def isolation(request) -> str:
    return require_isolation(request)


@pytest.fixture(scope="module")
async def executor(isolation):
    """One executor per backend for the whole module: every case below also shows that the same
    executor goes on serving after a bad answer. Deno needs more than the default memory limit
    (see test_runtimes.MEMORY_MB); answers up to 1 MiB, so the length rules are what is tested."""
    ex = create_executor(executor_settings(isolation, warm=0, memory_mb=1024, max_output_bytes=1 << 20))
    yield ex
    await ex.shutdown()


async def run(executor, runtime: str, code_path: str, endpoint: str = "main", args: dict | None = None):
    request = ExecRequest(code_path=code_path, endpoint=endpoint, args=args or {}, timeout=TIMEOUT)
    return await executor.execute(request, runtime)


async def still_serves(executor) -> None:
    """The next valid request on the same executor is answered, with real metrics."""
    r = await run(executor, "python", FORGE, args={"honest": True})
    assert r.success and r.data == {"honest": True}, r
    assert isinstance(r.metrics.execution_time_ms, int) and 0 <= r.metrics.execution_time_ms < TIMEOUT * 1000


# -- forged answers (the Python runtime cannot stop a bundle writing its own) --------------------

FORGED = {
    "executionTimeMs 10**30": ('{"success":true,"data":{},"metrics":{"executionTimeMs":%d}}' % 10**30,
                               "metrics.executionTimeMs: must be an integer between 0 and 86400000"),
    "executionTimeMs negative": ('{"success":true,"metrics":{"executionTimeMs":-1}}',
                                 "metrics.executionTimeMs: must be an integer between 0 and 86400000"),
    'executionTimeMs "5"': ('{"success":true,"metrics":{"executionTimeMs":"5"}}',
                            "metrics.executionTimeMs: must be an integer between 0 and 86400000"),
    "executionTimeMs 5.5": ('{"success":true,"metrics":{"executionTimeMs":5.5}}',
                            "metrics.executionTimeMs: must be an integer between 0 and 86400000"),
    "executionTimeMs true": ('{"success":true,"metrics":{"executionTimeMs":true}}',
                             "metrics.executionTimeMs: must be an integer between 0 and 86400000"),
    "executionTimeMs NaN": ('{"success":true,"metrics":{"executionTimeMs":NaN}}', "the answer is not JSON: NaN is not JSON"),
    "executionTimeMs Infinity": ('{"success":true,"metrics":{"executionTimeMs":Infinity}}',
                                 "the answer is not JSON: Infinity is not JSON"),
    "executionTimeMs -Infinity": ('{"success":true,"metrics":{"executionTimeMs":-Infinity}}',
                                  "the answer is not JSON: -Infinity is not JSON"),
    "executionTimeMs of 5000 digits": ('{"success":true,"metrics":{"executionTimeMs":%s}}' % ("9" * 5000),
                                       "the answer is not JSON: "),
    "executionTimeMs past the deadline": ('{"success":true,"metrics":{"executionTimeMs":86400000}}',
                                          "metrics.executionTimeMs: must be an integer between 0 and 11000 "
                                          "(the request's timeout plus 1000 ms)"),
    "loadTimeMs negative": ('{"success":true,"metrics":{"executionTimeMs":1,"loadTimeMs":-5}}',
                            "metrics.loadTimeMs: must be an integer between 0 and 86400000"),
    "17 metrics": ('{"success":true,"metrics":{%s}}' % ",".join(f'"m{i}":1' for i in range(17)),
                   "metrics: must hold at most 16 metrics"),
    "metric name of 65 characters": ('{"success":true,"metrics":{"%s":1}}' % ("m" * 65),
                                     "metrics: metric names must be at most 64 characters"),
    'success "yes"': ('{"success":"yes","data":{"forged":true}}', "success: must be true or false"),
    "success 1": ('{"success":1,"data":{"forged":true}}', "success: must be true or false"),
    "success missing": ('{"data":{"forged":true}}', "success: Field required"),
    "timedOut string": ('{"success":false,"timedOut":"yes"}', "timedOut: must be true or false"),
    "error not a string": ('{"success":false,"error":{"a":1}}', "error: must be a string of at most 65536 characters"),
    "error of 70000 characters": ('{"success":false,"error":"%s"}' % ("e" * 70000),
                                  "error: must be a string of at most 65536 characters"),
    "errorType of 300 characters": ('{"success":false,"error":"x","errorType":"%s"}' % ("T" * 300),
                                    "errorType: must be a string of at most 256 characters"),
    'status "200"': ('{"success":true,"response":{"status":"200","body":"x"}}',
                     "response.status: must be an integer between 100 and 599"),
    "status 600": ('{"success":true,"response":{"status":600,"body":"x"}}',
                   "response.status: must be an integer between 100 and 599"),
    "status 99": ('{"success":true,"response":{"status":99,"body":"x"}}',
                  "response.status: must be an integer between 100 and 599"),
    "header value a number": ('{"success":true,"response":{"status":200,"headers":{"x-a":1},"body":"x"}}',
                              "response.headers.x-a: must be a string"),
    "body a list": ('{"success":true,"response":{"status":200,"body":["x"]}}', "response.body: must be a string"),
    'isBase64 "true"': ('{"success":true,"response":{"status":200,"body":"eA==","isBase64":"true"}}',
                        "response.isBase64: must be true or false"),
    "answer a list": ('[{"success":true}]', "(top level): Input should be a valid dictionary"),
    "answer not JSON": ("hello, runner", "the answer is not JSON: "),
    "answer nested 450 levels": ('{"success":true,"data":%s}' % deep(450),
                                 f"the answer is nested deeper than {MAX_DEPTH} levels at data[0]"),
}


@pytest.mark.parametrize("line, says", FORGED.values(), ids=FORGED.keys())
async def test_a_forged_answer_is_a_protocol_error_naming_field_and_rule(executor, line, says):
    r = await run(executor, "python", FORGE, args={"line": line})
    assert not r.success and r.error_type == "ProtocolError", r
    assert r.error.startswith(NOT_AN_ANSWER + says), r.error
    assert len(r.error) < 400  # names the field and the rule, never echoes a huge value
    await still_serves(executor)


@pytest.mark.vm
async def test_forged_metrics_are_refused_in_every_backend(executor):
    """The check is the runner's: the same inside a microVM as anywhere."""
    r = await run(executor, "python", FORGE, args={"line": FORGED["executionTimeMs 10**30"][0]})
    assert r.error_type == "ProtocolError" and "metrics.executionTimeMs" in r.error
    await still_serves(executor)


# -- Node and Deno: a bundle that rewrites globals cannot take over the answer channel ----------

JS_ATTACKS = [(runtime, path.stem) for runtime in ("node", "deno")
              for path in sorted((HOSTILE / runtime).glob(f"*{EXTENSION[runtime]}"))
              if path.stem.startswith(("steal_token_", "forge_", "fake_"))]


def test_every_js_channel_attack_is_collected():
    assert len(JS_ATTACKS) == 11, JS_ATTACKS  # node 6, deno 5: a renamed file must not drop out silently


@pytest.mark.parametrize("runtime, attack", JS_ATTACKS, ids=[f"{r}-{a}" for r, a in JS_ATTACKS])
async def test_a_bundle_cannot_steal_the_answer_token_or_forge_the_envelope(executor, runtime, attack):
    """Each attack (explained at the top of its file) writes a forged answer claiming
    {forged: true} and executionTimeMs 4242 as soon as it learns the token, or rewrites the
    envelope or the clock. What arrives must be the bundle's real return value with the
    wrapper's own measurements (a trivial call: well under 4 s)."""
    r = await run(executor, runtime, str(HOSTILE / runtime / f"{attack}{EXTENSION[runtime]}"))
    assert r.success and r.data == {"real": True}, r
    extra = r.metrics.model_extra or {}
    assert 0 <= r.metrics.execution_time_ms < 4000 and 0 <= extra.get("loadTimeMs", 0) < 4000, r.metrics
    await still_serves(executor)


# -- values no record can hold, from real bundles -------------------------------------------------

SURROGATE_DATA = {
    "python": 'def main(args):\n    return {"x": "ok", "y": {"z": "\\ud800"}}\n',
    "node": 'export function main() { return { x: "ok", y: { z: "\\ud800" } }; }\n',
    "deno": 'export function main() { return { x: "ok", y: { z: "\\ud800" } }; }\n',
}
SURROGATE_ERROR = {
    "python": 'def main(args):\n    raise ValueError("bad \\ud800 value")\n',
    "node": 'export function main() {\n  throw new RangeError("bad \\ud800 value");\n}\n',
    "deno": 'export function main() {\n  throw new RangeError("bad \\ud800 value");\n}\n',
}
SURROGATE_RESPONSE = {
    "python": 'def handleRequest(req):\n    return {"status": 200, "headers": {"x-a": "\\udc00"}, "body": "hi \\ud800"}\n',
    "node": 'export function handleRequest() { return { status: 200, headers: { "x-a": "\\udc00" }, body: "hi \\ud800" }; }\n',
}
BIG_INTEGERS = {
    "python": "def main(args):\n    return {'a': 2**60, 'b': -(2**60), 'c': 2**53 + 1, 'd': 2**53 - 1}\n",
    "node": "export function main() { return { a: 2 ** 60, b: -(2 ** 60), c: 2 ** 53 + 2, d: 2 ** 53 - 1 }; }\n",
}
DEEP = {
    "python": "def main(args):\n    v = 1\n    for _ in range(450):\n        v = [v]\n    return v\n",
    "node": "export function main() { let v = 1; for (let i = 0; i < 450; i++) v = [v]; return v; }\n",
}
LONG_ERROR = {
    "python": "def main(args):\n    raise type('E' * 300, (Exception,), {})('m' * 100000)\n",
    "node": "export function main() { const e = new Error('m'.repeat(100000)); e.name = 'E'.repeat(300); throw e; }\n",
    "deno": "export function main() { const e = new Error('m'.repeat(100000)); e.name = 'E'.repeat(300); throw e; }\n",
}


def bundle_file(tmp_path: Path, runtime: str, source: str) -> str:
    path = tmp_path / f"bundle{EXTENSION[runtime]}"
    path.write_text(textwrap.dedent(source))
    return str(path)


@pytest.mark.parametrize("runtime", SURROGATE_DATA)
async def test_a_lone_surrogate_in_the_return_value_is_refused_naming_where(executor, runtime, tmp_path):
    r = await run(executor, runtime, bundle_file(tmp_path, runtime, SURROGATE_DATA[runtime]))
    assert not r.success and r.error_type == "InvalidReturnValue", r
    assert r.error == "the return value holds a string that is not valid Unicode (a lone surrogate at data.y.z)"
    assert r.error.encode("utf-8")
    await still_serves(executor)


@pytest.mark.parametrize("runtime", SURROGATE_ERROR)
async def test_a_lone_surrogate_in_the_error_is_replaced(executor, runtime, tmp_path):
    r = await run(executor, runtime, bundle_file(tmp_path, runtime, SURROGATE_ERROR[runtime]))
    assert not r.success and r.error_type in ("ValueError", "RangeError"), r
    assert "bad \ufffd value" in r.error and r.error.encode("utf-8")
    await still_serves(executor)


@pytest.mark.parametrize("runtime", SURROGATE_RESPONSE)
async def test_lone_surrogates_in_the_http_response_are_replaced(executor, runtime, tmp_path):
    r = await run(executor, runtime, bundle_file(tmp_path, runtime, SURROGATE_RESPONSE[runtime]), endpoint="handleRequest")
    assert r.success and r.response.status == 200, r
    assert r.response.body == "hi \ufffd" and r.response.headers["x-a"] == "\ufffd"
    await still_serves(executor)


@pytest.mark.parametrize("runtime", BIG_INTEGERS)
async def test_integers_past_2_53_arrive_exactly_and_are_stored_as_json_text(executor, runtime, tmp_path):
    r = await run(executor, runtime, bundle_file(tmp_path, runtime, BIG_INTEGERS[runtime]))
    assert r.success, r
    if runtime == "python":
        assert r.data == {"a": 2**60, "b": -(2**60), "c": 2**53 + 1, "d": 2**53 - 1}
    else:  # a JavaScript number prints as the shortest decimal that reads back as it: those digits are kept
        assert r.data == {"a": 1152921504606847000, "b": -1152921504606847000, "c": 2**53 + 2, "d": 2**53 - 1}
    stored = encode_data(r.data)
    assert stored["$type"] == JSON_VALUE and decode_data(stored) == r.data
    await still_serves(executor)


@pytest.mark.parametrize("runtime", DEEP)
async def test_an_answer_nested_450_levels_is_refused_naming_the_limit(executor, runtime, tmp_path):
    r = await run(executor, runtime, bundle_file(tmp_path, runtime, DEEP[runtime]))
    assert r.error_type == "ProtocolError", r
    assert r.error.startswith(NOT_AN_ANSWER + f"the answer is nested deeper than {MAX_DEPTH} levels at data[0][0]")
    await still_serves(executor)


@pytest.mark.parametrize("runtime", LONG_ERROR)
async def test_the_runtimes_cut_long_errors_to_what_the_runner_takes(executor, runtime, tmp_path):
    """A bundle's own huge message or error name is cut by the runtime, not refused by the runner."""
    r = await run(executor, runtime, bundle_file(tmp_path, runtime, LONG_ERROR[runtime]))
    assert not r.success and r.error_type != "ProtocolError", r
    assert r.error.endswith(" … (truncated)") and 16384 <= len(r.error) < 16500
    assert r.error_type.startswith("EEEE") and r.error_type.endswith(" … (truncated)") and len(r.error_type) < 256
    await still_serves(executor)


# -- what a result record can hold ---------------------------------------------------------------

REF = StrongRef(uri="at://did:plc:abc/dev.atrun.bundle/x", cid="bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm")


def sendable(result: Result) -> dict:
    """What the result writer sends: strict JSON in UTF-8 (this raised UnicodeEncodeError before)."""
    record = result.to_record()
    text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")
    return record


@pytest.mark.parametrize("value, stored_as_is", [
    ({"n": 2**53 - 1, "m": -(2**53 - 1)}, True),
    ({"n": 2**53}, False),
    ({"n": 2**53 + 1}, False),
    ({"n": 2**60}, False),
    ({"n": -(2**60)}, False),
    ({"n": [1, {"deep": 2**63 - 1}]}, False),
    ({"n": 10**30}, False),
])
def test_integers_beyond_the_safe_range_are_kept_exactly_as_json_text(value, stored_as_is):
    stored = encode_data(value)
    assert (stored == value) is stored_as_is
    if not stored_as_is:
        assert stored["$type"] == JSON_VALUE and str(max(abs(n) for n in _ints(value))) in stored["json"]
    assert decode_data(stored) == value
    sendable(build(None, REF, "success", data=value))


def _ints(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _ints(v)
    elif isinstance(value, list):
        for v in value:
            yield from _ints(v)
    elif isinstance(value, int):
        yield value


def test_json_value_text_is_strict_ascii_json():
    stored = encode_data({"f": 1.5, "s": "é €", "k": MAX_SAFE_INTEGER + 1})
    assert stored["json"].isascii()
    assert json.loads(stored["json"], parse_constant=lambda c: pytest.fail(f"{c} in jsonValue")) == {"f": 1.5, "s": "é €", "k": 2**53}


@pytest.mark.parametrize("value, says", [
    ({"x": "\ud800"}, "the return value holds a string that is not valid Unicode (a lone surrogate at data.x)"),
    (["ok", "\udfff"], "the return value holds a string that is not valid Unicode (a lone surrogate at data[1])"),
    ({"\ud800k": 1}, "the return value holds a key that is not valid Unicode (a lone surrogate at data.\ufffdk)"),
    (float("nan"), "the return value holds nan, which is not a JSON number (at data)"),
    ({"x": [float("inf")]}, "the return value holds inf, which is not a JSON number (at data.x[0])"),
    ({"x": {1, 2}}, "the return value holds a set, which is not a JSON value (at data.x)"),
])
def test_a_value_no_record_can_hold_is_refused_with_an_error_result(value, says):
    with pytest.raises(UnstorableValue, match="^" + says.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        encode_data(value)
    result = build(None, REF, "success", data=value)
    assert result.status == "error" and result.error == says and result.data is None
    sendable(result)


def test_a_result_nested_too_deep_is_an_error_result():
    value: list = []
    for _ in range(MAX_DEPTH + 10):
        value = [value]
    result = build(None, REF, "success", data={"v": value})
    assert result.status == "error" and f"nested deeper than {MAX_DEPTH} levels" in result.error
    sendable(result)


def test_text_for_people_is_repaired_in_a_result():
    result = build(None, REF, "success", error="bad \ud800",
                   response={"status": 200, "headers": {"x-\udc00": "v\ud800"}, "body": "b\ud800"})
    record = sendable(result)
    assert record["error"] == "bad \ufffd"
    assert record["response"]["body"] == "b\ufffd" and record["response"]["headers"] == {"x-\ufffd": "v\ufffd"}


def test_an_impossible_http_response_in_a_result_is_an_error_result():
    result = build(None, REF, "success", response={"status": 700, "body": "x"})
    assert result.status == "error" and result.response is None
    assert result.error.startswith("the HTTP response is not valid: status: ")
    sendable(result)


# -- atrund exec prints odd answers without a traceback ------------------------------------------

@pytest.mark.parametrize("line, says", [
    ('{"success":true,"data":%s}' % deep(450), "the answer is nested deeper than 128 levels"),
    ('{"success":true,"metrics":{"executionTimeMs":%d}}' % 10**30, "metrics.executionTimeMs: must be an integer"),
    ('{"success":true,"data":{"x":"\\ud800"}}', "a lone surrogate at data.x"),
    ('{"success":true,"data":[1.5, NaN]}', "NaN is not JSON"),
], ids=["nested-450", "metrics-10e30", "lone-surrogate", "nan"])
def test_exec_prints_a_refused_answer_without_a_traceback(line, says):
    p = atrund("exec", FORGE, "--runtime", "python", "--endpoint", "main", "--isolation", "none",
               "--args", json.dumps({"line": line}))
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr
    out = json.loads(p.stdout)
    assert out["success"] is False and says in out["error"]


# -- the gateway: 1xx is no answer ---------------------------------------------------------------

GATEWAY_BUNDLE = '''
def handleRequest(req):
    path = req["path"]
    if path.startswith("/status/"):
        return {"status": int(path.rsplit("/", 1)[1]), "headers": {"content-type": "text/plain"}, "body": "interim?"}
    if path == "/odd":
        return {"status": 200, "headers": {"x-odd": "a\\ud800b"}, "body": "hi \\udfff"}
    if path == "/forged":
        import os, sys
        sys.modules["__main__"]._protocol.write('{"success":true,"response":{"status":"200","body":"forged"}}\\n')
        sys.modules["__main__"]._protocol.flush()
        os._exit(0)
    return {"status": 200, "headers": {"content-type": "text/plain"}, "body": "fine"}
'''


async def get(url: str) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        async with http.get(url) as resp:
            return resp.status, resp.headers, await resp.read()


async def test_gateway_answers_interim_and_odd_statuses_with_a_502_that_says_why(author, make_runner):
    runner = await make_runner(access={"allowlist": [author.account.did]})
    bundle = await author.publish(GATEWAY_BUNDLE)
    base = f"{runner.app.gateway.url}/{author.account.did}/{bundle['uri'].rsplit('/', 1)[1]}"
    for status in (100, 101, 103, 199):
        code, _, body = await get(f"{base}/status/{status}")
        assert code == 502, (status, body)
        assert json.loads(body) == {"error": "InvalidResponse",
                                    "message": f"the bundle answered with status {status}, which is not a final HTTP status"}
        code, _, body = await get(f"{base}/")
        assert code == 200 and body == b"fine"
    code, _, body = await get(f"{base}/status/200")
    assert code == 200 and body == b"interim?"

    code, headers, body = await get(f"{base}/odd")  # lone surrogates cannot be sent: replaced, as web servers do
    assert code == 200 and body == "hi \ufffd".encode() and headers["x-odd"] == "a\ufffdb"

    code, _, body = await get(f"{base}/forged")
    assert code == 502 and json.loads(body)["error"] == "BundleFailed" and "ProtocolError" in json.loads(body)["message"]
    code, _, body = await get(f"{base}/")
    assert code == 200 and body == b"fine"


# -- end to end: the result writer never dies of an answer ---------------------------------------

E2E_PYTHON = '''
import os, sys

def surrogate(args):
    return {"x": "\\ud800"}

def bad_error(args):
    raise ValueError("bad \\ud800 value")

def forged(args):
    protocol = sys.modules["__main__"]._protocol
    protocol.write('{"success":true,"data":{"forged":true},"metrics":{"executionTimeMs":%d}}\\n' % 10**30)
    protocol.flush()
    os._exit(0)

def big(args):
    return {"a": 2**60, "b": -(2**60), "c": 2**53 + 1}

def nested(args):
    v = 1
    for _ in range(450):
        v = [v]
    return v

def fine(args):
    return {"ok": True}
'''
E2E_NODE = 'export function surrogate() { return { x: "\\ud800" }; }\n'


async def test_results_of_hostile_answers_are_written_and_the_runner_goes_on(login_author, make_runner, reader):
    """Invocation records on the real PDS whose answers once stopped the result writer (a lone
    surrogate), made the PDS refuse the result forever (metrics of 10^30, integers past 2^53) or
    crashed the runner (450 levels): each ends in a written, explained result, and later
    invocations, from the same author and another, are answered."""
    author, other = await login_author(), await login_author("other")
    runner = await make_runner(access={"allowlist": [author.account.did, other.account.did]})
    py = await author.publish(E2E_PYTHON)
    node = await author.publish(E2E_NODE, runtime="node")
    uris = {name: await author.invoke(py, runner.did, name) for name in ("surrogate", "bad_error", "forged", "big", "nested")}
    uris["node_surrogate"] = await author.invoke(node, runner.did, "surrogate")
    got = {name: await wait_result(reader, runner.did, uri) for name, uri in uris.items()}

    lone = "the return value holds a string that is not valid Unicode (a lone surrogate at data.x)"
    assert got["surrogate"]["status"] == "error" and got["surrogate"]["error"] == lone
    assert got["node_surrogate"]["status"] == "error" and got["node_surrogate"]["error"] == lone
    assert got["bad_error"]["status"] == "error" and got["bad_error"]["error"].startswith("ValueError: bad \ufffd value")
    assert got["forged"]["status"] == "error"
    assert got["forged"]["error"] == (NOT_AN_ANSWER + "metrics.executionTimeMs: must be an integer between 0 and 86400000")
    assert got["nested"]["status"] == "error" and f"nested deeper than {MAX_DEPTH} levels" in got["nested"]["error"]
    assert got["big"]["status"] == "success" and got["big"]["data"]["$type"] == JSON_VALUE
    assert Result.model_validate(got["big"]).value() == {"a": 2**60, "b": -(2**60), "c": 2**53 + 1}

    later = [await author.invoke(py, runner.did, "fine"), await other.invoke(await other.publish(E2E_PYTHON), runner.did, "fine")]
    for uri in later:
        value = await wait_result(reader, runner.did, uri)
        assert value["status"] == "success" and value["data"] == {"ok": True}
    assert runner.app.status.health()["ok"] is True
    assert runner.app.state.next_due_in() is None  # the outbox is empty: nothing refused and retried forever
