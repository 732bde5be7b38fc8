"""The worker pool: everything about running a request that is the same for every backend.

A backend only knows how to start an at-run-exec worker and how to kill it (``Backend``).
Deadlines, the answer-size cap, warm workers, slot accounting, statistics and turning every
way a worker can fail into an ExecResponse are written once, here.

One worker serves exactly one request: untrusted code never shares a process with another
invocation. "Warm" means started and waiting for its request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import statistics
import time
from abc import ABC, abstractmethod

import structlog

from atrund.bounds import Malformed
from atrund.execute.base import ExecutorError, PoolStats
from atrund.execute.protocol import ExecPermissions, ExecRequest, ExecResponse, parse_answer, parse_ready
from atrund.execute.runtimes import Runtime, load_runtimes
from atrund.records import data_problem

log = structlog.get_logger("atrund.execute")

READY_TIMEOUT = 15.0  # seconds a new worker may take to announce it is ready
STDERR_TAIL = 4096  # bytes of the bundle's own output kept for error messages
EXIT_GRACE = 0.5  # seconds a worker that closed its output gets to exit before it is killed
METRIC_SLACK_MS = 1000  # a metric may exceed the request's timeout by this much (clock granularity, a VM's clock)
NO_PERMISSIONS = ExecPermissions()


class Worker(ABC):
    """A started at-run-exec, reached through three byte streams."""

    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader

    def stage(self, code_path: str) -> str:
        """Make the bundle file reachable by the worker; returns the path the worker sees."""
        return code_path

    @abstractmethod
    def exited(self) -> int | None:
        """The exit code if the worker is gone, else None."""

    @abstractmethod
    async def wait_exit(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the worker to exit on its own."""

    @abstractmethod
    async def kill(self) -> None:
        """Kill the worker and everything it started; release its resources. Idempotent."""

    def out_of_memory(self) -> bool:
        """Whether the worker was killed for exceeding its memory limit (if the backend can tell)."""
        return False

    def lost(self) -> str | None:
        """Why the worker's output ended if the backend, not the program, is to blame (e.g. the
        container engine went away); None when the program itself ended."""
        return None

    def diagnostics(self) -> str:
        """What the backend saw of a worker that did not start (e.g. a VM's console), if anything."""
        return ""


class Backend(ABC):
    isolation: str
    monitor_name: str | None = None  # the virtual machine monitor, for a backend that runs VMs
    ready_timeout: float = READY_TIMEOUT  # a backend that boots something slow (a VM) may allow more

    def __init__(self, settings) -> None:
        """Built from the executor settings (registry.backend_class names the class)."""
        self.settings = settings
        self._ready: asyncio.Future | None = None

    async def prepare(self) -> None:  # noqa: B027 - a hook: most backends have nothing to set up
        """What a backend checks and sets up once, before its first worker (an engine that
        answers, a guest image that matches): nothing by default."""

    async def ready(self) -> None:
        """``prepare()``, once for every caller; after a failure the next call tries again (the
        engine may be back)."""
        if self._ready is None:
            self._ready = asyncio.ensure_future(self.prepare())
        try:
            await asyncio.shield(self._ready)
        except ExecutorError:
            self._ready = None
            raise

    def stop_preparing(self) -> None:
        """At close: a ``prepare()`` still running is cancelled."""
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()

    @abstractmethod
    async def spawn(self, runtime: Runtime, settings, permissions: ExecPermissions) -> Worker:
        """Start an at-run-exec worker whose fence grants ``permissions`` (and nothing else)."""

    async def close(self) -> None:
        return None


