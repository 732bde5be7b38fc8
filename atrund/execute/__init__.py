"""Execution: the at-run-exec protocol, the worker pool, and one subpackage per backend.

The backends and their names are listed once, in registry.py (``BACKENDS``, ``ALIASES``,
``canonical``); ``create_executor`` builds the pool over the one a setting names.
"""

from atrund.execute.base import ExecutorError, PoolStats
from atrund.execute.pool import WorkerPool
from atrund.execute.protocol import ExecRequest, ExecResponse
from atrund.execute.registry import ALIASES, AUTO, BACKENDS, NAMES, UnknownBackend, backend_class, canonical

# The executor type: one implementation, the pool of workers over a backend.
Executor = WorkerPool

__all__ = ["ALIASES", "AUTO", "BACKENDS", "NAMES", "Executor", "ExecutorError", "PoolStats", "ExecRequest",
           "ExecResponse", "WorkerPool", "canonical", "create_backend", "create_executor"]


def create_backend(isolation: str, settings):
    """The backend an isolation name (or alias) means, built from the executor settings."""
    try:
        name = canonical(isolation)
    except UnknownBackend as e:
        raise ExecutorError(str(e)) from None
    if name == AUTO:
        raise ExecutorError("auto is not a backend: probe for one with create_executor")
    return backend_class(name)(settings)


def create_executor(settings, isolation: str | None = None) -> Executor:
    """The executor for an isolation level; ``auto`` probes for the strongest that works here."""
    isolation = isolation or settings.isolation
    if isolation == AUTO:
        from atrund.execute.probe import choose

        isolation = choose(settings)
    return WorkerPool(create_backend(isolation, settings), settings)
