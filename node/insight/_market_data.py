"""Market data: the observations this node holds, and the figures ``node market`` shows.

Observations (``protocol.Observation``) are their observers' word, so the figures count
observers, not the volumes they claim:

- **price samples**: one per consumer observation (an observer-hour): the price point it made
  most calls at (ties: the cheaper). A Sybil adds one sample per identity and hour, however
  many calls it claims; the distribution's median moves only once Sybils are half the samples.
- **distribution**: nearest-rank percentiles (p10, p25, p50, p75, p90) of the samples' input and
  output prices, in µc per 1K tokens: ``sorted[ceil(p * n / 100) - 1]``, integers.
- **trend**: the same median per hour, oldest first, and the change from the first hour with
  samples to the last (µc, and permille of the first).
- **completion**: the median (nearest rank) of each consumer observation's completed / calls,
  permille — one vote per observer-hour, so a claim of millions of calls weighs as one; **demand**:
  calls served and turned away for capacity, summed over provider observations (claimed volumes:
  shown as totals, not used for prices).

Held in ``HOME/market.db``: one row per (observer, role, model, hour), at most ``KEEP_DAYS`` days
and ``MAX_ROWS`` rows (the oldest hours go first).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import protocol

from .._clock import SYSTEM_WALL_CLOCK
from .._home import private_file

__all__ = ["MarketData", "MarketFigures", "PriceSpread", "HourFigures", "price_sample", "percentile", "figures",
           "KEEP_DAYS", "MAX_ROWS", "PERCENTILES"]

KEEP_DAYS = 30
MAX_ROWS = 200_000
PERCENTILES = (10, 25, 50, 75, 90)


def percentile(sorted_values: list[int], p: int) -> int:
    """Nearest-rank percentile of a sorted, non-empty list of integers."""
    n = len(sorted_values)
    rank = max(1, -(-p * n // 100))  # ceil(p * n / 100), at least 1
    return sorted_values[rank - 1]


def price_sample(o: protocol.Observation) -> protocol.PricePoint | None:
    """The price an observation mostly paid: its point with the most calls (ties: the cheaper)."""
    if not o.prices:
        return None
    return min(o.prices, key=lambda p: (-p.calls, p.output_per_1k, p.input_per_1k))


@dataclasses.dataclass(frozen=True, slots=True)
class PriceSpread:
    """Percentiles (``PERCENTILES``) of input and output prices, µc per 1K tokens."""

    samples: int
    input: dict[int, int]
    output: dict[int, int]

    @classmethod
    def of(cls, points: list[protocol.PricePoint]) -> "PriceSpread | None":
        if not points:
            return None
        ins, outs = sorted(p.input_per_1k for p in points), sorted(p.output_per_1k for p in points)
        return cls(len(points), {p: percentile(ins, p) for p in PERCENTILES}, {p: percentile(outs, p) for p in PERCENTILES})

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "input": {f"p{k}": v for k, v in self.input.items()},
                "output": {f"p{k}": v for k, v in self.output.items()}}


@dataclasses.dataclass(frozen=True, slots=True)
class HourFigures:
    """One hour of one model's market."""

    hour: int
    observers: int
    median_input: int | None
    median_output: int | None
    calls: int
    completed: int
    served: int
    turned_away: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class MarketFigures:
    """``node market --model M``: the spread over the window, the hourly trend, completion and demand."""

    model: str
    since: int
    until: int
    observers: int
    spread: PriceSpread | None
    hours: tuple[HourFigures, ...]
    calls: int
    completed: int
    served: int
    turned_away: int

    completion_permille: int | None = None  # the median of the observations' completion, permille

    def trend(self) -> dict[str, int] | None:
        """The change of the hourly median output price from the first hour with samples to the last."""
        priced = [h for h in self.hours if h.median_output is not None]
        if len(priced) < 2:
            return None
        first, last = priced[0].median_output, priced[-1].median_output
        assert first is not None and last is not None
        return {"from_hour": priced[0].hour, "to_hour": priced[-1].hour, "first": first, "last": last,
                "change": last - first, "change_permille": (last - first) * 1000 // first if first else 0}

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "since": self.since, "until": self.until, "observers": self.observers,
                "spread": self.spread.to_json() if self.spread else None, "trend": self.trend(),
                "calls": self.calls, "completed": self.completed, "completion_permille": self.completion_permille,
                "served": self.served, "turned_away": self.turned_away,
                "hours": [h.to_json() for h in self.hours]}


