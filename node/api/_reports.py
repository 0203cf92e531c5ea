"""What a provider earns and how its node is doing: ``node earnings``, ``node stats`` and the
Prometheus ``/metrics`` endpoint. Everything is computed from the receipts this node keeps (every
counter-signed receipt it served) and the escrow agents' confirmed claims recorded beside them
(``ReceiptStore.record_claim``) — integer µc.

- total: the cost of every counter-signed receipt served in the period (``by`` splits it);
- claimed: what escrow agents confirmed paying in the period, by their own answers (their
  channel totals included), so over all time it equals what the agents paid this node;
- forfeited: what was given up in the period (channels that can no longer pay);
- pending: everything counter-signed and not yet paid or forfeited, whatever the period: what
  the settlement worker is still collecting.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .._errors import InvalidRequest

if TYPE_CHECKING:
    from .._node import Node

__all__ = ["parse_period", "earnings", "stats", "metrics_registry"]

_PERIOD = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BY = {"model": "model", "client": "peer", "hour": "strftime('%Y-%m-%dT%H:00Z', stored_at, 'unixepoch')"}


def parse_period(period: str) -> int:
    """Seconds in a period such as ``30d``, ``12h``, ``90m``.

    Raises:
        ValueError: not a number followed by s, m, h or d.
    """
    m = _PERIOD.match(period.strip())
    if not m:
        raise ValueError(f"period {period!r} is not like 30d, 12h or 90m")
    return int(m.group(1)) * _UNITS[m.group(2)]


def earnings(service: "Node", period: str = "30d", by: str = "model") -> dict[str, Any]:
    """``{period, total, claimed, pending, forfeited, by: {key: amount}}`` for receipts this node served.

    Raises:
        InvalidRequest: a period not like 30d, or ``by`` not one of model, client, hour.
    """
    if by not in _BY:
        raise InvalidRequest("by is one of model, client, hour", "by")
    try:
        seconds = parse_period(period)
    except ValueError as exc:
        raise InvalidRequest(str(exc), "period") from exc
    since = int(time.time()) - seconds
    where = "role = 'provider' AND stored_at >= ?"
    (total,), = service.receipts.query(f"SELECT COALESCE(SUM(cost), 0) FROM receipts WHERE {where}", (since,))
    groups = service.receipts.query(f"SELECT {_BY[by]} AS k, SUM(cost) FROM receipts WHERE {where} GROUP BY k "
                                    "ORDER BY k", (since,))
    in_period, ever = service.receipts.earnings(since), service.receipts.earnings(0)
    return {"period": period, "total": int(total), "claimed": in_period.paid, "pending": ever.pending,
            "forfeited": in_period.forfeited, "by": {str(k): int(v) for k, v in groups}}


def stats(service: "Node") -> dict[str, Any]:
    """This node's totals as a provider, and the network as its market view sees it."""
    (requests, tokens, earned, latency), = service.receipts.query(
        "SELECT COUNT(*), COALESCE(SUM(tokens_in + tokens_out), 0), COALESCE(SUM(cost), 0), AVG(latency_ms) "
        "FROM receipts WHERE role = 'provider'")
    now = service.market.now()
    models: dict[str, Any] = {}
    providers = set()
    for name, rows in sorted(service.market.view.models(now).items()):
        providers.update(r.listing.provider for r in rows)
        ins = [r.offer.price.input_per_1k for r in rows]
        outs = [r.offer.price.output_per_1k for r in rows]
        models[name] = {"providers": len(rows), "min_input_price": min(ins), "max_input_price": max(ins),
                        "min_output_price": min(outs), "max_output_price": max(outs)}
    return {
        "node": {"requests": int(requests), "tokens_served": int(tokens), "earnings": int(earned),
                 "avg_latency_ms": None if latency is None else int(latency),
                 "uptime_score": service.market.listed_fraction()},
        "network": {"providers": len(providers), "models": models},
    }


class _NodeCollector(Collector):
    def __init__(self, service: "Node") -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        s = self.service
        served = CounterMetricFamily("inferswarm_calls_served", "Counter-signed calls served, by model",
                                     labels=["model"])
        tokens = CounterMetricFamily("inferswarm_tokens_served", "Tokens served, by model and direction",
                                     labels=["model", "direction"])
        earned = CounterMetricFamily("inferswarm_earnings_microcredits", "Micro-credits earned, by model",
                                     labels=["model"])
        for model, n, tin, tout, cost in s.receipts.query(
                "SELECT model, COUNT(*), SUM(tokens_in), SUM(tokens_out), SUM(cost) FROM receipts "
                "WHERE role = 'provider' GROUP BY model"):
            served.add_metric([model], n)
            tokens.add_metric([model, "in"], tin)
            tokens.add_metric([model, "out"], tout)
            earned.add_metric([model], cost)
        yield from (served, tokens, earned)
        active = GaugeMetricFamily("inferswarm_sessions_active", "Sessions being served, by model", labels=["model"])
        for model, n in s.provider.active.items():
            active.add_metric([model], n)
        yield active
        now = s.market.now()
        yield GaugeMetricFamily("inferswarm_market_listings", "Valid listings in this node's view",
                                value=len(s.market.view.listings(now)))
        rejected = CounterMetricFamily("inferswarm_market_rejected", "Listings refused, by reason", labels=["reason"])
        for reason, n in s.market.view.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield GaugeMetricFamily("inferswarm_connected_peers", "Connected libp2p peers",
                                value=len(s.host.get_connected_peers()))
        yield GaugeMetricFamily("inferswarm_uptime_seconds", "Seconds since the node started", value=s.uptime_s())
        yield GaugeMetricFamily("inferswarm_offers", "Models this node offers", value=len(s.offers()))
        healthy = GaugeMetricFamily("inferswarm_model_healthy", "1 if the model passes its health checks",
                                    labels=["model"])
        for offer in s.offers():
            healthy.add_metric([offer.model], 1 if s.health.healthy(offer.model) else 0)
        yield healthy
        yield CounterMetricFamily("inferswarm_health_alerts", "Health changes (withdrawals and recoveries)",
                                  value=s.health.alerts)


def metrics_registry(service: "Node") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_NodeCollector(service))
    return registry
