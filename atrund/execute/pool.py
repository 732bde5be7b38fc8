"""The worker pool: everything about running a request that is the same for every backend.

A backend only knows how to start an at-run-exec worker and how to kill it (``Backend``).
Deadlines, the answer-size cap, warm and hot workers, slot accounting, statistics and turning
every way a worker can fail into an ExecResponse are written once, here.

Reuse. A worker that has answered a request cleanly is kept ("hot") for the next request with
the same reuse key (``reuse_key``: runtime, bundle, grants and secrets; the backend is the
pool's own), never for another key: two requests that differ in any of those never share a
process. A request goes to a hot worker of its key, else to a warm one (started ahead, with the
default fence, and not yet given a bundle), else to a worker started for it (a cold start).
A worker is discarded instead of kept when its answer was not clean (deadline, crash, output
cap, protocol error), when the bundle left a thread or process running, when the runner cannot
give it a fresh CPU budget, when it passed its memory high-water mark or served
``max_requests``; idle hot workers are killed after ``max_idle_seconds`` and the least recently
used beyond ``hot_max`` / ``hot_memory_mb``. ``reuse = "never"`` gives every request a worker of
its own, as before reuse existed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import signal
import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass

import structlog

from atrund.bounds import Malformed
from atrund.execute import procs
from atrund.execute.base import ExecutorError, PoolStats
from atrund.execute.protocol import (
    OUTPUT_MARK,
    STATE_PREFIX,
    ExecEgress,
    ExecPermissions,
    ExecRequest,
    ExecResponse,
    Ready,
    StateHandler,
    parse_answer,
    parse_ready,
    parse_state_call,
)
from atrund.execute.runtimes import Runtime, load_runtimes
from atrund.records import data_problem

EGRESS_COUNTS = tuple(f"egress_{name}" for name in ExecEgress.__dataclass_fields__)  # PoolStats' names
log = structlog.get_logger("atrund.execute")

READY_TIMEOUT = 15.0  # seconds a new worker may take to announce it is ready
STDERR_TAIL = 4096  # bytes of the bundle's own output kept for error messages
EXIT_GRACE = 0.5  # seconds a worker that closed its output gets to exit before it is killed
MARK_WAIT = 0.1  # seconds the pool waits after an answer for the end-of-output mark
METRIC_SLACK_MS = 1000  # a metric may exceed the request's timeout by this much (clock granularity, a VM's clock)
NO_PERMISSIONS = ExecPermissions()
CORES = os.cpu_count() or 1


class Worker(ABC):
    """A started at-run-exec, reached through three byte streams."""

    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    overhead = 0  # processes the backend runs above the runtime's own (an init), counted from root_pid()

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

    async def egress(self) -> ExecEgress | None:
        """What the worker's egress proxy carried so far (running totals), every connection the
        worker has made counted (Egress.settled); None without one."""
        return None

    # -- what reuse needs to see from outside (procs.py); a backend that cannot see the worker's
    # processes keeps the defaults, and its workers serve one request each.

    def root_pid(self) -> int | None:
        """The pid, in the runner's view, at the top of the worker's processes; None if the runner
        cannot see them (a remote engine, a VM)."""
        return None

    def census(self, runtime: Runtime, cpu: bool) -> Census:
        """What the worker holds once it has answered, read from outside, in one pass over its
        processes (this runs between every two requests of a hot worker). ``cpu``: whether the
        pool needs the CPU time too (it does only when the worker may have spent enough to matter)."""
        root = self.root_pid()
        if root is None:
            return Census(left=None, cpu=None, memory=None)
        pids = procs.tree(root)
        runs_bundle = pids[self.overhead] if len(pids) > self.overhead else None
        return Census(left=leftovers(len(pids) - self.overhead, procs.threads(runs_bundle) if runs_bundle else 1, runtime),
                      cpu=procs.cpu_spent(pids) if cpu else 0.0, memory=procs.rss_bytes(pids))


@dataclass
class Census:
    left: str | None  # what the bundle left running, or None
    cpu: float | None  # the most CPU time one process of the worker has used (0.0: not asked); None: cannot tell
    memory: int | None  # bytes the worker holds, if the backend can tell


def leftovers(processes: int, threads: int, runtime: Runtime) -> str | None:
    """What a worker runs beyond at-run-exec (and the runtime's own program, if it has one),
    from its count of processes below the backend's own and of threads in the process that runs
    the bundle (at-run-exec itself, for a runtime without a program: deno's and node's threads
    are the runtime's business)."""
    expected = 1 + (runtime.program is not None)
    if processes > expected:
        return f"{processes - expected} process(es) still running"
    if runtime.program is None and threads > 1:
        return "a thread still running"
    return None


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


def cpu_budget(settings) -> int:
    """CPU seconds one request may use in any one process: max_timeout + 1."""
    return settings.max_timeout + 1


def cpu_limit(settings) -> int:
    """The hard RLIMIT_CPU a worker starts with: one budget, or two when it may be reused (the
    pool retires it before less than one is left; no one can raise a hard limit later)."""
    return cpu_budget(settings) * (2 if settings.reuse == "bundle" else 1)


def reuse_key(runtime: str, request: ExecRequest) -> tuple:
    """The key a hot worker serves: the runtime, the bundle (its code path names the blob's CID),
    the grants and a fingerprint of the secrets. Not the invoker or the args: results are public
    records, and a bundle's globals are its own (docs/threat-model.md, reuse). Secrets are in it,
    so one invoker's sealed secrets never reach a process that serves another's. Compared whole
    (no hash of it stands in for it); the secrets' values as a SHA-256, so the pool holds no
    copy of them."""
    p = request.permissions
    secrets = hashlib.sha256(json.dumps(sorted(request.env.items())).encode()).hexdigest() if request.env else ""
    return (runtime, request.code_path, tuple(p.net), tuple(p.net_private), tuple(p.read), tuple(p.write), tuple(p.env),
            secrets)


class _Output:
    """A worker's stderr (where the bundle's prints go: at-run-exec points its stdout there),
    drained for as long as the worker lives (a full pipe would stall it), keeping the last
    ``keep`` bytes since the current request began: what ``atrund exec`` and ``atrund logs``
    show, and the bundle's last words if it crashes (the last STDERR_TAIL of them)."""

    def __init__(self, stream: asyncio.StreamReader, keep: int) -> None:
        self.buf = bytearray()
        self.keep = max(keep, STDERR_TAIL)
        self.marked = asyncio.Event()  # the current request's OUTPUT_MARK came
        self.task = asyncio.ensure_future(self._drain(stream))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, ValueError):
            while chunk := await stream.read(65536):
                new = max(0, len(self.buf) - len(OUTPUT_MARK) + 1)  # where a mark could start: what came, and its seam
                self.buf += chunk
                if self.buf.find(OUTPUT_MARK, new) >= 0:  # also one that came in two chunks
                    self.buf = self.buf.replace(OUTPUT_MARK, b"")  # once per request: earlier marks are gone already
                    self.marked.set()
                del self.buf[:-self.keep]

    def begin(self) -> None:
        """A request starts: nothing printed before it is its output."""
        self.buf.clear()
        self.marked.clear()

    async def ended(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the stream to end (a daemon the bundle started may hold it)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def caught_up(self, marks: bool) -> None:
        """Wait until the drain has what the request printed before its answer. The print and
        the answer travel apart (two pipes; the container engine copies each stream in its own
        goroutine), so the answer can be read first. A worker that marks its output's end is
        waited for until the mark comes (at most MARK_WAIT: the bundle may have closed its
        stderr). Otherwise a few turns of the event loop: enough for two pipes of one process,
        whose stderr the loop sees readable no later than the stdout that followed it."""
        if marks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.marked.wait(), MARK_WAIT)
            return
        for _ in range(4):
            await asyncio.sleep(0)

    def text(self, last: int) -> str:
        """The last ``last`` bytes kept, as text (a character cut in two is replaced)."""
        return self.buf[-last:].decode("utf-8", "replace").strip()


class _Lease:
    """The pool's bookkeeping of one worker: how it was started, how much it has served."""

    def __init__(self, worker: Worker, runtime: Runtime, ready: Ready, keep: int) -> None:
        self.worker = worker
        self.runtime = runtime
        self.reuse = ready.reuse  # the ready line said it serves several requests
        self.marks = ready.marks  # ... and marks the end of each request's output
        self.output = _Output(worker.stderr, keep)
        self.served = 0
        self.staged: tuple[str, str] | None = None  # (code path, the path the worker sees)
        self.idle_since = 0.0
        self.memory = 0
        self.active = 0.0  # seconds it has been starting or running requests: all the CPU time it can have used, per core

    async def kill(self) -> None:
        self.output.task.cancel()
        await self.worker.kill()


class WorkerPool:
    """The executor of the seed's interface: ``execute``, ``stats``, ``warm``, ``drain`` and
    ``shutdown``, over one backend. ``runtimes`` is what it can run (name -> Runtime)."""

    def __init__(self, backend: Backend, settings) -> None:
        self.backend = backend
        self.isolation = backend.isolation
        self.monitor = backend.monitor_name  # what the runner record states beside the isolation
        self.settings = settings
        self.runtimes = load_runtimes(settings.runtimes_dir)
        self._warm: dict[str, collections.deque[_Lease]] = {name: collections.deque() for name in self.runtimes}
        # Hot workers by reuse key, least recently used key first; each key's idle workers.
        self._hot: collections.OrderedDict[tuple, collections.deque[_Lease]] = collections.OrderedDict()
        self._warm_target = 0
        self._warming = False  # warm() was called: keep the pool topped up
        self._starting: collections.Counter[str] = collections.Counter()
        self._refills: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._busy = 0
        self._reusing: collections.Counter[str] = collections.Counter()  # code paths being run now by a reusable worker
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
        with contextlib.suppress(ExecutorError):  # what a backend sets up once (a fork server), before the first request
            await self.backend.ready()  # pays; a failure is reported by the spawns that need it
        await asyncio.gather(*(self._refill(name) for name in self.runtimes))

    def _target(self, runtime: str) -> int:
        return self.settings.warm_by_runtime.get(runtime, self._warm_target) if self._warming else 0

    async def _refill(self, runtime: str) -> None:
        while not self._closed and len(self._warm[runtime]) + self._starting[runtime] < self._target(runtime):
            self._starting[runtime] += 1
            try:
                lease = await self._start(self.runtimes[runtime])
            except ExecutorError as e:
                log.warning("warm worker failed to start", runtime=runtime, error=str(e))
                return
            finally:
                self._starting[runtime] -= 1
            if self._closed:
                await lease.kill()
                return
            self._warm[runtime].append(lease)

    def _schedule_refill(self, runtime: str) -> None:
        if self._warming and not self._closed:
            self._track(asyncio.create_task(self._refill(runtime)))

    def _track(self, task: asyncio.Future) -> None:
        """Background work (refills, teardowns) that shutdown() must wait for."""
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    def _discard(self, lease: _Lease) -> None:
        """Kill a worker off the caller's path (killing, unmounting, removing take time)."""
        self._track(asyncio.ensure_future(lease.kill()))

    async def drain(self) -> None:
        """Stop handing out work and wait for running requests to finish."""
        self._closed = True
        await self._idle.wait()
        await self._release_idle()  # nothing is handed out any more: waiting workers would only wait

    async def shutdown(self) -> None:
        """Kill every waiting worker and close the backend (which kills what it still runs)."""
        self._closed = True
        await self._release_idle()
        await self.backend.close()

    async def _release_idle(self) -> None:
        # Refills stop at _closed; teardowns are let finish (they kill processes, remove containers).
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*self._refills, return_exceptions=True)
        leases = [lease for q in (*self._warm.values(), *self._hot.values()) for lease in q]
        for q in self._warm.values():
            q.clear()
        self._hot.clear()
        await asyncio.gather(*(lease.kill() for lease in leases), return_exceptions=True)

    def hot_code(self) -> set[str]:
        """The code paths (bundle blobs) this pool holds a hot worker for, idle or serving one of
        their requests now (what replicas tell each other: atrund.pgstate, migration 7)."""
        return {key[1] for key in self._hot} | set(self._reusing)  # a path leaves _reusing at 0

    def stats(self) -> PoolStats:
        lat = sorted(self._latencies)
        return PoolStats(
            isolation=self.isolation,
            warm={name: len(q) for name, q in self._warm.items()},
            hot=sum(len(q) for q in self._hot.values()),
            busy=self._busy,
            completed=self._counts["completed"],
            failed=self._counts["failed"],
            timeouts=self._counts["timeouts"],
            cold_starts=self._counts["cold"],
            hot_hits=self._counts["hot"],
            retired=self._counts["retired"],
            **{name: self._counts[name] for name in EGRESS_COUNTS},
            latency_p50_ms=round(statistics.median(lat), 1) if lat else None,
            latency_p95_ms=round(lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
        )

    # -- taking a worker -----------------------------------------------------------------

    async def _start(self, runtime: Runtime, permissions: ExecPermissions = NO_PERMISSIONS) -> _Lease:
        started = time.monotonic()
        worker = await self.backend.spawn(runtime, self.settings, permissions)
        try:
            line = await asyncio.wait_for(worker.stdout.readline(), self.backend.ready_timeout)
        except (asyncio.TimeoutError, ValueError):
            line = b""
        ready = parse_ready(line)
        if ready is None:
            await worker.kill()  # first: a worker that hangs would never end its stderr
            err = await _tail(worker.stderr)
            extra = worker.diagnostics()
            raise ExecutorError(f"{runtime.name} worker did not start: {err or line[:200]!r}" + (f"; {extra}" if extra else ""))
        lease = _Lease(worker, runtime, ready, self.settings.output_bytes)
        lease.active = time.monotonic() - started
        return lease

    async def _take(self, runtime: Runtime, request: ExecRequest, key: tuple | None) -> _Lease:
        """A hot worker of the key, else a warm one if the request needs no more than the
        default fence, else a new one."""
        if key is not None and (lease := self._hot_one(key)) is not None:
            self._counts["hot"] += 1
            return lease
        p = request.permissions
        fenced = ExecPermissions(net=p.net, read=p.read, write=p.write, net_private=p.net_private if p.net else [])
        if fenced == NO_PERMISSIONS:
            self._schedule_refill(runtime.name)  # off the caller's path: spawning forks in this thread
            queue = self._warm[runtime.name]
            while queue:
                lease = queue.popleft()
                if lease.worker.exited() is None:
                    return lease
                await lease.kill()  # died while waiting (OOM killer, operator); not the bundle's fault
        self._counts["cold"] += 1
        return await self._start(runtime, fenced)

    def _hot_one(self, key: tuple) -> _Lease | None:
        queue = self._hot.get(key)
        while queue:
            lease = queue.pop()  # the most recently used: the others may idle out
            if not queue:
                del self._hot[key]
            if lease.worker.exited() is None and time.monotonic() - lease.idle_since <= self.settings.max_idle_seconds:
                return lease
            self._discard(lease)
            queue = self._hot.get(key)
        return None

    # -- giving it back ------------------------------------------------------------------

    def _keep(self, lease: _Lease, key: tuple | None, response: ExecResponse, clean: bool) -> bool:
        """Shelve the worker for the next request of its key, or say why it goes."""
        retire = response.retire
        response.retire = None  # the worker's word to the pool, not part of the answer
        if key is None or not lease.reuse or not clean or self._closed:
            return False
        why = None
        if retire:
            why = "the bundle left a thread or process running (the worker said so)"
        elif lease.served >= self.settings.max_requests:
            why = f"served max_requests ({self.settings.max_requests})"
        elif lease.worker.exited() is not None:
            why = "it exited after answering"
        else:
            # CPU time accrues only while starting or running a request (what runs in between is
            # a leftover, and retires the worker): below one budget per core, no need to read it.
            census = lease.worker.census(lease.runtime, cpu=lease.active * CORES > cpu_budget(self.settings))
            high_water = self.settings.memory_high_water_percent * (self.settings.memory_mb << 20) // 100
            lease.memory = census.memory or 0
            if census.left:
                why = f"the bundle left {census.left}"
            elif census.cpu is None:
                why = "the runner cannot see its CPU time on this backend"
            elif census.cpu > cpu_budget(self.settings):
                why = f"it has used {census.cpu:.0f} CPU-s: less than a request's budget is left of its limit"
            elif lease.memory > high_water:
                why = f"it holds {lease.memory >> 20} MiB, past the high-water mark of {high_water >> 20} MiB"
        if why is not None:
            self._counts["retired"] += 1
            log.debug("worker retired", runtime=lease.runtime.name, served=lease.served, why=why)
            return False
        lease.idle_since = time.monotonic()
        self._hot.setdefault(key, collections.deque()).append(lease)
        self._hot.move_to_end(key)
        self._evict()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())
        return True

    def _evict(self) -> None:
        """Least recently used keys' workers go first, until both caps hold."""
        cap_memory = self.settings.hot_memory_mb << 20
        while self._hot:
            count = sum(len(q) for q in self._hot.values())
            memory = sum(lease.memory for q in self._hot.values() for lease in q)
            if count <= self.settings.hot_max and memory <= cap_memory:
                return
            key, queue = next(iter(self._hot.items()))
            self._discard(queue.popleft())
            if not queue:
                del self._hot[key]

    async def _sweep(self) -> None:
        """Kill hot workers idle longer than max_idle_seconds, while there are any."""
        idle = self.settings.max_idle_seconds
        while self._hot and not self._closed:
            await asyncio.sleep(max(0.5, min(idle / 2, 10.0)))
            now = time.monotonic()
            for key in list(self._hot):
                queue = self._hot[key]
                while queue and now - queue[0].idle_since > idle:
                    self._discard(queue.popleft())
                if not queue:
                    del self._hot[key]

    # -- one request ---------------------------------------------------------------------

    async def execute(self, request: ExecRequest, runtime: str, state: StateHandler | None = None) -> ExecResponse:
        """Run one request: in a hot worker of its reuse key, a warm one, or a new one.
        ``state``: what answers the run's state calls (atrund.kv); without it the run is offered
        no state, and a state call is refused.

        The seed passes a MIME type to pick the runtime; a bundle record names its runtime
        explicitly, so that name is what selects the worker here."""
        if self._closed:
            raise ExecutorError("executor is shut down")
        rt = self.runtimes.get(runtime)
        if rt is None:
            return _fail(f"runtime {runtime!r} is not offered here (offered: {', '.join(self.runtimes)})", "UnknownRuntime")
        key = reuse_key(rt.name, request) if self.settings.reuse == "bundle" else None
        self._busy += 1
        if key is not None:
            self._reusing[request.code_path] += 1
        self._idle.clear()
        started = time.monotonic()
        try:
            lease = await self._take(rt, request, key)
            kept = False
            try:
                response, clean = await self._run(lease, request, state)
                kept = self._keep(lease, key, response, clean)
            finally:
                if not kept:
                    self._discard(lease)
        finally:
            self._busy -= 1
            if key is not None:
                self._reusing[request.code_path] -= 1
                if not self._reusing[request.code_path]:
                    del self._reusing[request.code_path]
            if self._busy == 0:
                self._idle.set()
        self._latencies.append((time.monotonic() - started) * 1000)
        self._counts["completed" if response.success else "failed"] += 1
        if response.timed_out:
            self._counts["timeouts"] += 1
        return response

    async def _run(self, lease: _Lease, request: ExecRequest, state: StateHandler | None) -> tuple[ExecResponse, bool]:
        """The worker's answer, and whether it was clean: an answer line that follows the
        protocol (the bundle may still have failed), so the worker may serve again."""
        worker = lease.worker
        if lease.staged is None or lease.staged[0] != request.code_path:
            lease.staged = (request.code_path, worker.stage(request.code_path))
        # A fresh run id per request: a state call that carries another (left over from an
        # earlier request of this worker, or made up) is out of turn.
        run = os.urandom(12).hex() if state is not None else None
        request = request.model_copy(update={"code_path": lease.staged[1], "run": run})
        lease.served += 1
        lease.output.begin()
        began = time.monotonic()
        before = await worker.egress()
        try:
            response, clean = await self._exchange(lease, request, state)
        finally:
            lease.active += time.monotonic() - began
        # Only the runner says what the bundle printed: whatever the worker put here is replaced.
        keep = self.settings.output_bytes
        if keep:
            await lease.output.caught_up(lease.marks)
        response.output = (lease.output.text(keep) or None) if keep else None
        if before is not None and (after := await worker.egress()) is not None:
            used = ExecEgress(*(a - b for a, b in zip(astuple(after), astuple(before), strict=True)))
            response.set_egress(used)
            for name, value in zip(EGRESS_COUNTS, astuple(used), strict=True):
                self._counts[name] += value
        return response, clean

    async def _exchange(self, lease: _Lease, request: ExecRequest, state: StateHandler | None) -> tuple[ExecResponse, bool]:
        worker = lease.worker
        # A one-request worker's stdin stays open while it may still make state calls.
        # False: the worker is gone, and reading its answer below says how.
        await _send(worker, request.to_json().encode() + b"\n", close=not lease.reuse and state is None)
        try:
            async with asyncio.timeout(request.timeout):  # state calls count against the deadline too
                while (line := await worker.stdout.readline()).startswith(STATE_PREFIX):
                    if len(line) > self.settings.max_output_bytes:
                        return _fail(f"state call larger than {self.settings.max_output_bytes} bytes", "OutputTooLarge"), False
                    refused = await _answer_state(worker, line, request.run, state)
                    if refused is not None:
                        return refused, False
        except TimeoutError:
            return _fail(f"timed out after {request.timeout} s", "Timeout", timed_out=True, elapsed_s=request.timeout), False
        except ValueError:  # asyncio's StreamReader limit: the line is longer than allowed
            return _fail(f"answer larger than {self.settings.max_output_bytes} bytes", "OutputTooLarge"), False
        if not line:
            await worker.wait_exit(EXIT_GRACE)  # read its exit status before we kill it ourselves
            await lease.output.ended(EXIT_GRACE)  # its last words, unless a daemon holds stderr
            await worker.kill()
            if why := worker.lost():  # not the bundle's doing: an infrastructure failure
                raise ExecutorError(f"the {self.isolation} worker was lost before it answered: {why}")
            tail = lease.output.text(STDERR_TAIL)
            if worker.out_of_memory():
                return _fail(f"the bundle ran out of memory (limit {self.settings.memory_mb} MiB) before answering"
                             + (f"; its last output: {tail}" if tail else ""), "MemoryError"), False
            how = _exit_description(worker.exited())
            return _fail(f"the bundle process {how} before answering" + (f"; its last output: {tail}" if tail else ""), "Crash"), False
        if len(line) > self.settings.max_output_bytes:
            return _fail(f"answer larger than {self.settings.max_output_bytes} bytes", "OutputTooLarge"), False
        return _checked(line, request.timeout)


