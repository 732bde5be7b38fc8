"""Hot workers (docs/threat-model.md, "Reuse"): a worker that answered cleanly serves the next
request of the same reuse key (runtime, bundle, grants, secrets) and never one of another key;
every per-request guarantee holds per request in a reused worker. Real workers on every backend
this host offers; the probing bundle is tests/hostile/python/reuse.py.

What is shared within a key is shared on purpose (a bundle's globals live as long as its
worker); the tests pin down that it is never shared across keys, and that whatever a request
leaves running, or whatever limit it hits, does not reach the next request.
"""

import asyncio
import secrets
import shutil
import time
from pathlib import Path

import pytest
from conftest import ISOLATIONS, executor_settings, require_isolation

from atrund.execute import ExecRequest, create_executor
from atrund.execute.protocol import ExecPermissions

PROBE = Path(__file__).resolve().parents[1] / "hostile" / "python" / "reuse.py"
UID_BASE = 962_000  # this suite's own sandbox uids


@pytest.fixture(params=ISOLATIONS)
def isolation(request) -> str:
    return require_isolation(request)


@pytest.fixture
async def pool(isolation):
    """An executor over ``isolation`` that reuses workers; shut down afterwards."""
    made = []

    def make(**settings):
        settings.setdefault("process", {"uid_base": UID_BASE})
        settings.setdefault("container", {"uid": UID_BASE})
        executor = create_executor(executor_settings(isolation, warm=0, **settings))
        made.append(executor)
        return executor

    yield make
    for executor in made:
        await executor.shutdown()


def probe(endpoint: str, code_path: Path = PROBE, timeout: int = 10, env: dict | None = None, **args) -> ExecRequest:
    return ExecRequest(code_path=str(code_path), endpoint=endpoint, args=args, timeout=timeout, env=env or {},
                       permissions=ExecPermissions(env=sorted(env or {})))


async def run(executor, request: ExecRequest):
    r = await executor.execute(request, "python")
    assert r.success, r.error
    return r.data


def reuses(isolation: str) -> bool:
    """gVisor's sandbox hides the worker's processes from the runner, which then cannot check
    what a request left running: its workers serve one request each."""
    return not isolation.endswith("+runsc")


@pytest.mark.vm
async def test_same_key_reuses_the_worker_and_its_globals(isolation, pool):
    executor = pool()
    first = await run(executor, probe("whoami"))
    second = await run(executor, probe("whoami"))
    if not reuses(isolation):
        assert second["token"] != first["token"] and second["served"] == 1
        return
    assert second["token"] == first["token"] and second["served"] == 2
    stats = executor.stats()
    assert stats.hot_hits == 1 and stats.cold_starts == 1 and stats.hot == 1


async def test_other_bundle_or_grants_get_another_worker(isolation, pool, tmp_path):
    executor = pool()
    copy = tmp_path / "other.py"  # another bundle: another code path (on a runner, another CID)
    shutil.copyfile(PROBE, copy)
    tokens = {(await run(executor, probe("whoami")))["token"],
              (await run(executor, probe("whoami", code_path=copy)))["token"],
              (await run(executor, probe("whoami", env={"SECRET": "s"})))["token"]}
    assert len(tokens) == 3


@pytest.mark.vm
async def test_one_callers_secret_never_reaches_another_callers_request(isolation, pool):
    """Invocation-level secrets are in the key: B's request to the same bundle runs in a process
    that never held A's secret."""
    executor = pool()
    a = await run(executor, probe("remember", env={"SECRET": "alice-only"}))
    b = await run(executor, probe("recall", env={"SECRET": "bob"}))
    assert b["token"] != a["token"] and b["kept"] == [] and b["env"] == "bob"
    again = await run(executor, probe("recall", env={"SECRET": "alice-only"}))
    if reuses(isolation):
        assert again["token"] == a["token"] and again["kept"] == ["alice-only"]


