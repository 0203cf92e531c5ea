"""node/'s one clock rule, and the only module that names the system clock.

- Durations, timeouts, intervals, latencies: ``trio.current_time()``, so a test's
  ``trio.testing.MockClock`` moves them.
- Expiries and timestamps (seconds since the epoch: listings, receipts, channels, schedules): a
  ``WallClock`` injected by whoever composes the object, ``SYSTEM_WALL_CLOCK`` by default.

Nothing else in node/ reads ``time.time``, ``time.monotonic`` or their kin (``tests/test_clock.py``
checks it).
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["WallClock", "SYSTEM_WALL_CLOCK"]

WallClock = Callable[[], float]
"""Seconds since the epoch, as a float."""

SYSTEM_WALL_CLOCK: WallClock = time.time