class WorkerPool:
    """The executor of the seed's interface: ``execute``, ``stats``, ``warm``, ``drain`` and
    ``shutdown``, over one backend. ``runtimes`` is what it can run (name -> Runtime)."""

    def __init__(self, backend: Backend, settings) -> None:
        self.backend = backend
        self.isolation = backend.isolation
        self.monitor = backend.monitor_name  # what the runner record states beside the isolation
        self.settings = settings
        self.runtimes = load_runtimes(settings.runtimes_dir)
        self._warm: dict[str, collections.deque[Worker]] = {name: collections.deque() for name in self.runtimes}
        self._warm_target = 0
        self._warming = False  # warm() was called: keep the pool topped up
        self._starting: collections.Counter[str] = collections.Counter()
        self._refills: set[asyncio.Task] = set()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._counts = collections.Counter()
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)

    # -- lifecycle -----------------------------------------------------------------------

    async def warm(self, count: int) -> None:
        """Keep ``count`` started workers waiting, per runtime (``warm_by_runtime`` overrides)."""
        self._warm_target = count
        self._warming = True
        await asyncio.gather(*(self._refill(name) for name in self.runtimes))

    def _target(self, runtime: str) -> int:
        return self.settings.warm_by_runtime.get(runtime, self._warm_target) if self._warming else 0

    async def _refill(self, runtime: str) -> None:
        while not self._closed and len(self._warm[runtime]) + self._starting[runtime] < self._target(runtime):
            self._starting[runtime] += 1
            try:
                worker = await self._start(self.runtimes[runtime])
            except ExecutorError as e:
                log.warning("warm worker failed to start", runtime=runtime, error=str(e))
                return
            finally:
                self._starting[runtime] -= 1
            if self._closed:
                await worker.kill()
                return
            self._warm[runtime].append(worker)

    def _schedule_refill(self, runtime: str) -> None:
        if self._warming and not self._closed:
            self._track(asyncio.create_task(self._refill(runtime)))

    def _track(self, task: asyncio.Future) -> None:
        """Background work (refills, teardowns) that shutdown() must wait for."""
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def drain(self) -> None:
        """Stop handing out work and wait for running requests to finish."""
        self._closed = True
        await self._idle.wait()
        await self._release_warm()  # nothing is handed out any more: warm workers would only wait

    async def shutdown(self) -> None:
        """Kill every warm worker and close the backend (which kills what it still runs)."""
        self._closed = True
        await self._release_warm()
        await self.backend.close()

    async def _release_warm(self) -> None:
        # Refills stop at _closed; teardowns are let finish (they kill processes, remove containers).
        await asyncio.gather(*self._refills, return_exceptions=True)
        workers = [w for q in self._warm.values() for w in q]
        for q in self._warm.values():
            q.clear()
        await asyncio.gather(*(w.kill() for w in workers), return_exceptions=True)

    def stats(self) -> PoolStats:
        lat = sorted(self._latencies)
        return PoolStats(
            isolation=self.isolation,
            warm={name: len(q) for name, q in self._warm.items()},
            busy=self._busy,
            completed=self._counts["completed"],
            failed=self._counts["failed"],
            timeouts=self._counts["timeouts"],
            cold_starts=self._counts["cold"],
            latency_p50_ms=round(statistics.median(lat), 1) if lat else None,
            latency_p95_ms=round(lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
        )

    # -- one request ---------------------------------------------------------------------

    async def _start(self, runtime: Runtime, permissions: ExecPermissions = NO_PERMISSIONS) -> Worker:
        worker = await self.backend.spawn(runtime, self.settings, permissions)
        try:
            line = await asyncio.wait_for(worker.stdout.readline(), self.backend.ready_timeout)
        except (asyncio.TimeoutError, ValueError):
            line = b""
        if not parse_ready(line):
            await worker.kill()  # first: a worker that hangs would never end its stderr
            err = await _tail(worker.stderr)
            extra = worker.diagnostics()
            raise ExecutorError(f"{runtime.name} worker did not start: {err or line[:200]!r}" + (f"; {extra}" if extra else ""))
        return worker

    async def _take(self, runtime: Runtime, permissions: ExecPermissions) -> Worker:
        """A warm worker if the request needs no more than the default fence, else a new one."""
        fenced = ExecPermissions(net=permissions.net, read=permissions.read, write=permissions.write)
        if fenced != NO_PERMISSIONS:
            self._counts["cold"] += 1
            return await self._start(runtime, fenced)
        queue = self._warm[runtime.name]
        while queue:
            worker = queue.popleft()
            if worker.exited() is None:
                return worker
            await worker.kill()  # died while waiting (OOM killer, operator); not the bundle's fault
        self._counts["cold"] += 1
        return await self._start(runtime)

    async def execute(self, request: ExecRequest, runtime: str) -> ExecResponse:
        """Run one request in a fresh worker of ``runtime``.

        The seed passes a MIME type to pick the runtime; a bundle record names its runtime
        explicitly, so that name is what selects the worker here."""
        if self._closed:
            raise ExecutorError("executor is shut down")
        rt = self.runtimes.get(runtime)
        if rt is None:
            return _fail(f"runtime {runtime!r} is not offered here (offered: {', '.join(self.runtimes)})", "UnknownRuntime")
        self._busy += 1
        self._idle.clear()
        started = time.monotonic()
        try:
            worker = await self._take(rt, request.permissions)
            try:
                response = await self._run(worker, request)
            finally:
                # The answer is in hand: tear the worker down and start its replacement, both off
                # the caller's path (spawning forks in this thread, so it must not delay the answer).
                self._track(asyncio.ensure_future(worker.kill()))
                self._schedule_refill(rt.name)
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()
        self._latencies.append((time.monotonic() - started) * 1000)
        self._counts["completed" if response.success else "failed"] += 1
        if response.timed_out:
            self._counts["timeouts"] += 1
        return response

    async def _run(self, worker: Worker, request: ExecRequest) -> ExecResponse:
        stderr_tail = asyncio.create_task(_tail(worker.stderr))
        request = request.model_copy(update={"code_path": worker.stage(request.code_path)})
        try:
            worker.stdin.write(request.to_json().encode() + b"\n")
            await worker.stdin.drain()
            worker.stdin.close()
        except (ConnectionError, BrokenPipeError):
            pass  # the worker is gone; reading its answer below says how
        try:
            line = await asyncio.wait_for(worker.stdout.readline(), request.timeout)
        except asyncio.TimeoutError:
            stderr_tail.cancel()
            return _fail(f"timed out after {request.timeout} s", "Timeout", timed_out=True, elapsed_s=request.timeout)
        except ValueError:  # asyncio's StreamReader limit: the line is longer than allowed
            stderr_tail.cancel()
            return _fail(f"answer larger than {self.settings.max_output_bytes} bytes", "OutputTooLarge")
        if not line:
            await worker.wait_exit(EXIT_GRACE)  # read its exit status before we kill it ourselves
            with contextlib.suppress(asyncio.TimeoutError):  # its last words, unless a daemon holds stderr
                await asyncio.wait_for(asyncio.shield(stderr_tail), EXIT_GRACE)
            await worker.kill()
            if why := worker.lost():  # not the bundle's doing: an infrastructure failure
                stderr_tail.cancel()
                raise ExecutorError(f"the {self.isolation} worker was lost before it answered: {why}")
            tail = stderr_tail.result() if stderr_tail.done() else ""
            if worker.out_of_memory():
                return _fail(f"the bundle ran out of memory (limit {self.settings.memory_mb} MiB) before answering"
                             + (f"; its last output: {tail}" if tail else ""), "MemoryError")
            code = worker.exited()
            how = _exit_description(code)
            return _fail(f"the bundle process {how} before answering" + (f"; its last output: {tail}" if tail else ""), "Crash")
        stderr_tail.cancel()
        if len(line) > self.settings.max_output_bytes:
            return _fail(f"answer larger than {self.settings.max_output_bytes} bytes", "OutputTooLarge")
        return _checked(line, request.timeout)


def _checked(line: bytes, timeout: int) -> ExecResponse:
    """The worker's answer line, checked as the untrusted data it is (bundle code shares the
    worker with the wrapper that writes it): it must match the protocol schema, strictly (see
    protocol.parse_answer); its metrics cannot exceed the time the runner allowed the run;
    a return value no record could hold (a lone surrogate, see records.data_problem) is refused
    here, once, for every consumer (results, XRPC, the gateway, ``atrund exec``). Text meant for
    people (error, HTTP headers and body) arrives with lone surrogates replaced (parse_answer)."""
    try:
        response = parse_answer(line)
    except Malformed as e:
        return _fail(f"at-run-exec answered with something that is not an ExecResponse: {e}", "ProtocolError")
    limit = timeout * 1000 + METRIC_SLACK_MS
    for name, value in response.metrics.model_dump(by_alias=True, exclude_none=True).items():
        if value > limit:
            return _fail(f"at-run-exec answered with something that is not an ExecResponse: metrics.{name}: must be an "
                         f"integer between 0 and {limit} (the request's timeout plus {METRIC_SLACK_MS} ms)", "ProtocolError")
    if response.success and (problem := data_problem(response.data)):
        refused = _fail(f"the return value {problem}", "InvalidReturnValue")
        refused.metrics = response.metrics
        return refused
    return response


def _exit_description(code: int | None) -> str:
    if code is None:
        return "closed its output"
    if code < 0:
        return f"was killed by {_signal_name(-code)}"
    if code > 128 and _signal_name(code - 128, None):
        # A sandboxed runtime is not our child: its init passes a fatal signal on as 128 + n.
        return f"was killed by {_signal_name(code - 128)}"
    return f"exited with code {code}"


def _signal_name(number: int, default: str | None = "") -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}" if default == "" else default


def _fail(message: str, error_type: str, timed_out: bool | None = None, elapsed_s: int | None = None) -> ExecResponse:
    resp = ExecResponse(success=False, error=message, error_type=error_type, timed_out=timed_out)
    if elapsed_s is not None:
        resp.metrics.execution_time_ms = elapsed_s * 1000
    return resp


def feed_stderr(stream: asyncio.StreamReader, data: bytes) -> None:
    """Pass a worker's stderr on to the pool, which keeps only its tail: a backend that
    demultiplexes its own channel drops what lies well past that tail instead of buffering it."""
    if len(stream._buffer) < 4 * STDERR_TAIL + (1 << 16):  # noqa: SLF001 - asyncio offers no public size
        stream.feed_data(data)


async def _tail(stream: asyncio.StreamReader) -> str:
    """Read a stream to its end, keeping only the last bytes (the bundle may print forever)."""
    buf = bytearray()
    try:
        while chunk := await stream.read(65536):
            buf += chunk
            del buf[:-STDERR_TAIL]
    except (ConnectionError, asyncio.CancelledError):
        pass
    return buf.decode("utf-8", "replace").strip()
