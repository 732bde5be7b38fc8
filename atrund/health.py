"""What is wrong right now, for /healthz: named problems that components raise and clear.

A component that sees something fail (a loop that crashed, a PDS that refuses writes, polls that
fail, a state store that answers with errors) calls ``problem(name, reason)``; when it works again
it calls ``clear(name)``. /healthz says ``degraded`` and lists every open problem with its reason
and since when. Conditions that are better measured than reported (an outbox that grows old, a
stream that stalls) are checked when /healthz is asked, through ``watch``.

The runner keeps serving while degraded: a problem is something an operator should look at, not
a reason to stop (restarting would not fix a PDS that is down, and would replay nothing better).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("atrund.health")


@dataclass
class Problem:
    reason: str
    since: float  # time.time() of the first report


class Health:
    def __init__(self) -> None:
        self._problems: dict[str, Problem] = {}
        self._checks: list[Callable[[], dict[str, str]]] = []

    def problem(self, name: str, reason: str) -> None:
        """Report that ``name`` is failing, and why (repeats update the reason, not the start)."""
        p = self._problems.get(name)
        if p is None:
            self._problems[name] = Problem(reason, time.time())
            log.warning("degraded", component=name, reason=reason)
        else:
            p.reason = reason

    def clear(self, name: str) -> None:
        p = self._problems.pop(name, None)
        if p is not None:
            log.info("recovered", component=name, after_s=round(time.time() - p.since, 1))

    def clear_prefix(self, prefix: str, keep: set[str] = frozenset()) -> None:
        for name in [n for n in self._problems if n.startswith(prefix) and n not in keep]:
            self.clear(name)

    def watch(self, check: Callable[[], dict[str, str]]) -> None:
        """Also ask ``check`` at every /healthz: it returns {name: reason} of what is wrong now."""
        self._checks.append(check)

    def problems(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        out = {name: {"reason": p.reason, "sinceSeconds": round(now - p.since, 1)} for name, p in self._problems.items()}
        for check in self._checks:
            try:
                found = check()
            except Exception as e:  # noqa: BLE001 - a broken check is itself a problem, never a 500
                found = {"health-check": f"{type(e).__name__}: {e}"}
            for name, reason in found.items():
                out.setdefault(name, {"reason": reason})
        return dict(sorted(out.items()))