@pytest.mark.vm
@pytest.mark.parametrize("attack", ["leave_thread", "leave_child"])
@pytest.mark.parametrize("hide", [False, True], ids=["plain", "hiding"])
async def test_what_a_request_leaves_running_retires_its_worker(isolation, pool, attack, hide):
    """A thread or a daemonised child left running after the answer: the next request gets a
    fresh worker, and the leftover goes with the old one. With ``hide`` the bundle first turns
    off at-run-exec's own check: the runner's (or, in a VM, the guest init's) still sees it."""
    if isolation == "none" and attack == "leave_child":
        pytest.skip("none does not contain a child that leaves the worker's session (README: what none does not "
                    "contain); it outlives a worker with or without reuse")
    executor = pool()
    tag = f"30.{secrets.randbelow(10**6):06d}"  # seconds, and a mark no other process carries
    left = await run(executor, probe(attack, hide=hide, tag=tag))
    after = await run(executor, probe("whoami"))
    assert after["token"] != left["token"] and after["served"] == 1
    if reuses(isolation):
        assert executor.stats().retired == 1
    if isolation in ("none", "process"):
        await asyncio.sleep(0.5)  # the teardown runs off the answer's path
        assert not _sleeping(tag), "the child left by the bundle outlived its worker"


def _sleeping(tag: str) -> bool:
    import subprocess

    return subprocess.run(["pgrep", "-f", f"sleep {tag}"], capture_output=True).returncode == 0


@pytest.mark.vm
async def test_a_timeout_in_a_hot_worker_gives_the_next_request_a_fresh_one(isolation, pool):
    executor = pool()
    before = await run(executor, probe("whoami"))
    r = await executor.execute(probe("spin", timeout=2), "python")
    assert r.timed_out and r.error_type == "Timeout"
    after = await run(executor, probe("whoami"))
    assert after["token"] != before["token"] and after["served"] == 1


async def test_the_deadline_is_per_request_in_a_reused_worker(isolation, pool):
    """Fifty requests that each spend CPU, then one that spins: it runs to its own deadline
    (a Timeout), not into what the earlier requests spent of the worker's RLIMIT_CPU."""
    if isolation == "none":
        pytest.skip("none sets RLIMIT_CPU with prlimit on the runner's own uid; the same holds, but spinning 50 "
                    "requests' worth of CPU on the test machine itself adds nothing the sandboxes do not show")
    executor = pool(max_timeout=2)  # one request's CPU budget: 3 s; the worker starts with 6
    first = await run(executor, probe("burn", ms=40))
    for _ in range(48):
        await run(executor, probe("burn", ms=40))
    started = time.monotonic()
    r = await executor.execute(probe("spin", timeout=2), "python")
    assert r.error_type == "Timeout", r.error
    assert time.monotonic() - started >= 1.9
    if reuses(isolation):
        assert executor.stats().hot_hits == 49 and first["served"] == 1


@pytest.mark.vm
async def test_a_memory_limit_hit_on_the_50th_request(isolation, pool):
    """A worker that grows a little every request and then asks for too much on its 50th: that
    request fails with MemoryError (or, past the high-water mark, the worker was replaced
    earlier), and the next request is served."""
    executor = pool(memory_mb=256)
    for _ in range(49):
        await run(executor, probe("allocate", mb=2))
    r = await executor.execute(probe("allocate", mb=400), "python")
    assert not r.success and r.error_type == "MemoryError", r.error
    after = await run(executor, probe("whoami"))
    assert after["served"] >= 1


async def test_a_bundle_that_poisons_its_process_hurts_only_its_key(isolation, pool, tmp_path):
    executor = pool()
    other = tmp_path / "other.py"
    shutil.copyfile(PROBE, other)
    await run(executor, probe("whoami", code_path=other))
    await executor.execute(probe("poison"), "python")  # breaks json.dumps in its own process
    await executor.execute(probe("whoami"), "python")  # its own key: may fail, that is its own doing
    assert (await run(executor, probe("whoami", code_path=other)))["served"] >= 1


async def test_reuse_never_gives_every_request_its_own_worker(isolation, pool):
    executor = pool(reuse="never")
    tokens = {(await run(executor, probe("whoami")))["token"] for _ in range(3)}
    assert len(tokens) == 3 and executor.stats().hot == 0


async def test_max_requests_idle_time_and_the_hot_cap_replace_workers(isolation, pool, tmp_path):
    if isolation != "process":
        pytest.skip("pool bookkeeping, the same on every backend: shown once, on process")
    executor = pool(max_requests=3, max_idle_seconds=1, hot_max=1)
    tokens = [(await run(executor, probe("whoami")))["token"] for _ in range(4)]
    assert tokens[0] == tokens[1] == tokens[2] != tokens[3]  # the fourth request: a new worker
    other = tmp_path / "other.py"
    shutil.copyfile(PROBE, other)
    await run(executor, probe("whoami", code_path=other))  # hot_max=1: the first key's worker is evicted
    assert executor.stats().hot == 1
    assert (await run(executor, probe("whoami")))["token"] != tokens[3]
    await asyncio.sleep(2.5)  # past max_idle_seconds: the sweeper stops idle workers
    assert executor.stats().hot == 0


