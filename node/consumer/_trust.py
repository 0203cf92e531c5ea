"""Trust: this node's own, persistent experience of each provider (``HOME/trust.db``).

Only what the provider did moves its score; every failure is first attributed (``_failures.fault``).
The score starts at 100 and stays within [0, 200]:

    completed call, counter-signed            +1   (a provider on probation is lifted to the floor first)
    slow call (first token > 5 s, or < 2 tok/s) -2   (in addition to the +1)
    provider fault: unreachable, died or stalled mid-call, timed out, its backend failed   -10
    it listed what it does not honour: price_changed, escrow_not_accepted   -2
                                               (a Sybil answering price_changed pays for the money it made us lock)
    capacity: refused for capacity / rate limit / unavailable, or its queue timed out   -2,
        held apart and forgiven quickly: at most -20 in all, halved every minute after the last one
    bad receipt or any other protocol violation   -50
    caught serving another model than it committed to (a failed spot check)   to 0, not probed for 30 days
    observed uptime: listed continuously        +0.5 per hour
    not the provider's doing: 0 — a stale view of its listing (unknown_model), our own request
        (over_budget, bad_request, context_too_long, max_tokens_too_large), a third party (the
        escrow agent could not confirm our channel: escrow_invalid; our channel expiring: expired)

The floor (default 50) takes a provider out of normal routing, onto **probation**: it is tried
again as a probe — one call at a time (``Renter``) — once ``probe_backoff(strikes)`` has passed
since its last fault (1 min, doubling with each fault in a row, at most 1 h), or at once when it
is the only provider left; a probe that completes lifts it back to the floor. A provider with a
protocol violation in the last day is never probed: bad receipts still exclude it. ``strikes``
counts faults in a row (a completed call resets it). Latency is an EWMA (alpha 0.3) of
time-to-first-token and tokens/s. Scores are not money: floats are fine here. Time is this
book's ``clock`` (whole seconds).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path
from typing import Callable

from .._clock import SYSTEM_WALL_CLOCK
from .._home import private_file

__all__ = ["TrustBook", "ProviderStats", "START", "FLOOR", "probe_backoff"]

START, LOW, HIGH, FLOOR = 100.0, 0.0, 200.0, 50.0
ALPHA = 0.3
SLOW_TTFT_S, SLOW_TPS = 5.0, 2.0
COMPLETED, SLOW, LISTED, FAILURE, VIOLATION, PER_HOUR = 1.0, -2.0, -2.0, -10.0, -50.0, 0.5
BUSY, BUSY_MAX, BUSY_HALF_LIFE_S = 2.0, 20.0, 60  # capacity: a small, quickly forgiven penalty
PROBE_BASE_S, PROBE_MAX_S = 60, 3600
VIOLATION_MEMORY_S = 86_400  # a violator is not probed for a day
CAUGHT_MEMORY_S = 30 * 86_400  # a provider caught substituting its model: not for a month
_ALIVE_GAP_S = 180  # a listing seen again within this counts as continuous uptime

# how a refusal's reason code is attributed (anything unlisted is the provider's fault)
CAPACITY_REASONS = frozenset({"capacity", "rate_limited", "unavailable", "timeout"})
LISTING_REASONS = frozenset({"price_changed", "escrow_not_accepted"})
OURS_REASONS = frozenset({"over_budget", "bad_request", "context_too_long", "max_tokens_too_large"})
THIRD_PARTY_REASONS = frozenset({"escrow_invalid", "expired"})
STALE_REASONS = frozenset({"unknown_model"})


def probe_backoff(strikes: int) -> int:
    """Seconds after its last fault before a provider on probation may be probed again."""
    return min(PROBE_MAX_S, PROBE_BASE_S << min(max(strikes - 1, 0), 12))


@dataclasses.dataclass(frozen=True)
class ProviderStats:
    """This node's view of one provider: trust score (capacity penalty included), speed figures,
    counts of calls and faults, and whether a probation probe of it is due."""

    peer_id: str
    score: float = START
    ttft_s: float | None = None
    tps: float | None = None
    calls: int = 0
    failures: int = 0
    violations: int = 0
    strikes: int = 0  # provider faults in a row
    probe_due: bool = False  # under the floor, it may be probed now (back-off over, no recent violation)
    violator: bool = False  # a protocol violation in the last day (caught: in the last month): never probed
    caught: int = 0  # failed spot checks
    local_score: float | None = None  # this node's own score, when ``score`` is blended with the network's
    network_score: float | None = None  # what other consumers' settled attestations say (node/reputation)
    network_weight: int = 0  # µc of settled value behind ``network_score``

    @property
    def measured(self) -> bool:
        return self.ttft_s is not None


_COLUMNS = {"busy": "REAL NOT NULL DEFAULT 0", "busy_at": "INTEGER", "strikes": "INTEGER NOT NULL DEFAULT 0",
            "fault_at": "INTEGER", "violated_at": "INTEGER",
            "caught": "INTEGER NOT NULL DEFAULT 0", "caught_at": "INTEGER"}


class TrustBook:
    """This node's persistent trust in each provider (sqlite), learned from every attributed outcome."""

    def __init__(self, path: Path, clock: Callable[[], float] = SYSTEM_WALL_CLOCK) -> None:
        self.clock = clock
        self.db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False)  # 0600
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS providers (peer_id TEXT PRIMARY KEY, score REAL NOT NULL, ttft_s REAL, "
            "tps REAL, calls INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, "
            "violations INTEGER NOT NULL DEFAULT 0, last_alive INTEGER)")
        have = {row[1] for row in self.db.execute("PRAGMA table_info(providers)")}
        for name, decl in _COLUMNS.items():  # a trust.db from before fair attribution gains them
            if name not in have:
                self.db.execute(f"ALTER TABLE providers ADD COLUMN {name} {decl}")
        self._lock = threading.Lock()
        # (local stats) -> (routing score, network score, its weight): set by the node's reputation service
        self.network: Callable[[ProviderStats], tuple[float, float, int]] | None = None

    def close(self) -> None:
        self.db.close()

    def _now(self) -> int:
        return int(self.clock())

    @staticmethod
    def _busy_now(busy: float, busy_at: int | None, now: int) -> float:
        if not busy or busy_at is None:
            return 0.0
        return busy * 0.5 ** (max(0, now - busy_at) // BUSY_HALF_LIFE_S)

    def get(self, peer_id: str) -> ProviderStats:
        """``peer_id``'s stats; ``score`` is what routing uses: local trust, moved by the network's
        view when a reputation service is attached (``local_score`` then keeps the local one)."""
        local = self._local(peer_id)
        if self.network is None:
            return local
        routed, network, weight = self.network(local)
        if weight == 0:
            return dataclasses.replace(local, local_score=local.score)
        return dataclasses.replace(local, score=routed, local_score=local.score, network_score=network,
                                   network_weight=weight)

    def _local(self, peer_id: str) -> ProviderStats:
        now = self._now()
        with self._lock:
            row = self.db.execute("SELECT score, ttft_s, tps, calls, failures, violations, busy, busy_at, strikes, "
                                  "fault_at, violated_at, caught, caught_at FROM providers WHERE peer_id = ?",
                                  (peer_id,)).fetchone()
        if row is None:
            return ProviderStats(peer_id)
        score, ttft, tps, calls, failures, violations, busy, busy_at, strikes, fault_at, violated_at, caught, \
            caught_at = row
        violator = ((violated_at is not None and now - violated_at < VIOLATION_MEMORY_S)
                    or (caught_at is not None and now - caught_at < CAUGHT_MEMORY_S))
        rested = fault_at is None or now - fault_at >= probe_backoff(strikes)
        return ProviderStats(peer_id, max(LOW, score - self._busy_now(busy, busy_at, now)), ttft, tps, calls,
                             failures, violations, strikes, rested and not violator, violator, caught)

    def _update(self, peer_id: str, delta: float, sets: str = "", args: tuple[object, ...] = (),
                **counters: int) -> None:
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO providers(peer_id, score) VALUES (?, ?)", (peer_id, START))
            parts = [f"{k} = {k} + ?" for k in counters] + ([sets] if sets else [])
            self.db.execute(f"UPDATE providers SET score = MIN(?, MAX(?, score + ?)){''.join(', ' + p for p in parts)} "
                            "WHERE peer_id = ?", (HIGH, LOW, delta, *counters.values(), *args, peer_id))

    def completed(self, peer_id: str, ttft_s: float, tokens: int, duration_s: float) -> None:
        """A counter-signed call: +1 (less 2 when slow); a probe that completes ends probation."""
        tps = tokens / max(duration_s - ttft_s, 1e-3) if tokens else None
        slow = ttft_s > SLOW_TTFT_S or (tps is not None and tokens >= 8 and tps < SLOW_TPS)
        now = self._now()
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO providers(peer_id, score) VALUES (?, ?)", (peer_id, START))
            # a provider under the floor without a recent violation served: probation is over
            self.db.execute("UPDATE providers SET score = ? WHERE peer_id = ? AND score < ? AND "
                            "(violated_at IS NULL OR ? - violated_at >= ?)",
                            (FLOOR, peer_id, FLOOR, now, VIOLATION_MEMORY_S))
        self._update(peer_id, COMPLETED + (SLOW if slow else 0.0), "strikes = 0", calls=1)
        with self._lock:
            row = self.db.execute("SELECT ttft_s, tps FROM providers WHERE peer_id = ?", (peer_id,)).fetchone()
            old_ttft, old_tps = row
            new_ttft = ttft_s if old_ttft is None else ALPHA * ttft_s + (1 - ALPHA) * old_ttft
            new_tps = old_tps if tps is None else tps if old_tps is None else ALPHA * tps + (1 - ALPHA) * old_tps
            self.db.execute("UPDATE providers SET ttft_s = ?, tps = ? WHERE peer_id = ?", (new_ttft, new_tps, peer_id))

    def refused(self, peer_id: str, reason: str) -> None:
        """A refusal, attributed by its reason code (the module's table)."""
        if reason in STALE_REASONS or reason in OURS_REASONS or reason in THIRD_PARTY_REASONS:
            return
        if reason in CAPACITY_REASONS:
            self.busy(peer_id)
        elif reason in LISTING_REASONS:  # a fault, small: one strike, as a Sybil refusing forever must back off
            self._update(peer_id, LISTED, "strikes = strikes + 1, fault_at = ?", (self._now(),), failures=1)
        else:
            self.failed(peer_id)

    def busy(self, peer_id: str) -> None:
        """A capacity refusal: -2, held apart, at most -20 in all, halved every minute after."""
        now = self._now()
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO providers(peer_id, score) VALUES (?, ?)", (peer_id, START))
            busy, busy_at = self.db.execute("SELECT busy, busy_at FROM providers WHERE peer_id = ?",
                                            (peer_id,)).fetchone()
            held = min(BUSY_MAX, self._busy_now(busy, busy_at, now) + BUSY)
            self.db.execute("UPDATE providers SET busy = ?, busy_at = ?, failures = failures + 1 WHERE peer_id = ?",
                            (held, now, peer_id))

    def failed(self, peer_id: str) -> None:
        """A provider fault (unreachable, went away, stalled, its backend failed): -10, one strike."""
        self._update(peer_id, FAILURE, "strikes = strikes + 1, fault_at = ?", (self._now(),), failures=1)

    def violated(self, peer_id: str) -> None:
        """A protocol violation (a bad receipt): -50; not probed for a day."""
        now = self._now()
        self._update(peer_id, VIOLATION, "strikes = strikes + 1, fault_at = ?, violated_at = ?", (now, now),
                     violations=1)

    def caught(self, peer_id: str) -> None:
        """A failed spot check: it served another model than it committed to. Score to 0, never
        probed for ``CAUGHT_MEMORY_S``."""
        now = self._now()
        self._update(peer_id, -HIGH, "strikes = strikes + 1, fault_at = ?, violated_at = ?, caught_at = ?",
                     (now, now, now), violations=1, caught=1)

    def observe_alive(self, peer_ids: list[str], now: int) -> None:
        """Credit uptime to providers whose listings are alive at ``now``."""
        with self._lock:
            for peer_id in peer_ids:
                self.db.execute("INSERT OR IGNORE INTO providers(peer_id, score) VALUES (?, ?)", (peer_id, START))
                (last,) = self.db.execute("SELECT last_alive FROM providers WHERE peer_id = ?", (peer_id,)).fetchone()
                credit = PER_HOUR * (now - last) / 3600 if last is not None and 0 < now - last <= _ALIVE_GAP_S else 0.0
                self.db.execute("UPDATE providers SET last_alive = ?, score = MIN(?, score + ?) WHERE peer_id = ?",
                                (now, HIGH, credit, peer_id))
