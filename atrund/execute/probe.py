"""What really works on this host: each backend is probed by running the Python runtime's test
bundle through it, not by checking that some file exists. ``auto`` takes the strongest backend
that passes; falling back to ``none`` is logged as a warning (it is not a sandbox).

Which is strongest (registry.BACKENDS lists them in this order): a microVM (``microvm``: a
guest kernel of its own behind a hardware virtualisation boundary) comes first, but auto takes
it only with KVM: under software emulation (TCG) it works, slowly (seconds per cold
invocation), so only an explicit ``isolation = "microvm"`` selects it there. Then a container
under gVisor (``executor.container.runtime = "runsc"``) puts a kernel of its own between the
bundle and the host, so it comes before ``process``. Otherwise ``process`` and a runc
container are walls of the same kind (namespaces, seccomp and limits on the shared host kernel;
ours filters more syscalls and adds Landlock), and ``process`` needs no engine and starts
faster, so it comes first and ``container`` is what auto takes where it does not work."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import shutil
import time
from dataclasses import dataclass

import structlog

from atrund.execute.base import ExecutorError
from atrund.execute.protocol import ExecRequest
from atrund.execute.registry import BACKENDS

log = structlog.get_logger("atrund.execute")

PROBE_TIMEOUT = 20


@dataclass(frozen=True)
class Probe:
    backend: str
    ok: bool
    detail: str
    ms: int | None = None
    auto: bool = True  # whether auto may choose it when it works (not a microVM under software emulation)


def landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


async def _try(backend: str, settings) -> Probe:
    from atrund.execute import create_backend
    from atrund.execute.pool import WorkerPool

    started = time.monotonic()
    try:
        pool = WorkerPool(create_backend(backend, settings), settings)
    except (ExecutorError, OSError) as e:
        return Probe(backend, False, str(e))
    try:
        rt = pool.runtimes.get("python")
        if rt is None:
            return Probe(backend, False, "no python runtime directory to probe with")
        req = ExecRequest(code_path=str(rt.dir / "test-bundle.py"), endpoint="test", args={"probe": 1}, timeout=PROBE_TIMEOUT)
        resp = await pool.execute(req, "python")
    except ExecutorError as e:
        return Probe(backend, False, str(e))
    finally:
        await pool.shutdown()
    ms = int((time.monotonic() - started) * 1000)
    if resp.success and resp.data == {"ok": True, "echo": {"probe": 1}}:
        return Probe(backend, True, "ran the python test bundle", ms)
    return Probe(backend, False, f"test bundle failed: {resp.error}", ms)


def order(settings) -> tuple[str, ...]:
    """The backends auto tries, strongest first (see the module docstring)."""
    names = list(BACKENDS)
    if settings.container.runtime == "runsc":  # gVisor's own kernel: a wall of another kind than process
        names.remove("container")
        names.insert(names.index("process"), "container")
    return tuple(names)


async def probe_all(settings, first_only: bool = False) -> list[Probe]:
    """Probe the backends in order; with ``first_only``, stop at the first that works."""
    results = []
    for backend in order(settings):
        if first_only and any(p.ok for p in results):
            break
        if backend == "microvm":
            from atrund.execute.microvm.backend import host_support

            vm = host_support(settings)
            if vm.accelerator is None:
                results.append(Probe(backend, False, vm.detail))
                continue
            if vm.accelerator == "tcg":
                # Software emulation works, but a cold invocation then takes many seconds: auto does
                # not choose it; isolation = "microvm" does. Doctor still boots one to show it works.
                if first_only:
                    results.append(Probe(backend, False, "software emulation (TCG) only: auto does not choose it", auto=False))
                else:
                    p = await _try(backend, settings)
                    results.append(Probe(backend, p.ok, p.detail + " (under TCG: auto does not choose it)", p.ms, auto=False))
                continue
        if backend == "process":
            missing = [tool for tool in ("unshare", "setpriv") if not shutil.which(tool)]
            abi = landlock_abi()
            if missing or abi < 1:
                why = f"missing {', '.join(missing)}" if missing else "Landlock is not available in this kernel"
                results.append(Probe(backend, False, why))
                continue
        results.append(await _try(backend, settings))
    return results


def probe_sync(settings, first_only: bool = False) -> list[Probe]:
    """Probe from anywhere, even inside a running event loop (on a thread of its own)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, probe_all(settings, first_only)).result()


def choose(settings) -> str:
    probes = probe_sync(settings, first_only=True)
    for p in probes:
        if p.ok and p.auto:
            if p.backend == "none":
                log.warning("isolation auto fell back to none: bundles run WITHOUT a sandbox",
                            why={q.backend: q.detail for q in probes if not q.ok})
            else:
                log.info("isolation auto chose a backend", backend=p.backend)
            return p.backend
    raise ExecutorError("no executor backend works on this host: " + "; ".join(f"{p.backend}: {p.detail}" for p in probes))
