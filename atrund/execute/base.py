"""The Executor interface of the seed, and what every backend reports.

A failure of the bundle (exception, timeout, crash, bad answer) is an ExecResponse with
success false. Only a failure of the runner's own machinery raises ExecutorError.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from atrund.errors import ExecutorError  # noqa: F401 - defined with every other error; imported from here too
from atrund.execute.protocol import ExecRequest, ExecResponse


@dataclass
class PoolStats:
    isolation: str
    warm: dict[str, int] = field(default_factory=dict)
    busy: int = 0
    completed: int = 0
    failed: int = 0
    timeouts: int = 0
    cold_starts: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None


class Executor(ABC):
    isolation: str
    runtimes: dict  # name -> atrund.execute.runtimes.Runtime: what this executor can run

    @abstractmethod
    async def execute(self, request: ExecRequest, runtime: str) -> ExecResponse:
        """Run one request in a fresh worker of ``runtime``.

        The seed passes a MIME type to pick the runtime; a bundle record names its runtime
        explicitly, so that name is what selects the worker here.
        """

    @abstractmethod
    def stats(self) -> PoolStats: ...

    @abstractmethod
    async def warm(self, count: int) -> None:
        """Keep ``count`` started workers waiting, per runtime."""

    @abstractmethod
    async def drain(self) -> None:
        """Stop handing out work and wait for running requests to finish."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Kill every worker, warm or busy."""
