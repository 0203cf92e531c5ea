"""Service-level targets, measured from the provider's own records, with a penalty that shows.

    [sla]
    ttft_ms = 2000          # time to first token: the 95th percentile of recent calls must stay under it
    completion_rate = 0.95  # share of admitted calls that complete (backend failures and timeouts count)
    availability = 0.99     # share of the node's running time its listing was published
    window = 50             # recent calls per model that the targets are measured over
    penalty_permille = 100  # discount (thousandths) on each receipt of the model while in breach

While a model is in breach of any target, every receipt its sessions get carries the penalty as
``discount_permille`` and a cost reduced by it — visible to, and checked by, the consumer.
Targets left out are not enforced; with no ``[sla]`` table nothing is.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

__all__ = ["SlaConfig", "SlaTracker", "parse_sla"]


@dataclasses.dataclass(frozen=True)
class SlaConfig:
    """The ``[sla]`` table: targets for time to first token, completion rate and availability, and the penalty."""

    ttft_ms: int | None = None
    completion_rate: float | None = None
    availability: float | None = None
    window: int = 50
    penalty_permille: int = 0


def parse_sla(raw: dict[str, Any] | None) -> SlaConfig:
    """An ``[sla]`` table. Raises ValueError for unknown keys or values out of range."""
    raw = dict(raw or {})
    unknown = set(raw) - {f.name for f in dataclasses.fields(SlaConfig)}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    cfg = SlaConfig(**raw)
    if (cfg.ttft_ms is not None and cfg.ttft_ms <= 0) or cfg.window < 1 or not 0 <= cfg.penalty_permille <= 1000 \
            or any(v is not None and not 0 <= v <= 1 for v in (cfg.completion_rate, cfg.availability)):
        raise ValueError("ttft_ms > 0, rates in 0..1, window >= 1, penalty_permille in 0..1000")
    return cfg


class SlaTracker:
    """Measures the SLA from the provider's own records and gives the discount a breach earns its receipts."""

    def __init__(self, config: SlaConfig, availability: Callable[[], float] = lambda: 1.0) -> None:
        self.config = config
        self._availability = availability
        self._calls: dict[str, collections.deque[tuple[int | None, bool]]] = {}

    def record(self, model: str, ttft_ms: int | None, ok: bool) -> None:
        self._calls.setdefault(model, collections.deque(maxlen=self.config.window)).append((ttft_ms, ok))

    def breach(self, model: str) -> str | None:
        """Which target ``model`` misses right now, if any."""
        c = self.config
        if c.availability is not None and self._availability() < c.availability:
            return f"availability {self._availability():.1%} is under {c.availability:.1%}"
        calls = self._calls.get(model)
        if not calls:
            return None
        if c.completion_rate is not None:
            rate = sum(ok for _, ok in calls) / len(calls)
            if rate < c.completion_rate:
                return f"completion rate {rate:.1%} is under {c.completion_rate:.1%}"
        if c.ttft_ms is not None:
            ttfts = sorted(t for t, ok in calls if t is not None)
            if ttfts:
                p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
                if p95 > c.ttft_ms:
                    return f"time to first token p95 {p95} ms is over {c.ttft_ms} ms"
        return None

    def discount(self, model: str) -> int:
        """The penalty to apply to ``model``'s next receipt (0 when within every target)."""
        return self.config.penalty_permille if self.config.penalty_permille and self.breach(model) else 0
