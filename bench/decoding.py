"""What the bounded decoders cost on ordinary input, against the unbounded calls they replaced.

    .venv/bin/python bench/decoding.py            # about 20 s
    .venv/bin/python bench/decoding.py --quick    # fewer rounds

Issue 11 put a bound on every decoder the runner feeds with outside input (atrund.bounds) and a
strict schema on every worker answer (atrund.execute.protocol.parse_answer). Those run on the hot
path: once per answer, per record listed, per firehose frame decoded, per result written. This
measures each against the same-run peer it replaced, on input an honest author, PDS or worker
sends, and prints microseconds per call and the ratio:

    answer line (small)     parse_answer                  vs ExecResponse.model_validate(json.loads(line))
    answer line (10 KiB)    parse_answer                  vs the same
    listRecords page (100)  bounds.loads(cut=True)         vs json.loads
    invocation block        bounds.decode_dag_cbor         vs libipld.decode_dag_cbor
    result record           results.unsendable + build    vs build alone

Each figure is the best of several rounds of timeit (the least disturbed by other work); run it
on a quiet machine and say what else was running.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

import libipld

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atrund import bounds, client  # noqa: E402
from atrund.execute.protocol import ExecResponse, parse_answer  # noqa: E402
from atrund.records import INVOCATION, StrongRef  # noqa: E402
from atrund.results import build, unsendable  # noqa: E402

CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
REF = StrongRef(uri="at://did:plc:abcdefghijklmnopqrstuvwx/dev.atrun.bundle/3kabcdefghij2", cid=CID)


def small_answer() -> bytes:
    return json.dumps({"success": True, "data": {"greeting": "hello, ada!"}, "metrics": {"executionTimeMs": 3}}).encode()


def large_answer() -> bytes:
    rows = [{"id": i, "name": f"row {i}", "tags": ["a", "b"], "ok": True} for i in range(150)]
    return json.dumps({"success": True, "data": {"rows": rows}, "metrics": {"executionTimeMs": 12, "loadTimeMs": 4}}).encode()


def invocation(i: int) -> dict:
    return {"$type": INVOCATION, **client.invocation_record("did:plc:runnerrunnerrunnerrunner", REF.to_record(), "greet",
                                                            {"name": f"ada {i}", "n": i}, created_at="2026-12-06T00:00:00.000Z")}


def page() -> bytes:
    records = [{"uri": f"at://did:plc:authorauthorauthorauthor/dev.atrun.invocation/3kabcdefg{i:04d}", "cid": CID,
                "value": invocation(i)} for i in range(100)]
    return json.dumps({"records": records, "cursor": "3kabcdefg0099"}).encode()


def measure(stmt, number: int, rounds: int) -> float:
    """Microseconds per call, best of ``rounds``."""
    return min(timeit.repeat(stmt, number=number, repeat=rounds)) / number * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    opts = p.parse_args()
    rounds = 3 if opts.quick else 7
    small, large, listing = small_answer(), large_answer(), page()
    block = libipld.encode_dag_cbor(invocation(1))
    data = json.loads(large)["data"]
    cases = [
        ("answer line, small", lambda: parse_answer(small), lambda: ExecResponse.model_validate(json.loads(small)), 20000),
        ("answer line, 10 KiB", lambda: parse_answer(large), lambda: ExecResponse.model_validate(json.loads(large)), 2000),
        ("listRecords page, 100 records", lambda: bounds.loads(listing, "page", cut=True), lambda: json.loads(listing), 500),
        ("invocation block (DAG-CBOR)", lambda: bounds.decode_dag_cbor(block, "record"), lambda: libipld.decode_dag_cbor(block),
         20000),
        ("result record, 10 KiB of data", lambda: unsendable(build(None, REF, "success", data=data).to_record()),
         lambda: build(None, REF, "success", data=data).to_record(), 2000),
    ]
    print(f"{'input':34} {'bounded µs':>11} {'unbounded µs':>13} {'ratio':>7}   (best of {rounds} rounds)")
    for name, new, old, number in cases:
        a, b = measure(new, number, rounds), measure(old, number, rounds)
        print(f"{name:34} {a:11.2f} {b:13.2f} {a / b:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
