"""Availability: weekly hours in a timezone, plus maintenance windows. Pure: ``now`` comes in.

Config (``[schedule]`` in config.toml; absent means always available)::

    [schedule]
    timezone = "Europe/Berlin"
    hours = { mon = ["09:00-17:00"], tue = ["09:00-17:00"], sat = ["22:00-02:00"] }
    maintenance = [ { start = "2026-12-24T18:00:00+01:00", end = "2026-12-27T08:00:00+01:00" } ]

A range that ends at or before its start runs past midnight into the next day ("22:00-02:00"
on Saturday covers Saturday 22:00 to Sunday 02:00); "00:00-24:00" is the whole day. Days not
listed are closed once ``hours`` is given. Times are wall-clock in ``timezone`` (so across a
DST change an "09:00" stays 09:00 local). Maintenance windows (ISO 8601 with an offset) win over
hours. Outside availability the listing is withdrawn and new sessions are refused; sessions
already running finish.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["Schedule", "parse_schedule"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The ``[schedule]`` table: weekly open hours in a timezone and maintenance windows."""

    timezone: str = "UTC"
    hours: dict[int, tuple[tuple[int, int], ...]] | None = None  # weekday -> (start_min, end_min) ranges
    maintenance: tuple[tuple[dt.datetime, dt.datetime], ...] = ()

    def available(self, now: dt.datetime) -> bool:
        """Whether the node serves at ``now`` (an aware datetime)."""
        if any(start <= now < end for start, end in self.maintenance):
            return False
        if self.hours is None:
            return True
        local = now.astimezone(ZoneInfo(self.timezone))
        minute = local.hour * 60 + local.minute
        today, yesterday = local.weekday(), (local.weekday() - 1) % 7
        for start, end in self.hours.get(today, ()):
            if (start < end and start <= minute < end) or (end <= start and minute >= start):
                return True
        return any(end <= start and minute < end for start, end in self.hours.get(yesterday, ()))


def _minutes(h: str, m: str, allow_24: bool) -> int:
    hour, minute = int(h), int(m)
    if minute > 59 or hour > 24 or (hour == 24 and (minute or not allow_24)):
        raise ValueError(f"{h}:{m} is not a time of day")
    return hour * 60 + minute


def parse_schedule(raw: dict[str, Any] | None) -> Schedule:
    """A ``[schedule]`` table as a Schedule.

    Raises:
        ValueError: an unknown timezone or day, a malformed range or window.
    """
    if not raw:
        return Schedule()
    tz = raw.get("timezone", "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {tz!r}") from exc
    hours = None
    if "hours" in raw:
        hours = {}
        for day, ranges in dict(raw["hours"]).items():
            if day not in DAYS:
                raise ValueError(f"unknown day {day!r} (use {', '.join(DAYS)})")
            parsed = []
            for r in ranges:
                m = _RANGE.match(str(r))
                if not m:
                    raise ValueError(f"{r!r} is not a range like 09:00-17:00")
                start, end = _minutes(m[1], m[2], False), _minutes(m[3], m[4], True)
                if start == end:
                    raise ValueError(f"{r!r} is empty; use 00:00-24:00 for a whole day")
                parsed.append((start, end if end != 24 * 60 or start else 24 * 60))
            hours[DAYS.index(day)] = tuple(parsed)
    windows = []
    for w in raw.get("maintenance", []):
        try:
            start, end = dt.datetime.fromisoformat(str(w["start"])), dt.datetime.fromisoformat(str(w["end"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"maintenance window {w!r} needs ISO 8601 start and end") from exc
        if start.tzinfo is None or end.tzinfo is None or end <= start:
            raise ValueError(f"maintenance window {w!r} needs offsets and an end after its start")
        windows.append((start, end))
    return Schedule(tz, hours, tuple(windows))
