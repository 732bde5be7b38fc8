"""Execution: the at-run-exec protocol, the worker pool, and one module per backend."""

from atrund.execute.base import Executor, ExecutorError, PoolStats
from atrund.execute.protocol import ExecRequest, ExecResponse

__all__ = ["Executor", "ExecutorError", "PoolStats", "ExecRequest", "ExecResponse", "create_executor"]


def create_executor(settings, isolation: str = "none") -> Executor:
    """The executor for an isolation level (only ``none`` exists so far)."""
    from atrund.execute.direct import DirectBackend
    from atrund.execute.pool import WorkerPool

    if isolation != "none":
        raise ExecutorError(f"isolation {isolation!r} is not available in this build (available: none)")
    return WorkerPool(DirectBackend(), settings)
