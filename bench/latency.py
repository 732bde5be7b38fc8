"""End-to-end latency and throughput of atrund, measured on a local AT Protocol stack.

    .venv/bin/python bench/latency.py                       # 200 invocations, poll_interval 0.2 s
    .venv/bin/python bench/latency.py -n 50 --poll-interval 0.05
    .venv/bin/python bench/latency.py --burst --batch-size 50  # post with applyWrites, 50 per commit
    .venv/bin/python bench/latency.py --rate 5                 # paced: latency without a backlog
    .venv/bin/python bench/latency.py --rate 4 --ingest firehose  # the PDS's subscribeRepos instead of polling

Method
------
1. Start a LocalStack (the reference PDS + a PLC directory on loopback) and create two accounts,
   an author and a runner.
2. Write a runner configuration (allowlist = the author; ``[ingest] poll_interval``,
   ``[executor] warm`` and ``concurrency`` from the flags) and start the runner as a real
   subprocess, ``python -m atrund.cli serve -c CONFIG --json-logs``, logging to a file.
3. Publish a one-function Python bundle (``echo`` returns its args) and make one warm-up
   invocation, not counted: it proves the runner is polling and puts the bundle in the runner's
   cache, so the figures are those of a warm runner. Its own latency is printed.
4. Post N invocations as fast as the PDS accepts them: one createRecord at a time (or
   ``--post-concurrency`` at once), or with ``--burst`` applyWrites batches of ``--batch-size``
   creates, or paced at ``--rate`` per second. An invocation's *created* time is the moment its
   createRecord (applyWrites) call returned.
5. Meanwhile a watcher looks for the results at their computed record keys
   (``records.result_rkey``), as any AT client would. Default ``--watch list``:
   com.atproto.repo.listRecords over the runner's whole ``dev.atrun.result`` collection, 100 a
   page, a round every ``--watch-interval`` (a page per 100 results per round, whatever is still
   missing). ``--watch get``: com.atproto.repo.getRecord on every result still missing, each round
   (N requests a round while the backlog is long). The watcher decides when the run is over and
   which invocations got no result.
6. *Readable* time. A polling watcher sees a result up to a round late, and its rounds slow down
   when the machine is busy (on 2 saturated cores a listRecords round takes 50-80 ms), so it is
   not used alone. A result is readable at the latest when the runner's putRecord returned
   (``outbox.written_at`` in the runner's SQLite state) or when the watcher saw it, whichever came
   first; that is the *readable* time used for the headline figures. It is readable at the
   earliest when the PDS began the commit that wrote it (``record.indexedAt`` in the reference
   PDS's per-account SQLite store), which is printed too: the two bound the true value, typically
   within 10-30 ms. The watcher's own view (and its lag behind the commit) is printed for
   comparison. All these clocks are this machine's wall clock.
7. Print N, latency created -> readable (p50/p95/max), throughput over the whole run (N / (last
   readable - first created)), p50 / poll_interval, result statuses, the runner's own metrics from
   the result records (queuedMs, executionTimeMs, totalMs), where the time went stage by stage
   (the runner's seen_at, started_at, finished_at, written_at), runner log warnings, and the CPU
   seconds used meanwhile by the runner, its workers, the PDS, this process and anything else.

Exit status: 0 when every invocation has a success result whose data echoes its args; 2 when
some invocation got no result within ``--timeout`` seconds of its creation; 3 when every one got a
result but some were not a success (or did not echo their args); 1 on any other failure.
Everything started here (the runner, the stack) is stopped on the way out, also on Ctrl-C or
SIGTERM, and the runner is asked to die with this process if it is killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from atrund import client
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.atproto.session import Session
from atrund.dev.stack import Account, LocalStack
from atrund.errors import NotFound
from atrund.execute import procs
from atrund.records import INVOCATION, RESULT, result_rkey

BUNDLE_SOURCE = '''\
def echo(args):
    return args
'''
ENDPOINT = "echo"
LIST_PAGE = 100  # the most listRecords returns at once
APPLY_WRITES_MAX = 200  # the most writes the reference PDS takes in one applyWrites
GET_CONCURRENCY = 16  # getRecord requests in flight in --watch get
WARMUP_SECONDS = 60.0  # runner start-up, worker warm-up and the first bundle fetch

EXIT_NO_RESULT = 2
EXIT_NOT_SUCCESS = 3


class BenchError(RuntimeError):
    """The run could not be measured (the runner died or never served); said in one line."""


@dataclass(frozen=True)
class Options:
    n: int
    poll_interval: float
    ingest: str
    warm: int
    concurrency: int
    isolation: str | None
    burst: bool
    batch_size: int
    post_concurrency: int
    rate: float
    watch: str
    watch_interval: float
    timeout: float
    keep: bool
    json_out: bool


def parse_options(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/latency.py",
        description="End-to-end latency of atrund: invocation created -> result record readable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-n", type=int, default=200, help="invocations to post (the warm-up one is extra)")
    p.add_argument("--poll-interval", type=float, default=0.2, help="runner's [ingest] poll_interval, seconds")
    p.add_argument("--ingest", choices=["poll", "firehose"], default="poll", help="runner's [ingest] mode")
    p.add_argument("--warm", type=int, default=2, help="runner's [executor] warm")
    p.add_argument("--concurrency", type=int, default=4, help="runner's [executor] concurrency")
    p.add_argument("--isolation", default=None, help="runner's [executor] isolation (unset: the runner's default)")
    p.add_argument("--burst", action="store_true", help="post with com.atproto.repo.applyWrites, --batch-size per call")
    p.add_argument("--batch-size", type=int, default=50, help=f"creates per applyWrites with --burst (max {APPLY_WRITES_MAX})")
    p.add_argument("--post-concurrency", type=int, default=1, help="createRecord calls in flight (without --burst)")
    p.add_argument("--rate", type=float, default=0.0, help="post at most this many invocations per second (0: no limit)")
    p.add_argument("--watch", choices=["list", "get"], default="list",
                   help="list: listRecords over the runner's result collection; get: getRecord per missing result")
    p.add_argument("--watch-interval", type=float, default=0.01, help="pause between watch rounds, seconds")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds after its creation an invocation may take")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (runner log, state, stack)")
    p.add_argument("--json", dest="json_out", action="store_true", help="also print the figures as one JSON object")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("-n must be at least 1")
    if not 1 <= a.batch_size <= APPLY_WRITES_MAX:
        p.error(f"--batch-size must be between 1 and {APPLY_WRITES_MAX}")
    if a.poll_interval <= 0 or a.post_concurrency < 1 or a.concurrency < 1 or a.warm < 0 or a.rate < 0:
        p.error("--poll-interval must be > 0, --post-concurrency and --concurrency >= 1, --warm and --rate >= 0")
    return Options(a.n, a.poll_interval, a.ingest, a.warm, a.concurrency, a.isolation, a.burst, a.batch_size, a.post_concurrency, a.rate,
                   a.watch, a.watch_interval, a.timeout, a.keep, a.json_out)


# -- clocks and figures ------------------------------------------------------------------

_MONO0, _WALL0 = time.monotonic(), time.time()


def wall(mono: float) -> float:
    """A monotonic instant on the wall clock, to join with the runner's time.time() stamps."""
    return _WALL0 + (mono - _MONO0)


