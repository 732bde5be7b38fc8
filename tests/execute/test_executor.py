"""The none backend and the worker pool, with real at-run-exec subprocesses.

Each bundle below is a small program that misbehaves in one way; the comment says how.
"""

import asyncio
import os
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ISOLATIONS, execute_once, executor_settings, gone, require_isolation

from atrund.config import ExecutorSection
from atrund.execute import ExecRequest, ExecutorError, create_executor


@pytest.fixture(params=ISOLATIONS)
def isolation(request) -> str:
    """Every test here runs on every backend: the contract is the same."""
    return require_isolation(request)


def bundle(tmp_path: Path, source: str) -> str:
    path = tmp_path / "bundle.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


async def run(tmp_path, source, endpoint="main", args=None, timeout=10, isolation="none", **settings):
    return await execute_once("python", bundle(tmp_path, source), endpoint=endpoint, args=args, timeout=timeout,
                              isolation=isolation, **settings)


@pytest.mark.vm
async def test_return_value_survives_prints_on_stdout_and_stderr(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="""
        import sys
        print("import-time noise")
        def main(args):
            print("call-time noise", flush=True)
            sys.stderr.write("to stderr\\n")
            return {"got": args}
    """, args={"x": 1})
    assert r.success and r.data == {"got": {"x": 1}}
    assert r.metrics.execution_time_ms is not None


async def test_async_endpoint_is_awaited(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="""
        import asyncio
        async def main(args):
            await asyncio.sleep(0.01)
            return [1, 2, 3]
    """)
    assert r.success and r.data == [1, 2, 3]


@pytest.mark.vm
async def test_exception_reports_type_message_and_line(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="""
        def main(args):
            return {}["missing"]
    """)
    assert not r.success and r.error_type == "KeyError"
    assert r.error == "KeyError: 'missing' (line 3)"


async def test_unknown_endpoint_names_what_exists(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="def a(args): pass\ndef _private(args): pass\nimport os\n", endpoint="b")
    assert r.error == "unknown endpoint 'b': the bundle defines a"


async def test_syntax_error(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="def main(args):\n  return (\n")
    assert not r.success and r.error_type == "SyntaxError" and "does not compile" in r.error


async def test_sys_exit_at_import_is_an_error_not_a_crash(isolation, tmp_path):
    # The bundle tries to end the worker before the endpoint is even looked up.
    r = await run(tmp_path, isolation=isolation, source="import sys\nsys.exit(7)\n")
    assert r.error == "bundle failed while loading: SystemExit: 7 (line 2)"


async def test_timeout_kills_everything_the_bundle_started(isolation, tmp_path):
    # The bundle starts a long-lived child and a double-forked, setsid daemon, then hangs:
    # all must die at the deadline. (The daemon escapes a process-group kill: see the none case.)
    tag = f"{1000 + os.getpid() % 1000}.{time.monotonic_ns() % 10**6}"
    started = time.monotonic()
    r = await run(tmp_path, isolation=isolation, source=f"""
        import os, subprocess, time
        def main(args):
            subprocess.Popen(["sleep", "{tag}"])
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execvp("sleep", ["sleep", "{tag}1"])
                os._exit(0)
            time.sleep(1000)
    """, timeout=2)
    assert r.timed_out and r.error_type == "Timeout" and r.error == "timed out after 2 s"
    assert time.monotonic() - started < 10
    child, daemon = await _survivors(tag), await _survivors(tag + "1")
    assert child == [], "the bundle's child outlived the timeout"
    if isolation == "none":
        # Not contained by none: a setsid'd grandchild leaves the process group. Documented.
        assert daemon, "expected the none backend to miss the setsid daemon"
        for pid in daemon:
            os.kill(pid, 9)
    else:
        assert daemon == [], "the process backend's PID namespace must take the daemon down too"


async def _survivors(tag: str) -> list[int]:
    """Host PIDs of live processes whose command line is exactly `sleep TAG` (after a grace period)."""
    for _ in range(30):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if f.read().split(b"\0")[:2] == [b"sleep", tag.encode()] and not gone(int(entry)):
                            found.append(int(entry))
                except OSError:
                    pass
        if not found:
            return []
        await asyncio.sleep(0.1)
    return found


@pytest.mark.vm
async def test_busy_loop_is_killed_at_the_deadline(isolation, tmp_path):
    # Pure CPU, never yields to anything the runtime could check.
    r = await run(tmp_path, isolation=isolation, source="def main(args):\n    while True: pass\n", timeout=1)
    assert r.timed_out


