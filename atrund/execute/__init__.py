"""Execution: the at-run-exec protocol, the worker pool, and one module per backend."""

from atrund.execute.base import Executor, ExecutorError, PoolStats
from atrund.execute.protocol import ExecRequest, ExecResponse

__all__ = ["Executor", "ExecutorError", "PoolStats", "ExecRequest", "ExecResponse", "create_executor"]


BACKENDS = ("firecracker", "process", "container", "none")  # built here; the order auto tries them in is probe.order()


def create_backend(isolation: str, settings):
    from atrund.execute.direct import DirectBackend
    from atrund.execute.process.backend import ProcessBackend

    if isolation == "none":
        return DirectBackend()
    if isolation == "process":
        return ProcessBackend(settings)
    if isolation == "container":
        from atrund.execute.container.backend import ContainerBackend

        return ContainerBackend(settings)
    if isolation == "firecracker":
        from atrund.execute.microvm.backend import MicroVmBackend

        return MicroVmBackend(settings)
    raise ExecutorError(f"unknown isolation {isolation!r} (available: {', '.join(BACKENDS)}, auto)")


def create_executor(settings, isolation: str | None = None) -> Executor:
    """The executor for an isolation level; ``auto`` probes for the strongest that works here."""
    from atrund.execute.pool import WorkerPool

    isolation = isolation or settings.isolation
    if isolation == "auto":
        from atrund.execute.probe import choose

        isolation = choose(settings)
    return WorkerPool(create_backend(isolation, settings), settings)