def figures(model: str, observations: Iterable[protocol.Observation], since: int, until: int) -> MarketFigures:
    """The figures of ``model`` over the hours in [since, until) (the module's definitions)."""
    rows = [o for o in observations if o.model == model and since <= o.hour < until]
    by_hour: dict[int, list[protocol.Observation]] = {}
    for o in rows:
        by_hour.setdefault(o.hour, []).append(o)
    hours = []
    samples: list[protocol.PricePoint] = []
    for hour in range(since - since % protocol.HOUR_S, until, protocol.HOUR_S):
        these = by_hour.get(hour, [])
        consumers = [o for o in these if o.role == "consumer"]
        points = [p for p in map(price_sample, consumers) if p is not None]
        samples += points
        spread = PriceSpread.of(points)
        providers = [o for o in these if o.role == "provider"]
        hours.append(HourFigures(
            hour, len({o.observer for o in these}),
            spread.input[50] if spread else None, spread.output[50] if spread else None,
            sum(o.calls for o in consumers), sum(o.completed for o in consumers),
            sum(o.completed for o in providers), sum(o.turned_away for o in providers)))
    ratios = sorted(o.completed * 1000 // o.calls for o in rows if o.role == "consumer" and o.calls)
    return MarketFigures(model, since, until, len({o.observer for o in rows}), PriceSpread.of(samples),
                         tuple(h for h in hours if h.observers), sum(h.calls for h in hours),
                         sum(h.completed for h in hours), sum(h.served for h in hours),
                         sum(h.turned_away for h in hours), percentile(ratios, 50) if ratios else None)


class MarketData:
    """The observations this node holds (sqlite), its own among them."""

    def __init__(self, path: Path, clock: Callable[[], float] = SYSTEM_WALL_CLOCK) -> None:
        self.clock = clock
        self.db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False)  # 0600
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS observations (observer TEXT NOT NULL, role TEXT NOT NULL, "
            "model TEXT NOT NULL, hour INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (observer, role, model, hour))")
        self.db.execute("CREATE INDEX IF NOT EXISTS observations_model ON observations(model, hour)")
        self._lock = threading.Lock()
        self._closed = False  # gossip may still arrive while the node stops: refused once closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.db.close()

    def add(self, o: protocol.Observation, data: bytes) -> bool:
        """Hold a checked observation; False when one for its (observer, role, model, hour) is held
        (an observer says its figures for an hour once) or it is older than ``KEEP_DAYS``."""
        now = int(self.clock())
        oldest = now - KEEP_DAYS * 86_400
        if o.hour < oldest:
            return False
        with self._lock:
            if self._closed:
                return False
            cur = self.db.execute("INSERT OR IGNORE INTO observations VALUES (?, ?, ?, ?, ?)",
                                  (o.observer, o.role, o.model, o.hour, data))
            if cur.rowcount != 1:
                return False
            self.db.execute("DELETE FROM observations WHERE hour < ?", (oldest,))
            (n,) = self.db.execute("SELECT COUNT(*) FROM observations").fetchone()
            if n > MAX_ROWS:
                self.db.execute("DELETE FROM observations WHERE rowid IN (SELECT rowid FROM observations "
                                "ORDER BY hour LIMIT ?)", (n - MAX_ROWS,))
        return True

    def has(self, observer: str, role: str, model: str, hour: int) -> bool:
        with self._lock:
            if self._closed:
                return True  # closed: take nothing in
            return self.db.execute("SELECT 1 FROM observations WHERE observer = ? AND role = ? AND model = ? AND "
                                   "hour = ?", (observer, role, model, hour)).fetchone() is not None

    def observations(self, model: str | None, since: int, until: int) -> list[protocol.Observation]:
        with self._lock:
            if self._closed:
                return []
            if model is None:
                rows = self.db.execute("SELECT data FROM observations WHERE hour >= ? AND hour < ?",
                                       (since, until)).fetchall()
            else:
                rows = self.db.execute("SELECT data FROM observations WHERE model = ? AND hour >= ? AND hour < ?",
                                       (model, since, until)).fetchall()
        return [protocol.decode(bytes(d), max_size=protocol.MAX_OBSERVATION_BYTES, expect=(protocol.Observation,))
                for (d,) in rows]

    def models(self, since: int) -> list[str]:
        with self._lock:
            return [m for (m,) in self.db.execute("SELECT DISTINCT model FROM observations WHERE hour >= ? "
                                                  "ORDER BY model", (since,))]

    def figures(self, model: str, hours: int) -> MarketFigures:
        """``model``'s market over the last ``hours`` whole hours."""
        until = int(self.clock()) // protocol.HOUR_S * protocol.HOUR_S
        since = until - hours * protocol.HOUR_S
        return figures(model, self.observations(model, since, until), since, until)
