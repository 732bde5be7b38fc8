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
from atrund.execute.pool import Backend, Worker
from atrund.execute.runtimes import Runtime

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# If the runner dies (even by SIGKILL), its workers must not live on: setpriv (util-linux)
# sets the parent-death signal before exec'ing the runtime. Processes the bundle itself
# starts are not covered; containing those is the job of the stronger backends.
SETPRIV = shutil.which("setpriv")


class DirectWorker(Worker):
    def __init__(self, process: asyncio.subprocess.Process, workdir: Path) -> None:
        self.process = process
        self.workdir = workdir
        assert process.stdin and process.stdout and process.stderr
        self.stdin, self.stdout, self.stderr = process.stdin, process.stdout, process.stderr

    def exited(self) -> int | None:
        return self.process.returncode

    async def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _limits(settings) -> list[tuple[int, int]]:
    mem = settings.memory_mb * 1024 * 1024
    cpu = settings.max_timeout + 1
    return [
        (resource.RLIMIT_DATA, mem),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, 64 * 1024 * 1024),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ]


class DirectBackend(Backend):
    isolation = "none"

    async def spawn(self, runtime: Runtime, settings) -> Worker:
        program = runtime.command[0]
        if not (shutil.which(program) or os.access(program, os.X_OK)):
            raise ExecutorError(f"cannot start {runtime.name} worker: {program} is not an executable program")
        workdir = Path(tempfile.mkdtemp(prefix=f"atrund-{runtime.name}-"))
        env = {"PATH": SAFE_PATH, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        try:
            prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
            process = await asyncio.create_subprocess_exec(
                *prefix,
                *runtime.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env=env,
                start_new_session=True,
                limit=settings.max_output_bytes + 4096,
            )
        except OSError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            raise ExecutorError(f"cannot start {runtime.name} worker {runtime.command[0]}: {e.strerror}") from e
        worker = DirectWorker(process, workdir)
        try:
            for res, value in _limits(settings):
                resource.prlimit(process.pid, res, (value, value))
        except OSError as e:
            await worker.kill()
            raise ExecutorError(f"cannot set resource limits on the worker: {e.strerror}") from e
        return worker
