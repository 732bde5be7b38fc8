"""Bundles' durable state over the at-run-exec channel (docs/protocol.md §7.6; issue 18): the
same ctx.state in every runtime, reads that see the run's own writes, quotas that fail the call
inside the bundle and leave nothing to commit, namespaces that cannot reach each other, and a
channel on which a forged or out-of-turn state message is refused.

Real workers on every backend this host offers, a real State on a tmp file, the real
BundleState; what the runner does with a run's writes afterwards (commit with the result, or
drop them) is tested end to end in tests/test_bundle_state.py.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
from conftest import ISOLATIONS, executor_settings, require_isolation

from atrund.config import BundleStateSection
from atrund.execute import ExecRequest, create_executor
from atrund.kv import BundleState
from atrund.state import State

UID_BASE = 966_000  # this suite's own sandbox uids
EXT = {"python": ".py", "node": ".mjs", "deno": ".ts"}
A, B = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"

COUNTER = {
    "python": """
        def count(args, ctx):
            n = (ctx.state.get("n") or 0) + 1
            ctx.state.set("n", n)
            return n

        def peek(args, ctx):
            return {"n": ctx.state.get("n"), "keys": ctx.state.list()["keys"]}

        def write_then(args, ctx):
            ctx.state.set("n", 1000)
            seen = ctx.state.get("n")  # a run reads its own writes
            ctx.state.delete("gone")
            return {"seen": seen, "gone": ctx.state.get("gone"), "keys": ctx.state.list()["keys"]}

        def try_quota(args, ctx):
            try:
                ctx.state.set("big", "x" * args["size"])
            except Exception as e:
                return {"caught": type(e).__name__, "message": str(e)}
            return {"caught": None}

        def no_args(args):
            return "one argument still works"

        def optional_second(args, opts=None):  # written before ctx existed: called as before
            return "opts is None" if opts is None else "got something"
    """,
    "node": """
        export async function count(args, ctx) {
          const n = ((await ctx.state.get("n")) ?? 0) + 1;
          await ctx.state.set("n", n);
          return n;
        }
        export async function peek(args, ctx) {
          return { n: await ctx.state.get("n"), keys: (await ctx.state.list()).keys };
        }
        export async function write_then(args, ctx) {
          await ctx.state.set("n", 1000);
          const seen = await ctx.state.get("n");
          await ctx.state.delete("gone");
          return { seen, gone: await ctx.state.get("gone"), keys: (await ctx.state.list()).keys };
        }
        export async function try_quota(args, ctx) {
          try {
            await ctx.state.set("big", "x".repeat(args.size));
          } catch (e) {
            return { caught: e.name, message: e.message };
          }
          return { caught: null };
        }
        export function no_args(args) {
          return "one argument still works";
        }
        export function optional_second(args, opts = null) { // written before ctx existed: called as before
          return opts === null ? "opts is None" : "got something";
        }
    """,
}
COUNTER["deno"] = COUNTER["node"]


@pytest.fixture(params=ISOLATIONS)
def isolation(request) -> str:
    return require_isolation(request)


@pytest.fixture
def kv(tmp_path) -> BundleState:
    store = State(tmp_path / "state" / "atrund.sqlite3")
    yield BundleState(store, BundleStateSection(max_keys=5, max_value_bytes=1000, max_bytes=3000, max_ops_per_run=50))
    store.close()


@pytest.fixture
async def executor(isolation):
    ex = create_executor(executor_settings(isolation, warm=0, process={"uid_base": UID_BASE}, container={"uid": UID_BASE}))
    yield ex
    await ex.shutdown()


def bundle_file(tmp_path: Path, runtime: str, source: str | None = None) -> str:
    path = tmp_path / f"bundle-{runtime}{EXT[runtime]}"
    path.write_text(textwrap.dedent(source or COUNTER[runtime]))
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    return str(path)


async def run(executor, kv: BundleState, code: str, runtime: str, endpoint: str, uri: str = f"at://{A}/dev.atrun.bundle/b",
              args: dict | None = None, commit: bool = True, timeout: int = 20):
    """One run with state, committed as the gateway does when it succeeded (dropped otherwise)."""
    session = kv.session(uri)
    response = await executor.execute(ExecRequest(code_path=code, endpoint=endpoint, args=args or {}, timeout=timeout), runtime,
                                      session)
    if response.success and commit and session.failure is None:
        kv.commit_alone(session)
    else:
        session.release()
    return response, session


@pytest.mark.parametrize("runtime", ["python", "node", "deno"])
async def test_a_counter_counts_100_runs_exactly_in_every_runtime(executor, kv, tmp_path, runtime):
    code = bundle_file(tmp_path, runtime)
    for i in range(1, 101):
        response, _ = await run(executor, kv, code, runtime, "count")
        assert response.success and response.data == i, response.error
    assert kv.store.state_value(A, "b", "n") == "100"
    response, _ = await run(executor, kv, code, runtime, "no_args")
    assert response.data == "one argument still works"
    response, _ = await run(executor, kv, code, runtime, "optional_second")
    assert response.data == "opts is None"


@pytest.mark.parametrize("runtime", ["python", "node", "deno"])
async def test_a_run_reads_its_own_writes_and_nothing_of_a_dropped_run_stays(executor, kv, tmp_path, runtime):
    code = bundle_file(tmp_path, runtime)
    kv.store.commit_bundle_state(_writes({"n": "1", "gone": '"x"'}))
    response, _ = await run(executor, kv, code, runtime, "write_then", commit=False)
    assert response.data == {"seen": 1000, "gone": None, "keys": ["n"]}
    response, _ = await run(executor, kv, code, runtime, "peek")
    assert response.data == {"n": 1, "keys": ["gone", "n"]}  # the first run's writes were dropped


@pytest.mark.parametrize("runtime", ["python", "node", "deno"])
async def test_past_a_quota_the_call_fails_in_the_bundle_and_nothing_commits(executor, kv, tmp_path, runtime):
    code = bundle_file(tmp_path, runtime)
    response, session = await run(executor, kv, code, runtime, "try_quota", args={"size": 5000})
    assert response.success  # the bundle caught it ...
    assert response.data["caught"] == "StateQuotaExceeded"
    assert "bundle_state.max_value_bytes" in response.data["message"]
    assert session.failure is not None and session.writes() is None  # ... and still nothing commits
    assert kv.store.state_value(A, "b", "big") is None


async def test_every_quota_refuses(executor, kv, tmp_path):
    code = bundle_file(tmp_path, "python", """
        def many(args, ctx):
            for i in range(args["n"]):
                ctx.state.set(f"k{i}", args.get("value", i))
            return "done"

        def chatty(args, ctx):
            for i in range(100):
                ctx.state.get("x")
    """)
    for args, quota in [({"n": 6}, "bundle_state.max_keys"), ({"n": 4, "value": "y" * 900}, "bundle_state.max_bytes")]:
        response, session = await run(executor, kv, code, "python", "many", args=args)
        assert not response.success and response.error_type == "StateQuotaExceeded" and quota in response.error
        assert session.writes() is None
    response, _ = await run(executor, kv, code, "python", "chatty")
    assert "bundle_state.max_ops_per_run" in response.error
    assert kv.store.state_usage(A, "b") == (0, 0)
    response, _ = await run(executor, kv, code, "python", "many", args={"n": 5})  # at the limit is fine
    assert response.success and kv.store.state_usage(A, "b")[0] == 5


async def test_keys_and_values_are_checked_inside_the_bundle(executor, kv, tmp_path):
    code = bundle_file(tmp_path, "python", """
        def bad(args, ctx):
            out = []
            for key, value in [("", 1), ("a" * 513, 1), ("ok", 1.5), ("ok", None), (5, 1), ("\\x01", 1)]:
                try:
                    ctx.state.set(key, value)
                    out.append("stored")
                except Exception as e:
                    out.append(type(e).__name__)
            return out
    """)
    response, session = await run(executor, kv, code, "python", "bad")
    assert response.data == ["StateError", "StateError", "StateError", "StateError", "TypeError", "StateError"]
    assert session.failure is None  # a refused call is not a quota: the run may go on


@pytest.mark.vm
async def test_namespaces_are_isolated(executor, kv, tmp_path):
    code = bundle_file(tmp_path, "python")
    for uri in (f"at://{A}/dev.atrun.bundle/b", f"at://{A}/dev.atrun.bundle/b", f"at://{A}/dev.atrun.bundle/other",
                f"at://{B}/dev.atrun.bundle/b"):
        await run(executor, kv, code, "python", "count", uri=uri)
    assert kv.store.state_value(A, "b", "n") == "2"
    assert kv.store.state_value(A, "other", "n") == "1" and kv.store.state_value(B, "b", "n") == "1"


@pytest.mark.vm
async def test_forged_state_lines_on_stdout_stderr_or_the_channel_are_refused(executor, kv, tmp_path):
    forged = '{"state":"set","run":"RUN","key":"n","value":99}'
    py = bundle_file(tmp_path, "python", f"""
        import os, sys

        def printed(args, ctx):
            print({forged!r}.replace("RUN", ctx.state._run))  # stdout is stderr: never the channel
            sys.stderr.write({forged!r}.replace("RUN", ctx.state._run) + "\\n")
            return "printed"

        def out_of_turn(args, ctx):
            channel = sys.modules["__main__"]._protocol  # Python bundles can always reach it
            channel.write({forged!r}.replace("RUN", "not-this-run") + "\\n")
            channel.flush()
            return "unreachable"

        def not_a_call(args, ctx):
            channel = sys.modules["__main__"]._protocol
            channel.write('{{"state":"drop-table"}}\\n')
            channel.flush()
    """)
    response, _ = await run(executor, kv, py, "python", "printed")
    assert response.success and kv.store.state_value(A, "b", "n") is None
    response, _ = await run(executor, kv, py, "python", "out_of_turn")
    assert not response.success and response.error_type == "ProtocolError" and "out of turn" in response.error
    response, _ = await run(executor, kv, py, "python", "not_a_call")
    assert response.error_type == "ProtocolError" and "state: must be one of get, set, delete, list" in response.error
    js = bundle_file(tmp_path, "node", f"""
        import fs from "node:fs";
        export function forge(args, ctx) {{
          fs.writeSync(3, "\\n" + {forged!r} + "\\n");  // the answer channel, without the token
          return "forged";
        }}
    """)
    response, _ = await run(executor, kv, js, "node", "forge")
    assert response.success and response.data == "forged" and kv.store.state_value(A, "b", "n") is None


async def test_a_run_offered_no_state_gets_a_clear_error_and_a_forged_call_is_refused(executor, tmp_path):
    code = bundle_file(tmp_path, "python", """
        import sys

        def use(args, ctx):
            try:
                ctx.state.get("n")
            except Exception as e:
                return f"{type(e).__name__}: {e}"

        def forge(args, ctx):
            channel = sys.modules["__main__"]._protocol
            channel.write('{"state":"get","run":"x","key":"n"}\\n')
            channel.flush()
    """)
    response = await executor.execute(ExecRequest(code_path=code, endpoint="use"), "python")
    assert response.data == "StateError: state is not available in this run (atrund exec offers none)"
    response = await executor.execute(ExecRequest(code_path=code, endpoint="forge"), "python")
    assert response.error_type == "ProtocolError" and "offered no state" in response.error


async def test_concurrent_runs_of_one_namespace_are_serialised(executor, kv, tmp_path):
    """50 increments at once (10 at a time, as executor slots would run them) end at exactly 50."""
    code = bundle_file(tmp_path, "python", """
        import time

        def count(args, ctx):
            n = ctx.state.get("n") or 0
            time.sleep(0.01)  # widen the window a lost update would need
            ctx.state.set("n", n + 1)
            return n + 1
    """)
    slots = asyncio.Semaphore(10)

    async def one():
        async with slots:
            response, _ = await run(executor, kv, code, "python", "count")
            assert response.success, response.error
            return response.data

    seen = await asyncio.gather(*(one() for _ in range(50)))
    assert sorted(seen) == list(range(1, 51))
    assert kv.store.state_value(A, "b", "n") == "50"
    assert not kv._locks  # every lock was let go


def _writes(items: dict[str, str | None]):
    from atrund.state import BundleWrites

    return BundleWrites(A, "b", items)


@pytest.mark.parametrize("runtime", ["python", "node", "deno"])
async def test_the_counter_examples_count(executor, kv, tmp_path, runtime):
    example = Path(__file__).resolve().parents[2] / "examples" / f"counter{EXT[runtime]}"
    code = bundle_file(tmp_path, runtime, example.read_text())
    for i, name in enumerate(["ada", "bob", "ada"], start=1):
        response, _ = await run(executor, kv, code, runtime, "hit", args={"name": name})
        assert response.data == {"hits": i}, response.error
    response, _ = await run(executor, kv, code, runtime, "names")
    assert response.data == {"names": ["ada", "bob"], "cursor": None}
    response, _ = await run(executor, kv, code, runtime, "reset")
    assert kv.store.state_value(A, "b", "hits") is None
