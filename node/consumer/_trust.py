"""Trust: this node's own, persistent experience of each provider (``HOME/trust.db``).

The score starts at 100 and stays within [0, 200]:

    completed call, counter-signed            +1
    slow call (first token > 5 s, or < 2 tok/s) -2   (in addition to the +1)
    refused for capacity / rate limit / unavailable / a price it no longer lists   -2
                                               (it listed what it did not have)
    failure: unreachable, died or stalled mid-call, timed out   -10
    bad receipt or any other protocol violation   -50
    observed uptime: listed continuously        +0.5 per hour
    refusal for a model it no longer lists (unknown_model)   0

A floor (default 50) keeps a provider out of routing until its score recovers — it recovers
only through uptime, since it gets no calls: about four days of continuous listing after one
bad receipt from 100. Latency is an EWMA (alpha 0.3) of time-to-first-token and tokens/s.
Scores are not money: floats are fine here.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path

from .._home import private_file

__all__ = ["TrustBook", "ProviderStats", "START", "FLOOR"]

START, LOW, HIGH, FLOOR = 100.0, 0.0, 200.0, 50.0
ALPHA = 0.3
SLOW_TTFT_S, SLOW_TPS = 5.0, 2.0
COMPLETED, SLOW, BUSY, FAILURE, VIOLATION, PER_HOUR = 1.0, -2.0, -2.0, -10.0, -50.0, 0.5
_ALIVE_GAP_S = 180  # a listing seen again within this counts as continuous uptime
_BUSY = {"capacity", "rate_limited", "unavailable", "price_changed"}  # a Sybil answering price_changed pays too
_STALE = {"unknown_model"}


@dataclasses.dataclass(frozen=True)
class ProviderStats:
    """This node's view of one provider: trust score, speed figures and counts of calls and failures."""

    peer_id: str
    score: float = START
    ttft_s: float | None = None
    tps: float | None = None
    calls: int = 0
    failures: int = 0
    violations: int = 0

    @property
    def measured(self) -> bool:
        return self.ttft_s is not None


class TrustBook:
    """This node's persistent trust in each provider (sqlite), learned from every session outcome."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False)  # 0600
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS providers (peer_id TEXT PRIMARY KEY, score REAL NOT NULL, ttft_s REAL, "
            "tps REAL, calls INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, "
            "violations INTEGER NOT NULL DEFAULT 0, last_alive INTEGER)")
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def get(self, peer_id: str) -> ProviderStats:
        with self._lock:
            row = self.db.execute("SELECT score, ttft_s, tps, calls, failures, violations FROM providers "
                                  "WHERE peer_id = ?", (peer_id,)).fetchone()
        return ProviderStats(peer_id, *row) if row else ProviderStats(peer_id)

    def _update(self, peer_id: str, delta: float, **counters: int) -> None:
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO providers(peer_id, score) VALUES (?, ?)", (peer_id, START))
            sets = ", ".join(f"{k} = {k} + ?" for k in counters)
            self.db.execute(f"UPDATE providers SET score = MIN(?, MAX(?, score + ?)){', ' + sets if sets else ''} "
                            "WHERE peer_id = ?", (HIGH, LOW, delta, *counters.values(), peer_id))

    def completed(self, peer_id: str, ttft_s: float, tokens: int, duration_s: float) -> None:
        tps = tokens / max(duration_s - ttft_s, 1e-3) if tokens else None
        slow = ttft_s > SLOW_TTFT_S or (tps is not None and tokens >= 8 and tps < SLOW_TPS)
        self._update(peer_id, COMPLETED + (SLOW if slow else 0.0), calls=1)
        with self._lock:
            row = self.db.execute("SELECT ttft_s, tps FROM providers WHERE peer_id = ?", (peer_id,)).fetchone()
            old_ttft, old_tps = row
            new_ttft = ttft_s if old_ttft is None else ALPHA * ttft_s + (1 - ALPHA) * old_ttft
            new_tps = old_tps if tps is None else tps if old_tps is None else ALPHA * tps + (1 - ALPHA) * old_tps
            self.db.execute("UPDATE providers SET ttft_s = ?, tps = ? WHERE peer_id = ?", (new_ttft, new_tps, peer_id))

    def refused(self, peer_id: str, reason: str) -> None:
        if reason in _STALE:
            return
        self._update(peer_id, BUSY if reason in _BUSY else FAILURE, failures=1)

    def failed(self, peer_id: str) -> None:
        self._update(peer_id, FAILURE, failures=1)

    def violated(self, peer_id: str) -> None:
        self._update(peer_id, VIOLATION, violations=1)

    def observe_alive(self, peer_ids: list[str], now: int) -> None:
        """Credit uptime to providers whose listings are alive at ``now``."""
        with self._lock:
            for peer_id in peer_ids:
                self.db.execute("INSERT OR IGNORE INTO providers(peer_id, score) VALUES (?, ?)", (peer_id, START))
                (last,) = self.db.execute("SELECT last_alive FROM providers WHERE peer_id = ?", (peer_id,)).fetchone()
                credit = PER_HOUR * (now - last) / 3600 if last is not None and 0 < now - last <= _ALIVE_GAP_S else 0.0
                self.db.execute("UPDATE providers SET last_alive = ?, score = MIN(?, score + ?) WHERE peer_id = ?",
                                (now, HIGH, credit, peer_id))
