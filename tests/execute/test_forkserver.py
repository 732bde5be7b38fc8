"""The process backend's fork server (atrund/execute/process/forkserver.py): a worker it makes
is fenced exactly as one from the exec path, holds nothing of the fork server, and the fork
server's death or the runner's never leaves a request hanging or a process behind."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import execute_once, gone

from atrund.config import ExecutorSection
from atrund.execute import ExecRequest, ExecutorError, create_executor
from atrund.execute.probe import landlock_abi
from atrund.execute.protocol import ExecPermissions

ROOT = Path(__file__).resolve().parents[2]
UID_BASE = 962_000  # this file's own sandbox uids

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or landlock_abi() < 1,
                                reason="the process backend needs root and Landlock")

# What a worker can see of its own fence and of whatever started it.
INSPECT = textwrap.dedent('''
    import os, socket, sys

    def _status():
        with open("/proc/self/status") as f:
            return {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in
                    ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd", "CapPrm")}

    def _limits():
        with open("/proc/self/limits") as f:
            return f.read()

    def _fds():
        out = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                out[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass  # the listing's own descriptor, closed by now
        return out

    def _try(fn):
        try:
            fn()
            return "allowed"
        except OSError as e:
            return type(e).__name__

    def _frames_globals():
        names, frame = set(), sys._getframe()
        while frame is not None:
            names.update(frame.f_globals)
            frame = frame.f_back
        return sorted(names)

    def _netdevs():
        with open("/proc/net/dev") as f:
            return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])

    def main(args):
        fds = _fds()
        return {
            "status": _status(),
            "limits": _limits(),
            "fds": sorted(fds),
            "fd_kinds": sorted({v.split(":")[0] if ":" in v else "file" for v in fds.values()}),
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "shadow": _try(lambda: open("/etc/shadow").close()),
            "runner_file": _try(lambda: open(args["runner_file"]).close()),
            "unix_socket": _try(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).close()),
            "tcp": _try(lambda: socket.create_connection(("127.0.0.1", args["port"]), timeout=1).close()),
            "netdevs": _netdevs(),
            "cwd": os.getcwd(),
            "environ": sorted(os.environ),
            "argv0": sys.argv[0],
            "file": __file__,
            "list_run": _try(lambda: os.listdir("/run")),
            "frames": _frames_globals(),
            "fence_loaded": "fence" in sys.modules,
            "pgrp_is_sid": os.getpgrp() == os.getsid(0),
            "cmdline": open("/proc/self/cmdline", "rb").read().decode().split(chr(0))[:-1],
        }
''')


def _settings(tmp_path, fork_server=True, **more):
    return dict(isolation="process", work_dir=str(tmp_path / "work"),
                process={"uid_base": UID_BASE, "fork_server": fork_server}, **more)


async def _inspect(tmp_path, fork_server, runner_file, port):
    bundle = tmp_path / "inspect.py"
    bundle.write_text(INSPECT)
    r = await execute_once("python", str(bundle), args={"runner_file": str(runner_file), "port": port},
                           **_settings(tmp_path, fork_server))
    assert r.success, r.error
    return r.data


async def test_a_forked_worker_is_fenced_exactly_as_an_execed_one(tmp_path):
    import shutil
    import tempfile

    # A file of the runner's outside /tmp (a worker's /tmp is its own), world-readable: only the fence stands in the way.
    host = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="atrund-forkserver-"))
    host.chmod(0o755)
    secret = host / "runner-secret"
    secret.write_text("s3cret")
    secret.chmod(0o644)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        forked = await _inspect(tmp_path, True, secret, port)
        execed = await _inspect(tmp_path, False, secret, port)
    finally:
        server.close()
        shutil.rmtree(host, ignore_errors=True)
    assert UID_BASE <= int(forked["status"]["Uid"].split()[0]) < UID_BASE + 256
    assert forked["status"]["NoNewPrivs"] == "1" and forked["status"]["Seccomp"] == "2"
    assert forked["status"]["CapEff"] == forked["status"]["CapPrm"] == "0000000000000000"
    assert forked["shadow"] == forked["runner_file"] == "PermissionError"  # Landlock
    assert forked["unix_socket"] == "PermissionError"  # seccomp: no way to reach any unix socket
    assert forked["tcp"] != "allowed" and forked["netdevs"] == ["lo"]  # a network namespace of its own
    # The runtime is PID 2 under its own init; nothing outside its namespace is visible, and its
    # init (root's, whose command line is the fence's) is hidden too: /proc is mounted hidepid=2.
    assert forked["pid"] == 2 and forked["ppid"] == 1 and forked["pids"] == [2]
    # Nothing of the fork server: no socket or pidfd, only the pipes and the at-run-exec's own dup.
    assert forked["fd_kinds"] == ["pipe"], forked["fds"]
    assert not forked["fence_loaded"]
    assert not {"Server", "Become", "fence", "worker_init"} & set(forked["frames"]), forked["frames"]
    assert forked["pgrp_is_sid"]
    # The fork server's command line, which the worker inherits, names no file of the runner's.
    assert forked["cmdline"][:4] == ["/usr/bin/python3", "-I", "-S", "-"] and forked["cmdline"][4].isdigit()
    # And the same as the exec path, item by item (the group ids and uid differ per worker).
    for key in ("limits", "fds", "fd_kinds", "pid", "ppid", "pids", "shadow", "runner_file", "unix_socket",
                "tcp", "netdevs", "cwd", "environ", "argv0", "file", "list_run", "pgrp_is_sid"):
        assert forked[key] == execed[key], key
    for key in ("NoNewPrivs", "Seccomp", "CapEff", "CapBnd", "CapPrm", "Groups"):
        assert forked["status"][key] == execed["status"][key], key


async def test_the_worker_comes_from_the_fork_server(tmp_path):
    """Guards the test above: with fork_server on, the pool really forks (and off, it does not)."""
    from atrund.execute.process.forked import ForkedWorker

    for on in (True, False):
        executor = create_executor(ExecutorSection(**_settings(tmp_path, on)))
        try:
            await executor.backend.ready()
            worker = await executor.backend.spawn(executor.runtimes["python"], executor.settings, ExecPermissions())
            assert isinstance(worker, ForkedWorker) is on
            await worker.kill()
            assert worker.exited() is not None and gone(worker.process.pid)
        finally:
            await executor.shutdown()


SLEEPER = "import time\ndef main(args):\n    time.sleep(args['s'])\n    return 'woke'\n"


async def test_the_fork_server_dying_fails_the_running_request_and_the_next_one_works(tmp_path):
    bundle = tmp_path / "sleep.py"
    bundle.write_text(SLEEPER)
    executor = create_executor(ExecutorSection(**_settings(tmp_path)))
    try:
        await executor.backend.ready()
        first = executor.backend.fork_server.pid
        running = asyncio.ensure_future(executor.execute(
            ExecRequest(code_path=str(bundle), endpoint="main", args={"s": 20}, timeout=30), "python"))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ExecutorError, match="fork server"):
            await running
        assert time.monotonic() - started < 5, "the request waited for its deadline instead of failing"
        r = await executor.execute(ExecRequest(code_path=str(bundle), endpoint="main", args={"s": 0}), "python")
        assert r.success and r.data == "woke"
        assert executor.backend.fork_server is not None and executor.backend.fork_server.pid != first  # restarted
    finally:
        await executor.shutdown()


async def test_a_fork_server_that_cannot_start_leaves_the_exec_path(tmp_path, monkeypatch):
    from atrund.execute.process import forked

    monkeypatch.setattr(forked, "FORKSERVER", tmp_path / "missing.py")  # the program the runner starts is absent
    bundle = tmp_path / "sleep.py"
    bundle.write_text(SLEEPER)
    executor = create_executor(ExecutorSection(**_settings(tmp_path)))
    try:
        r = await executor.execute(ExecRequest(code_path=str(bundle), endpoint="main", args={"s": 0}), "python")
        assert r.success and r.data == "woke"
        assert executor.backend.fork_server is None and "fork server" in executor.backend.fork_server_problem
    finally:
        await executor.shutdown()


RUNNER = textwrap.dedent('''
    import asyncio, json, sys
    sys.path.insert(0, {root!r})
    from atrund.config import ExecutorSection
    from atrund.execute import ExecRequest, create_executor

    async def main():
        executor = create_executor(ExecutorSection(**json.loads(sys.argv[1])))
        await executor.warm(1)
        print(json.dumps({{"server": executor.backend.fork_server.pid}}), flush=True)
        await executor.execute(ExecRequest(code_path=sys.argv[2], endpoint="main", args={{"s": 60}}, timeout=120), "python")

    asyncio.run(main())
''')


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


async def test_the_runner_dying_kills_the_fork_server_and_its_workers(tmp_path):
    from atrund.execute.process.backend import ProcessBackend

    bundle = tmp_path / "sleep.py"
    bundle.write_text(SLEEPER)
    settings = _settings(tmp_path)
    runner = subprocess.Popen([sys.executable, "-c", RUNNER.format(root=str(ROOT)), json.dumps(settings), str(bundle)],
                              stdout=subprocess.PIPE, text=True)
    try:
        server = json.loads(runner.stdout.readline())["server"]
        deadline = time.monotonic() + 10
        # The busy worker and the warm one that replaces it, each an init and its runtime's process.
        while time.monotonic() < deadline:
            inits = _children(server)
            workers = [p for init in inits for p in _children(init)]
            if len(inits) >= 2 and len(workers) == len(inits):
                break
            await asyncio.sleep(0.05)
        assert len(inits) >= 2 and len(workers) == len(inits)
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 5
        while not all(gone(p) for p in [server, *inits, *workers]) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert all(gone(p) for p in [server, *inits, *workers]), "the fork server or a worker outlived the runner"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        runner.stdout.close()
        ProcessBackend(ExecutorSection(**settings))  # as the next runner would: removes what the dead one left
