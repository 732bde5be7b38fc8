"""What every part of the executor shares: its one exception (defined, like every other, in
atrund.errors), and the statistics it reports.

A failure of the bundle (exception, timeout, crash, bad answer) is an ExecResponse with
success false. Only a failure of the runner's own machinery raises ExecutorError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atrund.errors import ExecutorError  # noqa: F401 - defined with every other error; imported from here too


@dataclass
class PoolStats:
    isolation: str
    warm: dict[str, int] = field(default_factory=dict)
    busy: int = 0
    completed: int = 0
    failed: int = 0
    timeouts: int = 0
    cold_starts: int = 0
    hot: int = 0  # workers kept for the next request of their reuse key
    hot_hits: int = 0  # requests served by such a worker
    retired: int = 0  # workers that answered cleanly but were not kept (why: the pool's debug log)
    egress_connections: int = 0  # connections the egress proxy let out, all workers together
    egress_refused: int = 0  # connections it refused
    egress_bytes_out: int = 0
    egress_bytes_in: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
