"""Pricing models that resolve to the per-1K input/output prices pinned at session accept.

Dynamic pricing by utilization (``[pricing.dynamic]`` in config.toml)::

    [pricing.dynamic]
    demand_threshold = 0.5     # utilization (active sessions / capacity) where surge starts
    max_multiplier = 3.0       # price at full utilization, times the offer's base price
    adjustment_interval_s = 30 # how often the price is re-evaluated (and re-published if it moved)

The multiplier is 1 up to the threshold, then rises linearly to ``max_multiplier`` at full
utilization: bounded, and monotonic in utilization. It is applied in integer thousandths and
prices round up, so no float reaches a signed or stored price. Sessions keep the price their
Accept pinned; a consumer holding an older listing gets ``price_changed`` and the new price.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import protocol

__all__ = ["DynamicPricing", "parse_dynamic"]


@dataclasses.dataclass(frozen=True)
class DynamicPricing:
    """The ``[pricing.dynamic]`` table: how the listed price rises with utilization (bounded, integer)."""

    demand_threshold: float = 0.5
    max_multiplier: float = 3.0
    adjustment_interval_s: float = 30.0

    def multiplier_milli(self, utilization: float) -> int:
        """The price multiplier in thousandths for a utilization in [0, 1] (clamped)."""
        u = min(1.0, max(0.0, utilization))
        top = int(round(self.max_multiplier * 1000))
        if u <= self.demand_threshold or self.demand_threshold >= 1.0:
            return 1000
        span = (u - self.demand_threshold) / (1.0 - self.demand_threshold)
        return min(top, 1000 + int((top - 1000) * span))

    def price(self, base: protocol.Price, utilization: float) -> protocol.Price:
        m = self.multiplier_milli(utilization)
        return protocol.Price(input_per_1k=-(-base.input_per_1k * m // 1000),
                              output_per_1k=-(-base.output_per_1k * m // 1000), min_charge=base.min_charge)


def parse_dynamic(raw: dict[str, Any] | None) -> DynamicPricing | None:
    """A ``[pricing.dynamic]`` table, or None. Raises ValueError for bad values."""
    if not raw:
        return None
    unknown = set(raw) - {f.name for f in dataclasses.fields(DynamicPricing)}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    d = DynamicPricing(**raw)
    if not (0.0 <= d.demand_threshold <= 1.0 and 1.0 <= d.max_multiplier <= 100.0 and d.adjustment_interval_s > 0):
        raise ValueError("demand_threshold in 0..1, max_multiplier in 1..100, adjustment_interval_s > 0")
    return d