@pytest.mark.vm
async def test_crash_before_answering_is_explained(isolation, tmp_path):
    # The bundle kills its own interpreter: no answer ever comes.
    r = await run(tmp_path, isolation=isolation, source="""
        import os, signal, sys
        def main(args):
            sys.stderr.write("about to die\\n"); sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert r.error_type == "Crash"
    assert r.error.startswith("the bundle process was killed by SIGKILL before answering")
    assert "about to die" in r.error


@pytest.mark.vm
async def test_forged_protocol_line_is_a_protocol_error(isolation, tmp_path):
    # The bundle finds the protocol descriptor and writes garbage on it before answering.
    r = await run(tmp_path, isolation=isolation, source="""
        import os
        def main(args):
            for fd in range(3, 10):
                try: os.write(fd, b"not json\\n")
                except OSError: pass
            return 1
    """)
    assert not r.success and r.error_type == "ProtocolError"


@pytest.mark.vm
async def test_answer_larger_than_the_limit(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="def main(args):\n    return 'x' * 200_000\n", max_output_bytes=65536)
    assert r.error_type == "OutputTooLarge" and "65536" in r.error


async def test_unserializable_return_value(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="def main(args):\n    return {1, 2}\n")
    assert not r.success and r.error.startswith("return value is not JSON")


async def test_nan_is_not_json(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="def main(args):\n    return float('nan')\n")
    assert not r.success and "not JSON" in r.error


@pytest.mark.vm
async def test_memory_limit(isolation, tmp_path):
    # Allocates 2 GiB; RLIMIT_DATA (set from outside with prlimit) stops it.
    r = await run(tmp_path, isolation=isolation, source="def main(args):\n    return len(bytearray(2 * 1024**3))\n", memory_mb=256)
    assert not r.success and r.error_type == "MemoryError"


@pytest.mark.vm
async def test_environment_is_clean(isolation, tmp_path, monkeypatch):
    monkeypatch.setenv("ATRUND_APP_PASSWORD", "runner-secret")
    r = await run(tmp_path, isolation=isolation, source="import os\ndef main(args):\n    return dict(os.environ)\n")
    assert r.success and r.data == {}


@pytest.mark.vm
async def test_unknown_runtime_is_a_failed_response(isolation, tmp_path):
    executor = create_executor(executor_settings(isolation, warm=0))
    r = await executor.execute(ExecRequest(code_path="/nonexistent", endpoint="x"), "cobol")
    assert not r.success and r.error_type == "UnknownRuntime" and "python" in r.error
    await executor.shutdown()


@pytest.mark.vm
async def test_warm_pool_refills_and_shutdown_leaves_no_process(isolation, tmp_path):
    executor = create_executor(executor_settings(isolation, warm=2))
    await executor.warm(2)
    warm_pids = _handles(executor)
    assert executor.stats().warm["python"] == 2
    r = await executor.execute(ExecRequest(code_path=bundle(tmp_path, "def main(a): return 1"), endpoint="main"), "python")
    assert r.success and r.data == 1
    deadline = time.monotonic() + (120 if isolation == "microvm" else 2.5)  # the replacement VM boots first
    while executor.stats().warm["python"] != 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stats = executor.stats()
    assert stats.warm["python"] == 2 and stats.completed == 1 and stats.cold_starts == 0
    handles = warm_pids + _handles(executor)
    await executor.shutdown()
    if isolation.startswith("container"):
        assert await _containers(handles) == [], "containers outlived shutdown()"
    else:
        assert all(gone(p) for p in handles)
    if isolation == "microvm":  # no VM directory (channel socket, pid file) is left either
        from atrund.execute.workdir import OWNER

        assert list(executor.backend.work_root.glob(f"vm-{OWNER.replace(':', '_')}-*")) == []
    with pytest.raises(ExecutorError):
        await executor.execute(ExecRequest(code_path="/x", endpoint="main"), "python")


def _handles(executor) -> list:
    """What identifies the warm python workers: process ids, or container ids."""
    return [getattr(lease.worker, "id", None) or lease.worker.process.pid for lease in executor._warm["python"]]


async def _containers(ids: list[str]) -> list[str]:
    """Those of ``ids`` the engine still has (any state)."""
    import docker

    client = docker.from_env()
    try:
        return [c.id for c in client.containers.list(all=True) if c.id in ids]
    finally:
        client.close()


@pytest.mark.vm
async def test_missing_runtime_program_raises(isolation, tmp_path):
    rdir = tmp_path / "runtimes" / "python"
    rdir.mkdir(parents=True)
    (rdir / "runtime.json").write_text('{"name": "python", "command": ["/nonexistent/at-run-exec"]}')
    executor = create_executor(executor_settings(isolation, warm=0, runtimes_dir=tmp_path / "runtimes"))
    # The container and microVM backends check their image holds these runtimes' programs, which it does not.
    match = "other at-run-exec programs" if isolation.startswith("container") or isolation == "microvm" else "cannot start python worker"
    with pytest.raises(ExecutorError, match=match):
        await executor.execute(ExecRequest(code_path="/x", endpoint="main"), "python")
    await executor.shutdown()


def test_committed_protocol_schema_is_current():
    """nix/runtimes/exec-protocol.schema.json is what `atrund schema` prints (runtime authors read it)."""
    import json

    from atrund.execute.protocol import schema

    committed = Path(__file__).resolve().parents[2] / "nix/runtimes/exec-protocol.schema.json"
    assert json.loads(committed.read_text()) == schema(), "regenerate: atrund schema > nix/runtimes/exec-protocol.schema.json"


@pytest.mark.parametrize("status", [700, True, "200"])
async def test_malformed_http_response_is_an_explained_error(isolation, tmp_path, status):
    # handleRequest answers with something that is not an HTTP status.
    r = await run(tmp_path, isolation=isolation, endpoint="handleRequest",
                  source=f"def handleRequest(req):\n    return {{'status': {status!r}, 'body': 'x'}}\n")
    if status is True or status == "200":
        assert r.success and r.response is None  # not response-shaped: plain data
    else:
        assert not r.success and r.error_type == "InvalidResponse" and "700" in r.error


@pytest.mark.vm
async def test_http_response_lands_in_response(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, endpoint="handleRequest", args={"method": "GET", "path": "/x"},
                  source="def handleRequest(req):\n    return {'status': 201, 'headers': {'x-a': 1}, 'body': req['path']}\n")
    assert r.success and r.response.status == 201 and r.response.body == "/x" and r.response.headers == {"x-a": "1"}


async def test_load_time_exception_names_the_line(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="x = 1\nraise RuntimeError('at import')\n")
    assert r.error == "bundle failed while loading: RuntimeError: at import (line 2)"


@pytest.mark.vm
async def test_crash_exit_code_is_reported_as_it_was(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="import os\ndef main(args):\n    os._exit(5)\n")
    assert r.error == "the bundle process exited with code 5 before answering"


async def test_answer_just_over_the_limit(isolation, tmp_path):
    r = await run(tmp_path, isolation=isolation, source="def main(args):\n    return 'x' * 66000\n", max_output_bytes=65536)
    assert r.error_type == "OutputTooLarge"


async def test_no_bytecode_is_written_beside_the_bundle(tmp_path):
    r = await run(tmp_path, isolation="none", source="import json\ndef main(args):\n    return 1\n")
    assert r.success and not (tmp_path / "__pycache__").exists()


async def test_warm_counts_per_runtime(tmp_path):
    """warm_by_runtime overrides warm for one runtime (a Deno worker costs more memory)."""
    executor = create_executor(ExecutorSection(warm=1, isolation="none", warm_by_runtime={"deno": 0, "node": 0, "python": 2}))
    await executor.warm(1)
    assert executor.stats().warm == {"python": 2, "deno": 0, "node": 0}
    await executor.shutdown()


async def test_unknown_isolation_names_the_choices():
    with pytest.raises(ExecutorError, match="unknown isolation 'vmware'.*microvm, process, container, none, auto"):
        create_executor(ExecutorSection.model_construct(**{**ExecutorSection().model_dump(), "isolation": "vmware"}))


async def test_firecracker_is_the_old_name_of_microvm_and_the_executor_states_its_monitor(tmp_path):
    """The registry's alias builds the microvm backend (nothing boots until a worker starts);
    only a microvm executor names a monitor, which the runner record then states."""
    from atrund.execute import create_backend

    settings = ExecutorSection(work_dir=tmp_path / "work")
    backend = create_backend("firecracker", settings)
    assert backend.isolation == "microvm" and backend.monitor_name in ("qemu", "firecracker")
    executor = create_executor(executor_settings("none"))
    assert executor.monitor is None
    await executor.shutdown()


def test_auto_tries_the_registrys_backends_in_its_order():
    from atrund.execute import BACKENDS
    from atrund.execute.probe import order

    assert order(ExecutorSection()) == BACKENDS == ("microvm", "process", "container", "none")


def test_a_work_dir_others_may_write_is_refused(tmp_path):
    """Root mounts, chowns and locks in the process backend's work directory: one that another
    user could change under it is refused, naming the directory."""
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    with pytest.raises(ExecutorError, match=f"{work} must be a directory owned by root and not writable by others"):
        create_executor(executor_settings("process", work_dir=work))


async def test_a_second_runner_starting_up_does_not_break_this_ones_worker_starts(tmp_path):
    """Two runners on one host share the process backend's cgroup parent. A runner starting up
    sweeps the cgroups a crashed runner left; a live runner's worker cgroup is empty for a
    moment between its creation and the fence joining it, and must not be swept then (it once
    was: the worker failed to start with 'cgroup.procs: No such file'). Here one executor
    starts 15 workers one after another while other backends are created (each sweeping)
    as fast as they can."""
    from atrund.execute import create_backend
    from atrund.execute.probe import probe_sync

    if not next(p for p in probe_sync(ExecutorSection(isolation="process")) if p.backend == "process").ok:
        pytest.skip("the process backend does not work on this host (see atrund doctor)")
    settings = ExecutorSection(isolation="process", warm=0)
    executor = create_executor(settings, "process")
    stop = False

    async def sweep() -> int:
        n = 0
        while not stop:
            create_backend("process", settings)
            n += 1
            await asyncio.sleep(0)
        return n

    sweeper = asyncio.create_task(sweep())
    try:
        path = bundle(tmp_path, "def main(args):\n    return args\n")
        for i in range(15):
            r = await executor.execute(ExecRequest(code_path=path, endpoint="main", args={"i": i}, timeout=10), "python")
            assert r.success and r.data == {"i": i}, r.error
    finally:
        stop = True
        sweeps = await sweeper
        await executor.shutdown()
    assert sweeps > 15
