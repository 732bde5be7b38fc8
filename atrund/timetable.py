"""When a dev.atrun.schedule ticks: a 5-field cron expression in an IANA time zone, or an interval.

Pure time arithmetic, on Unix times (seconds): no clock of its own, so the caller (atrund.ticks)
decides what "now" is, and the tests can walk a schedule across a daylight-saving change.

- cron is read by ``cronsim`` (a kept library, never a parser of our own), in the schedule's
  ``timezone`` (UTC if absent). Across daylight-saving changes it behaves as Debian's cron does: a
  wall-clock time skipped in spring runs at the first time after the gap (02:30 on the night
  clocks go 02:00 -> 03:00 runs at 03:00), a time that occurs twice in autumn runs once (the
  first), and an expression that names every hour (``0 * * * *``) runs at both of the repeated
  hours: every instant it matches, not every wall-clock reading.
- ``intervalSeconds`` ticks at ``startAt`` (else ``createdAt``) plus whole intervals, so anyone
  can compute the scheduled times from the record alone.
- Nothing ticks before ``startAt`` or after ``endAt``.

Ticks are whole seconds (the tick key spells the scheduled time to the second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import ValidationError

from atrund import bounds
from atrund.errors import InvalidSchedule
from atrund.records import Schedule, field_errors, unix_time

CATCH_UP = ("latest", "none")
GAP_SAMPLES = 64  # ticks looked at when measuring how often a cron expression may tick


@dataclass(frozen=True)
class Timetable:
    record: Schedule
    cron: str | None
    zone: ZoneInfo | None
    interval: int | None
    anchor: float  # intervals count from here
    start: float | None
    end: float | None

    @property
    def catch_up(self) -> str:
        return self.record.catch_up or "latest"

    @classmethod
    def of(cls, value: Any) -> Timetable:
        """The timetable of a schedule record; InvalidSchedule naming what is wrong."""
        try:
            record = Schedule.model_validate(bounds.check_fields(value))
        except ValidationError as e:
            raise InvalidSchedule(f"invalid schedule record: {field_errors(e)}") from None
        except bounds.Malformed as e:
            raise InvalidSchedule(f"invalid schedule record: {e}") from None
        if (record.cron is None) == (record.interval_seconds is None):
            raise InvalidSchedule("invalid schedule record: give exactly one of cron and intervalSeconds")
        if record.catch_up is not None and record.catch_up not in CATCH_UP:
            raise InvalidSchedule(f"invalid schedule record: catchUp must be one of {', '.join(CATCH_UP)}, not {record.catch_up!r}")
        if record.timezone is not None and record.cron is None:
            raise InvalidSchedule("invalid schedule record: timezone is only read with cron")
        times = {}
        for name in ("created_at", "start_at", "end_at"):
            text = getattr(record, name)
            times[name] = None if text is None else unix_time(text)
            if text is not None and times[name] is None:
                raise InvalidSchedule(f"invalid schedule record: {name} is not a datetime: {text!r}")
        zone = None
        if record.cron is not None:
            try:
                zone = ZoneInfo(record.timezone or "UTC")
            except (ZoneInfoNotFoundError, ValueError):
                raise InvalidSchedule(f"invalid schedule record: unknown IANA time zone {record.timezone!r}") from None
            if len(record.cron.split()) != 5:
                raise InvalidSchedule(f"invalid schedule record: cron needs 5 fields (minute hour day month weekday), "
                                      f"not {record.cron!r}")
            try:
                CronSim(record.cron, datetime.now(zone))
            except CronSimError as e:
                raise InvalidSchedule(f"invalid schedule record: cron {record.cron!r}: {e}") from None
        anchor = times["start_at"] if times["start_at"] is not None else times["created_at"]
        return cls(record, record.cron, zone, record.interval_seconds, float(math.floor(anchor)), times["start_at"],
                   times["end_at"])

    def next_after(self, t: float) -> float | None:
        """The first tick strictly after ``t``; None if there is none (past endAt)."""
        if self.start is not None and t < self.start:
            t = math.ceil(self.start) - 1  # the first tick may be at startAt itself
        if self.interval is not None:
            k = math.floor((t - self.anchor) / self.interval) + 1
            tick = self.anchor + max(k, 0) * self.interval
        else:
            tick = next(CronSim(self.cron, _at(t, self.zone))).timestamp()
        return None if self.end is not None and tick > self.end else float(tick)

    def latest_until(self, t: float) -> float | None:
        """The last tick at or before ``t`` (and not before startAt); None if there is none."""
        if self.end is not None and t > self.end:
            t = self.end
        if self.interval is not None:
            if t < self.anchor:
                return None
            tick = self.anchor + math.floor((t - self.anchor) / self.interval) * self.interval
        else:
            tick = next(CronSim(self.cron, _at(math.floor(t) + 1, self.zone), reverse=True)).timestamp()
        return None if self.start is not None and tick < self.start else float(tick)

    def shortest_gap(self, after: float) -> float:
        """How close together two ticks may come (a cron expression's ticks are measured over
        the next GAP_SAMPLES of them: ``*/5 0 * * *`` has 5 minutes between ticks, not a day)."""
        if self.interval is not None:
            return float(self.interval)
        it = CronSim(self.cron, _at(after, self.zone))
        ticks = [next(it).timestamp() for _ in range(GAP_SAMPLES)]
        return min(b - a for a, b in zip(ticks, ticks[1:], strict=False))


def _at(t: float, zone: ZoneInfo | None) -> datetime:
    return datetime.fromtimestamp(math.floor(t), zone or timezone.utc)
