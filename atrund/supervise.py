"""Long-running loops, kept running: a loop that fails is restarted with backoff, not fatal.

Every loop of the runner (each ingest mode, the scheduler, the result writer, trust refresh, ...)
already turns the failure of one item into an explained outcome for that item. A loop that dies
anyway is a bug of ours or a fault around us (a state store that errors), and stopping the whole
runner for it would stop every author's work and, on restart, often meet the same fault again.
So the supervisor logs the failure with its traceback, reports it on /healthz, waits (jittered
backoff from 1 s to 60 s, reset only after a healthy minute) and starts the loop again.

Cancellation passes through: stopping the runner cancels the supervised tasks, which end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import structlog

from atrund.health import Health

log = structlog.get_logger("atrund.supervise")

HEALTHY_AFTER = 60.0  # seconds a restarted loop must run before its problem is cleared and its backoff reset
MAX_DELAY = 60.0


class Supervisor:
    def __init__(self, health: Health) -> None:
        self.health = health
        self.tasks: dict[str, asyncio.Task] = {}
        self.restarts: dict[str, int] = {}
        self.stopping = False  # set when the runner stops: a loop that ends now is done, not failed

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task:
        task = asyncio.create_task(self._keep(name, loop), name=name)
        self.tasks[name] = task
        return task

    async def _keep(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        key = f"loop:{name}"
        while True:
            started = time.monotonic()
            clearing = asyncio.get_running_loop().call_later(HEALTHY_AFTER, self.health.clear, key)
            try:
                await loop()
                if self.stopping:
                    clearing.cancel()
                    return
                why = "it returned (a loop must never end by itself)"
                log.error("runner loop ended unexpectedly; restarting it", loop=name)
            except asyncio.CancelledError:
                clearing.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - any failure: say why, restart, never take the runner down
                why = f"{type(e).__name__}: {e}"
                log.exception("runner loop failed; restarting it", loop=name)
            clearing.cancel()
            if time.monotonic() - started >= HEALTHY_AFTER:
                delay = 1.0
            wait = delay * random.uniform(0.5, 1.0)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self.health.problem(key, f"the {name} loop failed ({why[:300]}); restarted {self.restarts[name]} time(s)")
            await asyncio.sleep(wait)
            delay = min(delay * 2, MAX_DELAY)

    async def stop(self, names: list[str] | None = None) -> None:
        """Cancel the named loops (all if None) and wait for them to end."""
        tasks = [t for n, t in self.tasks.items() if names is None or n in names]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
