"""The ``none`` backend: at-run-exec as a plain subprocess of the runner.

What contains the bundle here: a clean environment, a private empty working directory,
resource limits set with prlimit(2) on the worker before it reads its request (so before any
bundle code runs; a bundle running as an unprivileged user cannot raise a hard limit), and a
process group of its own that is killed whole. No kernel sandbox: that is the ``process``
backend's job. For development and trusted code.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path

from atrund.execute.base import ExecutorError
from atrund.execute.pool import Backend, Worker, cpu_limit
from atrund.execute.protocol import ExecPermissions
from atrund.execute.runtimes import Runtime

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# If the runner dies (even by SIGKILL), its workers must not live on: setpriv (util-linux)
# sets the parent-death signal before exec'ing the runtime. Processes the bundle itself
# starts are not covered; containing those is the job of the stronger backends.
SETPRIV = shutil.which("setpriv")
PIPE_GRACE = 0.5  # seconds a killed worker's pipes get to close by themselves


class DirectWorker(Worker):
    def __init__(self, process: asyncio.subprocess.Process, workdir: Path) -> None:
        self.process = process
        self.workdir = workdir
        assert process.stdin and process.stdout and process.stderr
        self.stdin, self.stdout, self.stderr = process.stdin, process.stdout, process.stderr

    def exited(self) -> int | None:
        return self.process.returncode

    def root_pid(self) -> int | None:
        return self.process.pid  # setpriv execs the runtime: this is at-run-exec itself

    async def wait_exit(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout)
        except asyncio.TimeoutError:
            pass

    def kill_processes(self) -> None:
        """SIGKILL the worker's whole process group (a sandboxing backend kills more first)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def kill(self) -> None:
        self.kill_processes()
        try:
            await asyncio.wait_for(asyncio.shield(self.process.wait()), PIPE_GRACE)
        except asyncio.TimeoutError:
            # Dead, but asyncio's wait() also waits for the pipes to close, which a setsid'd
            # daemon holding them, or a reader paused at the output cap, delays: drop our ends.
            # (Only now: closing the transport polls and reaps the process itself, which
            # leaves asyncio's child watcher without an exit status to report.)
            self.process._transport.close()  # noqa: SLF001 - asyncio offers no public way
            await self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _limits(settings, runtime: Runtime) -> list[tuple[int, int]]:
    mem = data_limit(settings, runtime)
    cpu = cpu_limit(settings)
    return [
        (resource.RLIMIT_DATA, mem),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, 64 * 1024 * 1024),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ]


def data_limit(settings, runtime: Runtime) -> int:
    """RLIMIT_DATA in bytes: the operator's memory_mb, plus what the runtime reserves up front
    without using it (V8 in Deno maps a 512 MiB code range writable at start)."""
    return (settings.memory_mb + runtime.data_overhead_mb) * 1024 * 1024


def check_program(runtime: Runtime) -> None:
    program = runtime.command[0]
    if not (shutil.which(program) or os.access(program, os.X_OK)):
        raise ExecutorError(f"cannot start {runtime.name} worker: {program} is not an executable program")


async def spawn_process(command: list[str], name: str, workdir: Path, settings,
                        pass_fds: list[int] = ()) -> asyncio.subprocess.Process:
    """Start a worker process in its own session (so its whole group can be killed), with pipes
    (and ``pass_fds`` inherited)."""
    env = {"PATH": SAFE_PATH, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
    try:
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
            limit=settings.max_output_bytes + 4096,
        )
    except OSError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ExecutorError(f"cannot start {name} worker {command[0]}: {e.strerror}") from e


class DirectBackend(Backend):
    isolation = "none"

    async def spawn(self, runtime: Runtime, settings, permissions: ExecPermissions) -> Worker:
        check_program(runtime)
        workdir = Path(tempfile.mkdtemp(prefix=f"atrund-{runtime.name}-"))
        prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
        process = await spawn_process([*prefix, *runtime.command], runtime.name, workdir, settings)
        worker = DirectWorker(process, workdir)
        try:
            for res, value in _limits(settings, runtime):
                resource.prlimit(process.pid, res, (value, value))
        except OSError as e:
            await worker.kill()
            raise ExecutorError(f"cannot set resource limits on the worker: {e.strerror}") from e
        return worker
