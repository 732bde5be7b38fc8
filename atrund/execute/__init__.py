"""Execution: the at-run-exec protocol, the worker pool, and one subpackage per backend.

The backends and their names are listed once, in registry.py (``BACKENDS``, ``ALIASES``,
``canonical``); ``create_executor`` builds the pool over the one a setting names.

Importing this package is cheap: the pool, the protocol models and every backend load when
first used, so the configuration (which validates names against the registry) and the CLI's
``--help`` do not pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from atrund.execute.base import ExecutorError, PoolStats
from atrund.execute.registry import ALIASES, AUTO, BACKENDS, NAMES, UnknownBackend, backend_class, canonical

if TYPE_CHECKING:
    from atrund.execute.pool import WorkerPool
    from atrund.execute.protocol import ExecRequest, ExecResponse

    Executor = WorkerPool  # the executor type: one implementation, the pool of workers over a backend

__all__ = ["ALIASES", "AUTO", "BACKENDS", "NAMES", "Executor", "ExecutorError", "PoolStats", "ExecRequest",
           "ExecResponse", "WorkerPool", "canonical", "create_backend", "create_executor"]

_LAZY = {"WorkerPool": "atrund.execute.pool:WorkerPool", "Executor": "atrund.execute.pool:WorkerPool",
         "ExecRequest": "atrund.execute.protocol:ExecRequest", "ExecResponse": "atrund.execute.protocol:ExecResponse"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = _LAZY[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def create_backend(isolation: str, settings, helper=None):
    """The backend an isolation name (or alias) means, built from the executor settings.
    ``helper``: an unprivileged runner's privileged helper (privsep.py), for the backends that
    need root (process, container)."""
    try:
        name = canonical(isolation)
    except UnknownBackend as e:
        raise ExecutorError(str(e)) from None
    if name == AUTO:
        raise ExecutorError("auto is not a backend: probe for one with create_executor")
    if helper is None:
        return backend_class(name)(settings)
    return backend_class(name)(settings, helper=helper)


def create_executor(settings, isolation: str | None = None, helper=None) -> Executor:
    """The executor for an isolation level; ``auto`` probes for the strongest that works here."""
    from atrund.execute.pool import WorkerPool

    isolation = isolation or settings.isolation
    if isolation == AUTO:
        from atrund.execute.probe import choose

        isolation = choose(settings)
    return WorkerPool(create_backend(isolation, settings, helper), settings)
