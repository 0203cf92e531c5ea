"""node/'s one clock rule, and the only module that names the system clock.

- Durations, timeouts, intervals, latencies: ``trio.current_time()``, so a test's
  ``trio.testing.MockClock`` moves them.
- Durations inside a worker thread (model compute), where trio's clock cannot be read:
  ``THREAD_CLOCK`` (monotonic seconds; never compared with trio's).
- Expiries and timestamps (seconds since the epoch: listings, receipts, channels, schedules): a
  ``WallClock`` injected by whoever composes the object, ``SYSTEM_WALL_CLOCK`` by default.

Nothing else in node/ reads ``time.time``, ``time.monotonic`` or their kin (``tests/test_clock.py``
checks it).
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["WallClock", "SYSTEM_WALL_CLOCK", "THREAD_CLOCK"]

WallClock = Callable[[], float]
"""Seconds since the epoch, as a float."""

SYSTEM_WALL_CLOCK: WallClock = time.time

THREAD_CLOCK: Callable[[], float] = time.monotonic
"""Monotonic seconds for a deadline inside a worker thread (e.g. one constrained decoding step)."""