async def _send(worker: Worker, data: bytes, close: bool = False) -> bool:
    """Write to the worker's stdin; False if it is gone (reading its output says how)."""
    try:
        worker.stdin.write(data)
        await worker.stdin.drain()
        if close:
            worker.stdin.close()
    except (ConnectionError, BrokenPipeError):
        return False
    return True


async def _answer_state(worker: Worker, line: bytes, run: str | None, state: StateHandler | None) -> ExecResponse | None:
    """Answer one state call on the worker's stdin; or the failure that ends the run (not clean)
    when the line is not a StateCall, or is one out of turn: this run offers no state, or the
    call names another run. The state itself (keys, values, quotas) answers in the reply."""
    try:
        call = parse_state_call(line)
    except Malformed as e:
        return _fail(f"at-run-exec sent a state call that is not a StateCall: {e}", "ProtocolError")
    if state is None or call.run != run:
        return _fail("at-run-exec sent a state call out of turn (not for the request being run"
                     + (", which is offered no state)" if state is None else ")"), "ProtocolError")
    reply = await state.call(call)
    await _send(worker, reply.to_json().encode() + b"\n")
    return None


def _checked(line: bytes, timeout: int) -> tuple[ExecResponse, bool]:
    """The worker's answer line, checked as the untrusted data it is (bundle code shares the
    worker with the wrapper that writes it): it must match the protocol schema, strictly (see
    protocol.parse_answer); its metrics cannot exceed the time the runner allowed the run;
    a return value no record could hold (a lone surrogate, see records.data_problem) is refused
    here, once, for every consumer (results, XRPC, the gateway, ``atrund exec``). Text meant for
    people (error, HTTP headers and body) arrives with lone surrogates replaced (parse_answer).
    An answer that breaks the protocol is not clean: its worker is not given another request."""
    try:
        response = parse_answer(line)
    except Malformed as e:
        return _fail(f"at-run-exec answered with something that is not an ExecResponse: {e}", "ProtocolError"), False
    limit = timeout * 1000 + METRIC_SLACK_MS
    for name, value in response.metrics.model_dump(by_alias=True, exclude_none=True).items():
        if value > limit:
            return _fail(f"at-run-exec answered with something that is not an ExecResponse: metrics.{name}: must be an "
                         f"integer between 0 and {limit} (the request's timeout plus {METRIC_SLACK_MS} ms)", "ProtocolError"), False
    if response.success and (problem := data_problem(response.data)):
        refused = _fail(f"the return value {problem}", "InvalidReturnValue")
        refused.metrics = response.metrics
        refused.retire = response.retire
        return refused, True
    return response, True


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