async def test_a_worker_is_retired_before_less_than_one_cpu_budget_is_left(isolation, pool):
    """RLIMIT_CPU counts a process's whole life: a reused worker starts with two budgets and is
    replaced once it has spent more than one, so the next request never starts short."""
    if isolation == "microvm" or not reuses(isolation):
        pytest.skip("no per-process CPU limit inside a VM, and gVisor workers serve one request each")
    executor = pool(max_timeout=1)  # one budget: 2 CPU-s (the pool itself does not cap a request's timeout)
    first = await run(executor, probe("burn", ms=1200, timeout=30))
    second = await run(executor, probe("burn", ms=1200, timeout=30))
    third = await run(executor, probe("whoami"))
    assert second["token"] == first["token"] and third["token"] != first["token"]
    assert executor.stats().retired == 1


# -- Deno and Node: one runtime process serves every request of its key -----------------------

JS_PROBE = """
const token = crypto.randomUUID();
let served = 0;
let ticks = 0;
const kept = [];
const secret = () => (globalThis.Deno ? Deno.env.get("SECRET") : process.env.SECRET) ?? null;
export function whoami() { served += 1; return { token, served, ticks }; }
export function remember() { kept.push(secret()); return whoami(); }
export function recall() { return { token, kept, env: secret() }; }
export function say(args) { console.log(args.word); console.error(args.word + "!"); return whoami(); }
export function leaveTimer() { setInterval(() => { ticks += 1; }, 5); setTimeout(() => { ticks += 1000; }, 20); return whoami(); }
"""
JS_EXTENSIONS = {"deno": ".ts", "node": ".mjs"}


@pytest.fixture(params=sorted(JS_EXTENSIONS))
def js(request, tmp_path) -> tuple[str, Path]:
    code = tmp_path / f"probe{JS_EXTENSIONS[request.param]}"
    code.write_text(JS_PROBE)
    return request.param, code


async def run_js(executor, js, endpoint: str, env: dict | None = None):
    runtime, code = js
    r = await executor.execute(probe(endpoint, code_path=code, env=env), runtime)
    assert r.success, r.error
    return r.data


@pytest.mark.vm
async def test_js_same_key_shares_one_runtime_process_other_secrets_do_not(isolation, pool, js):
    executor = pool()
    a = await run_js(executor, js, "remember", env={"SECRET": "alice-only"})
    again = await run_js(executor, js, "recall", env={"SECRET": "alice-only"})
    b = await run_js(executor, js, "recall", env={"SECRET": "bob"})
    assert b["token"] != a["token"] and b["kept"] == [] and b["env"] == "bob"
    if reuses(isolation):
        assert again["token"] == a["token"] and again["kept"] == ["alice-only"]


async def test_js_timers_end_with_the_request_that_started_them(isolation, pool, js):
    """An interval and a timeout left behind by one request never run in the next one."""
    executor = pool()
    left = await run_js(executor, js, "leaveTimer")
    await asyncio.sleep(0.3)
    after = await run_js(executor, js, "whoami")
    assert after["ticks"] == 0
    if reuses(isolation):
        assert after["token"] == left["token"]


@pytest.mark.vm
async def test_each_requests_output_is_its_own(isolation, pool, js):
    """What a request printed (stdout and stderr, in order) comes back with its answer as
    ``output``, set by the runner; the next request in the same worker starts with none of it.
    Python, Deno and Node. Six requests each: the prints and the answer travel apart (two pipes,
    or a microVM guest's relay of both), and every answer must wait for its own prints."""
    executor = pool()
    words = ["first", "second", "third", "fourth", "fifth", "sixth"]
    for runtime, code in [("python", PROBE), js]:
        answers = []
        for word in words:
            request = ExecRequest(code_path=str(code), endpoint="say", args={"word": word}, timeout=10)
            r = await executor.execute(request, runtime)
            assert r.success, r.error
            answers.append(r)
        assert [a.output for a in answers] == [f"{w}\n{w}!" for w in words], runtime
        if reuses(isolation):
            assert len({a.data["token"] for a in answers}) == 1, runtime  # one worker served them all
