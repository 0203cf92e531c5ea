"""``node advise``: a provider's figures against the market's, and a price it could ask, with why.

For each model this node offers, over the last ``hours`` whole hours:

- **position**: the share (permille) of the market's price samples (``_market_data``) whose output
  price is below this offer's;
- **utilization**: busy time over capacity: the sum of its calls' service times (request received
  to receipt sent) over ``hours`` × 3600 s × the offer's ``max_concurrent``, permille;
- **turned away**: sessions and calls it refused for capacity (its own provider observations and
  the hour in progress);
- **peak hours**: the UTC hours of the day with the most calls served, at most three;
- **earned**: µc over its receipts; models are listed most profitable first.

The suggestion, in this order (integers throughout):

1. demand over capacity — turned away at least ``MIN_TURNED_AWAY`` calls and at least a tenth of
   what it served, or utilization at least ``BUSY_PERMILLE``: ask 10% more, but not past the market's p75 (already at or past it: keep the
   price; what is missing is capacity);
2. idle and dear — utilization under ``IDLE_PERMILLE`` and the output price over the market's
   median: ask the market's median (input and output);
3. otherwise, or without market samples: keep the price.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Iterable

import protocol

from ._market_data import PriceSpread, price_sample

__all__ = ["Advice", "ModelAdvice", "OfferedModel", "advise", "BUSY_PERMILLE", "IDLE_PERMILLE", "MIN_TURNED_AWAY"]

BUSY_PERMILLE, IDLE_PERMILLE = 800, 200
MIN_TURNED_AWAY = 5  # one refused call is not a trend


@dataclasses.dataclass(frozen=True, slots=True)
class OfferedModel:
    """What this node lists for one model."""

    model: str
    input_per_1k: int
    output_per_1k: int
    max_concurrent: int


@dataclasses.dataclass(frozen=True, slots=True)
class ModelAdvice:
    model: str
    input_price: int
    output_price: int
    market: PriceSpread | None
    position_permille: int | None
    calls: int
    earned: int
    utilization_permille: int
    turned_away: int
    peak_hours: tuple[tuple[int, int], ...]  # (UTC hour of day, calls)
    suggested_input: int
    suggested_output: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["market"] = self.market.to_json() if self.market else None
        d["peak_hours"] = [{"hour": h, "calls": n} for h, n in self.peak_hours]
        return d


@dataclasses.dataclass(frozen=True, slots=True)
class Advice:
    since: int
    until: int
    models: tuple[ModelAdvice, ...]  # most profitable first

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "until": self.until, "models": [m.to_json() for m in self.models],
                "most_profitable": [m.model for m in self.models if m.earned > 0]}


def _suggest(offer: OfferedModel, spread: PriceSpread | None, served: int, turned_away: int,
             utilization: int) -> tuple[int, int, str]:
    keep = (offer.input_per_1k, offer.output_per_1k)
    if spread is None:
        return (*keep, "no market observations of this model in the window: keep the price")
    p50, p75 = spread.output[50], spread.output[75]
    over = turned_away >= MIN_TURNED_AWAY and turned_away * 10 >= served
    if over or utilization >= BUSY_PERMILLE:
        why = f"turned away {turned_away} against {served} served" if over else f"utilization {utilization}‰"
        if offer.output_per_1k >= p75:
            return (*keep, f"demand over capacity ({why}), but already at or above the market's p75 "
                           f"({protocol.format_credits(p75)}): keep the price, add capacity")
        up_out = min(offer.output_per_1k * 11 // 10, p75)
        up_in = offer.input_per_1k * up_out // offer.output_per_1k if offer.output_per_1k else offer.input_per_1k
        return (up_in, up_out, f"demand over capacity ({why}): ask 10% more, capped at the market's p75 "
                               f"({protocol.format_credits(p75)})")
    if utilization < IDLE_PERMILLE and offer.output_per_1k > p50:
        return (spread.input[50], p50, f"idle (utilization {utilization}‰) and priced above the market's median "
                                       f"({protocol.format_credits(p50)}): ask the median")
    return (*keep, f"utilization {utilization}‰, {turned_away} turned away, priced within the market: keep the price")


def advise(offers: Iterable[OfferedModel], served: Iterable[tuple[str, int, int | None, int]],
           turned_away: dict[str, int], observations: Iterable[protocol.Observation], since: int,
           until: int) -> Advice:
    """The advice for ``offers`` (the module's rules).

    Args:
        served: this node's provider receipts in the window: (model, cost µc, service time ms or
            None, stored at unix s).
        turned_away: per model, refused for capacity in the window.
        observations: the market's observations in the window.
    """
    window_s = max(1, until - since)
    by_model: dict[str, list[tuple[int, int | None, int]]] = {}
    for model, cost, latency_ms, at in served:
        by_model.setdefault(model, []).append((cost, latency_ms, at))
    samples: dict[str, list[protocol.PricePoint]] = {}
    for o in observations:
        if o.role == "consumer" and since <= o.hour < until and (p := price_sample(o)) is not None:
            samples.setdefault(o.model, []).append(p)
    out = []
    for offer in offers:
        rows = by_model.get(offer.model, [])
        points = samples.get(offer.model, [])
        spread = PriceSpread.of(points)
        busy_ms = sum(ms or 0 for _, ms, _ in rows)
        utilization = busy_ms * 1000 // (window_s * 1000 * max(1, offer.max_concurrent))
        hours: dict[int, int] = {}
        for _, _, at in rows:
            h = datetime.datetime.fromtimestamp(at, datetime.timezone.utc).hour
            hours[h] = hours.get(h, 0) + 1
        peaks = tuple(sorted(hours.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
        away = turned_away.get(offer.model, 0)
        position = (sum(p.output_per_1k < offer.output_per_1k for p in points) * 1000 // len(points)
                    if points else None)
        s_in, s_out, reason = _suggest(offer, spread, len(rows), away, utilization)
        out.append(ModelAdvice(offer.model, offer.input_per_1k, offer.output_per_1k, spread, position, len(rows),
                               sum(c for c, _, _ in rows), utilization, away, peaks, s_in, s_out, reason))
    out.sort(key=lambda m: (-m.earned, m.model))
    return Advice(since, until, tuple(out))