def pct(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


class CpuMeter:
    """CPU seconds used by named processes, by the children they reaped (``NAME children``) and
    by the whole machine, from /proc: where the cores went, and whether anything else used them."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def _process(self, pid: int) -> tuple[float, float]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0, 0.0
        own, children = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])  # utime+stime, cutime+cstime
        return own / self.tick, children / self.tick

    def _machine(self) -> float:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        except (OSError, ValueError, IndexError):
            return 0.0
        return (sum(values) - values[3] - values[4]) / self.tick  # all but idle and iowait

    def snapshot(self) -> dict[str, float]:
        """``NAME children`` counts the children it reaped and those still alive (hot workers
        live as long as the runner), with everything they reaped in turn."""
        out = {"machine": self._machine()}
        for name, pid in self.pids.items():
            out[name], out[f"{name} children"] = self._process(pid)
            for child in procs.tree(pid)[1:]:
                out[f"{name} children"] += sum(self._process(child))
        return out


# -- the runner subprocess ---------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (its own threads; not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if this process dies without stopping it (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RunnerProcess:
    """``atrund serve`` as a subprocess in its own session, logging to a file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "atrund.cli", "serve", "-c", str(self.config), "--json-logs"],
                cwd=self.config.parent, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # a terminal Ctrl-C reaches us only; we stop it in order
                preexec_fn=_die_with_parent,
            )
        # ATRUND_BENCH_PYSPY=/path/to/py-spy: sample the runner into a file of raw flamegraph
        # lines while it runs (the path is printed); py-spy is not a project dependency.
        pyspy = os.environ.get("ATRUND_BENCH_PYSPY")
        if pyspy:
            out = Path(tempfile.gettempdir()) / f"atrund-pyspy-{self.proc.pid}.txt"
            print(f"py-spy samples of the runner -> {out}", file=sys.stderr)
            subprocess.Popen([pyspy, "record", "--nonblocking", "-r", "100", "-f", "raw", "-p", str(self.proc.pid),
                              "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent)

    def cpu_seconds(self) -> float:
        """The runner's own CPU time so far (user + system, /proc/<pid>/stat), its workers not counted."""
        return proc_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (the runner drains and flushes its outbox), SIGKILL after ``grace`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_counts(self) -> collections.Counter[str]:
        """Log lines by level, and warnings/errors by event, to spot retries and failures."""
        counts: collections.Counter[str] = collections.Counter()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return counts
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            level = entry.get("level", "?")
            counts[level] += 1
            if level in ("warning", "error", "critical"):
                counts[f"{level}: {entry.get('event')}"] += 1
        return counts


def write_config(directory: Path, stack: LocalStack, runner: Account, author: Account, opts: Options) -> Path:
    """The runner's TOML configuration; its password file and state directory sit next to it."""
    (directory / "app-password").write_text(runner.app_password)
    (directory / "app-password").chmod(0o600)
    executor = f"warm = {opts.warm}\nconcurrency = {opts.concurrency}\n"
    if opts.isolation:
        executor += f'isolation = "{opts.isolation}"\n'
    config = directory / "config.toml"
    config.write_text(
        f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.handle}"\npassword_file = "app-password"\n'
        'description = "atrund latency bench"\n\n'
        f'{stack.identity_toml()}\n'
        f'[access]\nmode = "allowlist"\nallowlist = ["{author.did}"]\n\n'
        f'[ingest]\nmode = "{opts.ingest}"\npoll_interval = {opts.poll_interval}\n\n'
        # The per-author rate limit would pace a one-author bench: lift it, this measures latency.
        "[limits]\nper_author_per_minute = 1000000\nper_author_burst = 100000\nper_author_backlog = 100000\n"
        f"per_author_concurrency = {opts.concurrency}\n\n"
        f"[executor]\n{executor}\n"
        '[gateway]\nlisten = "127.0.0.1:0"\n\n'
        '[state]\ndir = "state"\n'
    )
    return config


# -- measuring ---------------------------------------------------------------------------

@dataclass
class Sighting:
    at: float  # monotonic: when the response that first held the result arrived
    resolution: float  # at - start of the previous watch round: the most the sighting can be late
    value: dict[str, Any]


@dataclass
class Run:
    """What the asynchronous part measured."""

    warmup_latency: float
    timeout: float  # seconds after its creation an invocation may take
    created: dict[str, float] = field(default_factory=dict)  # result rkey -> monotonic created time
    uris: dict[str, str] = field(default_factory=dict)  # result rkey -> invocation URI
    args: dict[str, dict[str, Any]] = field(default_factory=dict)  # result rkey -> the invocation's args
    seen: dict[str, Sighting] = field(default_factory=dict)  # result rkey -> sighting (any result record)
    posting_done: bool = False
    post_seconds: float = 0.0
    window_seconds: float = 0.0  # first post started -> watching ended
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used in that window, by whom
    watch_rounds: int = 0
    watch_requests: int = 0
    watch_round_seconds: list[float] = field(default_factory=list)

    def missing(self) -> list[str]:
        return [rk for rk in self.created if rk not in self.seen]

    def done(self) -> bool:
        """Posting is over and every result is in, or the last invocation's time is up."""
        if not self.posting_done:
            return False
        return not self.missing() or time.monotonic() > max(self.created.values()) + self.timeout


async def watch_list(run: Run, repos: Repos, runner_did: str, interval: float) -> None:
    previous_start: float | None = None
    while not run.done():
        start = time.monotonic()
        cursor: str | None = None
        while True:
            records, cursor = await repos.list_records(runner_did, RESULT, cursor=cursor, limit=LIST_PAGE)
            arrived = time.monotonic()
            run.watch_requests += 1
            for rec in records:
                rkey = rec["uri"].rsplit("/", 1)[-1]
                if rkey not in run.seen:
                    run.seen[rkey] = Sighting(arrived, arrived - (previous_start or start), rec["value"])
            if len(records) < LIST_PAGE or not cursor:
                break
        run.watch_rounds += 1
        run.watch_round_seconds.append(time.monotonic() - start)
        previous_start = start
        await asyncio.sleep(interval)


async def watch_get(run: Run, repos: Repos, runner_did: str, interval: float) -> None:
    previous_start: float | None = None
    slots = asyncio.Semaphore(GET_CONCURRENCY)

    async def one(rkey: str, since: float) -> None:
        async with slots:
            try:
                _, value = await repos.get_record(runner_did, RESULT, rkey)
            except NotFound:
                return
            finally:
                run.watch_requests += 1
            arrived = time.monotonic()
            run.seen.setdefault(rkey, Sighting(arrived, arrived - since, value))

    while not run.done():
        start = time.monotonic()
        await asyncio.gather(*(one(rk, previous_start or start) for rk in run.missing()))
        run.watch_rounds += 1
        run.watch_round_seconds.append(time.monotonic() - start)
        previous_start = start
        await asyncio.sleep(interval)


async def post_all(run: Run, session: Session, record_for: Callable[[int], dict[str, Any]], opts: Options) -> None:
    """Create the N invocations; note each one's creation time under its result's record key."""

    def created(i: int, uri: str, at: float) -> None:
        rkey = result_rkey(uri)
        run.created[rkey], run.uris[rkey], run.args[rkey] = at, uri, record_for(i)["args"]

    t0 = time.monotonic()

    async def pace(i: int) -> None:
        if opts.rate > 0:
            await asyncio.sleep(max(0.0, t0 + i / opts.rate - time.monotonic()))

    if opts.burst:
        for first in range(0, opts.n, opts.batch_size):
            batch = range(first, min(opts.n, first + opts.batch_size))
            await pace(first)
            out = await session.client.com.atproto.repo.apply_writes({
                "repo": session.did,
                "writes": [{"$type": "com.atproto.repo.applyWrites#create", "collection": INVOCATION,
                            "value": {"$type": INVOCATION, **record_for(i)}} for i in batch],
            })
            at = time.monotonic()
            for i, res in zip(batch, out.results or [], strict=True):
                created(i, res.uri, at)
    else:
        todo = iter(range(opts.n))

        async def poster() -> None:
            for i in todo:
                await pace(i)
                uri, _ = await session.create_record(INVOCATION, record_for(i))
                created(i, uri, time.monotonic())

        await asyncio.gather(*(poster() for _ in range(opts.post_concurrency)))
    run.post_seconds = time.monotonic() - t0


async def measure(opts: Options, stack: LocalStack, author: Account, runner: Account, runner_proc: RunnerProcess) -> Run:
    assert runner_proc.proc is not None and stack.pid is not None
    meter = CpuMeter({"runner": runner_proc.proc.pid, "stack": stack.pid, "bench": os.getpid()})
    session = await Session.login(stack.pds_url, author.handle, author.app_password)
    repos = Repos(Identities(stack.plc_url, allow_private_addresses=True))
    try:
        bundle = (await client.publish(session, repos, BUNDLE_SOURCE.encode(), "python", name="echo.py",
                                       endpoints=[ENDPOINT])).ref

        def record_for(i: int) -> dict[str, Any]:
            return client.invocation_record(runner.did, bundle, ENDPOINT, {"i": i})

        warmup = await warm_up(session, repos, runner.did, record_for(-1), runner_proc)
        run = Run(warmup_latency=warmup, timeout=opts.timeout)
        watcher = watch_list if opts.watch == "list" else watch_get
        cpu_before, window_start = meter.snapshot(), time.monotonic()
        watching = asyncio.create_task(watcher(run, repos, runner.did, opts.watch_interval))
        try:
            try:
                await post_all(run, session, record_for, opts)
            finally:
                run.posting_done = True
            while not watching.done():
                if runner_proc.exited() is not None:
                    raise BenchError(f"the runner exited with {runner_proc.exited()} during the run")
                await asyncio.wait({watching}, timeout=0.5)
            watching.result()
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        run.window_seconds = time.monotonic() - window_start
        run.cpu = {k: v - cpu_before[k] for k, v in meter.snapshot().items()}
        return run
    finally:
        await repos.close()
        await session.close()


async def warm_up(session: Session, repos: Repos, runner_did: str, record: dict[str, Any], runner_proc: RunnerProcess) -> float:
    """One invocation to wait for, not counted; returns its latency in seconds."""
    uri, _ = await session.create_record(INVOCATION, record)
    created = time.monotonic()
    rkey = result_rkey(uri)
    while time.monotonic() - created < WARMUP_SECONDS:
        if runner_proc.exited() is not None:
            raise BenchError(f"the runner exited with {runner_proc.exited()} before serving")
        try:
            _, value = await repos.get_record(runner_did, RESULT, rkey)
        except NotFound:
            await asyncio.sleep(0.01)
            continue
        if value.get("status") != "success":
            raise BenchError(f"the warm-up invocation ended {value.get('status')}: {value.get('error')}")
        return time.monotonic() - created
    raise BenchError(f"the warm-up invocation got no result in {WARMUP_SECONDS:.0f} s")


# -- the report --------------------------------------------------------------------------

@dataclass(frozen=True)
class RunnerTimes:
    """One invocation's path through the runner, from its state DB (time.time() seconds)."""

    seen_at: float  # stored by the poller
    started_at: float  # claimed for execution (a concurrency slot was free)
    finished_at: float  # result built and queued in the outbox
    written_at: float  # putRecord of the result returned


def runner_times(db_path: Path) -> dict[str, RunnerTimes]:
    """Invocation URI -> its times, for the invocations whose result was written."""
    if not db_path.exists():
        return {}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT i.uri, i.seen_at, i.started_at, i.finished_at, o.written_at "
            "FROM invocations i JOIN outbox o ON o.invocation_uri = i.uri WHERE o.written_at IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return {uri: RunnerTimes(*times) for uri, *times in rows if None not in times}


def pds_commit_starts(stack_dir: Path, did: str) -> dict[str, float]:
    """Record URI -> when the PDS began the commit that wrote it (epoch seconds, ms resolution).

    Read from the reference PDS's own per-account SQLite store (``record.indexedAt``, stamped when
    the write's transaction begins): a record is readable no earlier than this, and no later than
    the write's response. Empty if the store is not there or not shaped like that.
    """
    out: dict[str, float] = {}
    for path in stack_dir.glob(f"actors/*/{did}/store.sqlite"):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT uri, indexedAt FROM record").fetchall()
            finally:
                db.close()
        except sqlite3.Error:
            continue
        for uri, indexed_at in rows:
            out[uri] = datetime.fromisoformat(indexed_at).timestamp()
    return out


STAGES = [
    ("ingest", "created -> stored (poll: interval + listRecords; firehose: sequencer + frame + proof)"),
    ("wait", "stored -> claimed (waiting for one of the concurrency slots)"),
    ("run", "claimed -> finished (bundle cache, worker, execution, result built)"),
    ("outbox", "finished -> putRecord returned (writer queue + write)"),
    ("visible", "putRecord returned -> seen by the watcher"),
]


def dist(values: list[float]) -> dict[str, int | None]:
    return {"p50": _r(pct(values, 50)), "p95": _r(pct(values, 95)), "max": _r(max(values, default=None))}


def row(values: list[float]) -> str:
    d = dist(values)
    return "  ".join(f"{k} {'-' if v is None else v}" for k, v in d.items())


def report(run: Run, opts: Options, runner_did: str, times: dict[str, RunnerTimes], commits: dict[str, float],
           log_counts: collections.Counter[str], elapsed: float) -> tuple[dict[str, Any], int]:
    """Print the figures; return them (for --json) and the exit status."""
    got = {rk: run.seen[rk] for rk in run.created if rk in run.seen}
    statuses = collections.Counter(s.value.get("status", "?") for s in got.values())
    isolation = collections.Counter(str((s.value.get("metrics") or {}).get("isolation")) for s in got.values())
    wrong_data = sum(1 for rk, s in got.items() if s.value.get("status") == "success" and s.value.get("data") != run.args[rk])
    late = [rk for rk, s in got.items() if s.at - run.created[rk] > opts.timeout]
    missing = run.missing() + late  # no result within the timeout, whether it came later or never
    metrics = {key: [v / 1000 for s in got.values() if isinstance(v := (s.value.get("metrics") or {}).get(key), int)]
               for key in ("queuedMs", "executionTimeMs", "totalMs")}

    # A result is readable once its putRecord has returned (or the watcher has seen it, if that
    # came first), and not before the PDS began the commit that wrote it.
    readable: dict[str, float] = {}  # rkey -> wall clock
    stages: dict[str, list[float]] = {name: [] for name, _ in STAGES}
    not_before: list[float] = []
    to_start: list[float] = []  # created -> claimed for execution
    watched: list[float] = []
    lag: list[float] = []
    for rk, sighting in got.items():
        created, seen = wall(run.created[rk]), wall(sighting.at)
        watched.append(seen - created)
        readable[rk] = seen
        t = times.get(run.uris[rk])
        if t is not None:
            readable[rk] = min(seen, t.written_at)
            stages["ingest"].append(t.seen_at - created)
            stages["wait"].append(t.started_at - t.seen_at)
            to_start.append(t.started_at - created)
            stages["run"].append(t.finished_at - t.started_at)
            stages["outbox"].append(t.written_at - t.finished_at)
            stages["visible"].append(seen - t.written_at)
        commit = commits.get(f"at://{runner_did}/{RESULT}/{rk}")
        if commit is not None:
            not_before.append(commit - created)
            lag.append(seen - commit)
    latencies = [readable[rk] - wall(run.created[rk]) for rk in readable]
    span = (max(readable.values()) - wall(min(run.created.values()))) if readable else None
    throughput = len(readable) / span if span else None

    p50 = pct(latencies, 50)
    posting = f"applyWrites x{opts.batch_size}" if opts.burst else f"createRecord, {opts.post_concurrency} in flight"
    if opts.rate:
        posting += f", paced at {opts.rate:g}/s"
    watch = "listRecords over the result collection" if opts.watch == "list" else "getRecord per missing result"

    print()
    print(f"atrund latency bench: N={opts.n}, ingest={opts.ingest}, poll_interval={opts.poll_interval:g} s, warm={opts.warm}, "
          f"concurrency={opts.concurrency}, isolation={'/'.join(isolation) or opts.isolation or '?'}; posting: {posting}; watching: {watch} every {opts.watch_interval * 1000:g} ms")
    print(f"  warm-up invocation (not counted): {ms(run.warmup_latency)} ms")
    print(f"  posted {len(run.created)} invocations in {run.post_seconds:.2f} s "
          f"({len(run.created) / run.post_seconds:.1f}/s accepted by the PDS)")
    print(f"  results readable: {len(got)}/{len(run.created)}; statuses: "
          + (", ".join(f"{k}={v}" for k, v in sorted(statuses.items())) or "none")
          + (f"; {wrong_data} success results did not echo their args" if wrong_data else ""))
    print(f"  latency created -> readable (ms): {row(latencies)}  min {_r(min(latencies, default=None))}")
    print(f"  latency created -> execution start (ms): {row(to_start)}")
    print("    (readable: when the runner's putRecord returned, or when the watcher saw it if that was sooner)")
    print(f"    lower bound, created -> the PDS began that commit:  {row(not_before)}")
    print(f"    as the polling watcher saw it:                      {row(watched)}")
    if throughput is not None and span is not None:
        print(f"  throughput: {throughput:.1f} invocations/s (first created -> last readable: {span:.2f} s)")
    if p50 is not None:
        print(f"  p50 / poll_interval: {p50 / opts.poll_interval:.1f}")
    print("  runner metrics from the result records (ms):")
    for key, values in metrics.items():
        print(f"    {key:<16}{row(values)}")
    print("  where the time goes (runner state DB joined with the bench's clock; ms):")
    for name, what in STAGES:
        print(f"    {name:<8}{row(stages[name]):<32}{what}")
    resolution = [s.resolution for s in got.values()]
    print(f"  watcher: {run.watch_rounds} rounds, {run.watch_requests} requests, round p50 "
          f"{ms(pct(run.watch_round_seconds, 50))} ms; sighting - commit start (ms): {row(lag)}; "
          f"sighting - previous round start (ms): {row(resolution)}")
    notable = sorted((k, v) for k, v in log_counts.items() if ":" in k)
    print(f"  runner log: {log_counts.get('info', 0)} info, {log_counts.get('warning', 0)} warning, "
          f"{log_counts.get('error', 0)} error lines" + "".join(f"\n    {v} x {k}" for k, v in notable))
    if run.cpu:
        c = run.cpu
        ours = sum(v for k, v in c.items() if k != "machine")
        print(f"  CPU seconds in the {run.window_seconds:.1f} s run ({os.cpu_count()} cores): runner {c['runner']:.1f}, "
              f"its workers {c['runner children']:.1f}, PDS+PLC {c['stack'] + c['stack children']:.1f}, "
              f"bench {c['bench'] + c['bench children']:.1f}, everything else {max(0.0, c['machine'] - ours):.1f} "
              f"(other sessions; sandboxed workers that end up re-parented to init); "
              f"machine busy {c['machine'] / (run.window_seconds * (os.cpu_count() or 1)):.0%}")
        parties = {"runner": c["runner"], "workers": c["runner children"], "PDS+PLC": c["stack"] + c["stack children"],
                   "bench": c["bench"] + c["bench children"]}
        total = sum(parties.values()) or 1.0
        print(f"  CPU per invocation (ms): runner + workers {(c['runner'] + c['runner children']) * 1000 / opts.n:.2f} "
              f"(runner {c['runner'] * 1000 / opts.n:.2f}, workers {c['runner children'] * 1000 / opts.n:.2f}); "
              f"share of the parties' CPU: " + ", ".join(f"{k} {v / total:.0%}" for k, v in parties.items()))
    if missing:
        print(f"  NO RESULT within {opts.timeout:g} s for {len(missing)} invocations, e.g. {run.uris[missing[0]]}")
    print(f"  bench wall time: {elapsed:.1f} s")

    figures: dict[str, Any] = {
        "n": opts.n, "ingest": opts.ingest, "poll_interval_s": opts.poll_interval, "warm": opts.warm, "concurrency": opts.concurrency,
        "isolation": sorted(isolation),
        "burst": opts.burst, "batch_size": opts.batch_size if opts.burst else None, "rate": opts.rate or None,
        "post_concurrency": opts.post_concurrency, "watch": opts.watch, "results": len(got), "missing": len(missing),
        "statuses": dict(statuses), "wrong_data": wrong_data, "warmup_ms": _r(run.warmup_latency),
        "latency_ms": dist(latencies), "latency_to_commit_start_ms": dist(not_before),
        "latency_watched_ms": dist(watched),
        "throughput_per_s": round(throughput, 2) if throughput else None,
        "p50_over_poll_interval": round(p50 / opts.poll_interval, 2) if p50 is not None else None,
        "runner_metrics_ms": {k: dist(v) for k, v in metrics.items()},
        "stages_ms": {k: dist(v) for k, v in stages.items()},
        "watcher": {"rounds": run.watch_rounds, "requests": run.watch_requests, "lag_behind_commit_ms": dist(lag),
                  "resolution_ms": dist(resolution)},
        "cpu_seconds": {k: round(v, 2) for k, v in run.cpu.items()}, "window_seconds": round(run.window_seconds, 2),
        "post_seconds": round(run.post_seconds, 3), "wall_seconds": round(elapsed, 1),
    }
    if opts.json_out:
        print(json.dumps(figures))
    if missing:
        return figures, EXIT_NO_RESULT
    if statuses.get("success", 0) != len(run.created) or wrong_data:
        return figures, EXIT_NOT_SUCCESS
    return figures, 0


def _r(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


# -- main --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    # Ctrl-C and SIGTERM both raise KeyboardInterrupt, so the finally blocks stop what was started
    # (SIGINT explicitly too: a shell starting us in the background would have it ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="atrund-bench-"))
    keep = opts.keep
    runner_proc = RunnerProcess(tmp / "config.toml", tmp / "runner.log")
    try:
        with LocalStack(data_dir=tmp / "stack") as stack:
            author = stack.create_account("author")
            runner = stack.create_account("runner")
            write_config(tmp, stack, runner, author, opts)
            print(f"stack up in {time.monotonic() - started:.1f} s (PDS {stack.pds_url}); runner {runner.did}; "
                  f"log {runner_proc.log_path}", file=sys.stderr)
            runner_proc.start()
            try:
                run = asyncio.run(measure(opts, stack, author, runner, runner_proc))
            except Exception:
                print(f"runner log tail:\n{runner_proc.log_tail()}", file=sys.stderr)
                keep = True
                raise
            finally:
                runner_proc.stop()  # drains and flushes; its state DB is then complete
            times = runner_times(tmp / "state" / "atrund.sqlite3")
            commits = pds_commit_starts(tmp / "stack", runner.did)
            _, status = report(run, opts, runner.did, times, commits, runner_proc.log_counts(), time.monotonic() - started)
            if status:
                keep = True
            return status
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopped the runner and the stack", file=sys.stderr)
        return 130
    finally:
        runner_proc.stop()
        if keep:
            print(f"kept {tmp} (runner.log, state/, stack/)", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
