"""A node's market insight: it observes its own trade each hour and takes in everyone else's.

**Observing.** Once an hour is over, the node signs one ``Observation`` per (role, model) it
traded in that hour, from its receipts (``HOME/receipts.db``): as a consumer, the calls it made
(completed ones from its receipts, failed ones as the renter reported them), tokens, what it
paid and at which prices; as a provider, what it served and earned and the demand it turned away
for capacity. It holds them and gossips them on ``protocol.OBSERVATION_TOPIC``; an hour already
observed (a restart) is not observed again. At most 16 price points per observation: the most
used; calls at rarer prices are left out of that observation's counts.

**Taking in.** A gossiped observation is refused (not relayed) unless it is at most
``MAX_OBSERVATION_BYTES``, decodes strictly, is signed by its observer and not held yet (a forgery
or a replay spends no one's rate), is within its rate and passes ``protocol.check_observation``: an observer with attestation history here (``node/reputation``) has its own bucket
(``KNOWN_BURST``, refilled over an hour); all others share one (``FRESH_BURST``, one every
``FRESH_EVERY_S``), so a flood of fresh identities is cut at a fixed rate.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import trio

import protocol
from wallet import Identity

from .._clock import WallClock
from .._receipts import ReceiptStore
from ..net._market import Market
from ..net._topics import RateLimit, Topic, open_topic
from ._advice import Advice, OfferedModel, advise
from ._market_data import MarketData, MarketFigures

__all__ = ["Insight", "open_insight", "KNOWN_BURST", "FRESH_BURST", "FRESH_EVERY_S"]

_logger = logging.getLogger(__name__)

KNOWN_BURST = 32
FRESH_BURST, FRESH_EVERY_S = 64, 2.0
MAX_POINTS = 16
TICK_S = 30.0
_FRESH = "\x00fresh"
HOUR = protocol.HOUR_S


@dataclasses.dataclass
class Insight:
    """What ``open_insight`` runs: the market data, this node's hourly observer, the topic."""

    identity: Identity
    data: MarketData
    receipts: ReceiptStore
    wall_clock: WallClock
    turned_away_total: Callable[[], collections.Counter[str]]  # the provider's counter since start
    offers: Callable[[], Iterable[OfferedModel]]
    topic: Topic | None = None
    observed: int = 0
    _failures: collections.Counter[tuple[str, int]] = dataclasses.field(default_factory=collections.Counter)
    _away: collections.Counter[tuple[str, int]] = dataclasses.field(default_factory=collections.Counter)
    _away_seen: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def now(self) -> int:
        return int(self.wall_clock())

    def failed(self, model: str, calls: int) -> None:
        """The renter's word that ``calls`` calls of ``model`` failed (the provider's fault)."""
        if calls > 0:
            self._failures[(model, self.now() // HOUR * HOUR)] += calls
            self._trim(self._failures)

    def tick(self) -> None:
        """Attribute the capacity refusals since the last tick to the hour in progress."""
        hour = self.now() // HOUR * HOUR
        for model, total in self.turned_away_total().items():
            if total > self._away_seen[model]:
                self._away[(model, hour)] += total - self._away_seen[model]
                self._away_seen[model] = total
        self._trim(self._away)

    def _trim(self, counter: collections.Counter[tuple[str, int]]) -> None:
        oldest = self.now() - 2 * 86_400
        for key in [k for k in counter if k[1] < oldest]:
            del counter[key]
        while len(counter) > 10_000:
            counter.pop(next(iter(counter)))

    # ---- this node's observations --------------------------------------------------------------

    def compile(self, hour: int, failures: dict[tuple[str, int], int] | None = None,
                away: dict[tuple[str, int], int] | None = None) -> list[protocol.Observation]:
        """This node's observations of the hour starting at ``hour`` (unsigned). Safe in a worker
        thread when given snapshots of the counters (``failures``, ``away``)."""
        failures = dict(self._failures) if failures is None else failures
        away = dict(self._away) if away is None else away
        rows = self.receipts.query("SELECT role, model, receipt FROM receipts WHERE stored_at >= ? AND stored_at < ? "
                                   "LIMIT 1000000", (hour, hour + HOUR))
        trade: dict[tuple[str, str], list[protocol.Receipt]] = {}
        for role, model, blob in rows:
            receipt = protocol.decode(bytes(blob), expect=(protocol.Receipt,))
            trade.setdefault((role, model), []).append(receipt)
        for (model, h), n in failures.items():
            if h == hour and n:
                trade.setdefault(("consumer", model), [])
        for (model, h), n in away.items():
            if h == hour and n:
                trade.setdefault(("provider", model), [])
        out = []
        for (role, model), receipts in sorted(trade.items()):
            prices = collections.Counter((r.price.input_per_1k, r.price.output_per_1k) for r in receipts)
            kept = dict(sorted(prices.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_POINTS])
            counted = [r for r in receipts if (r.price.input_per_1k, r.price.output_per_1k) in kept]
            failed = failures.get((model, hour), 0) if role == "consumer" else 0
            out.append(protocol.Observation(
                observer=self.identity.peer_id, role=role, model=model, hour=hour,
                calls=len(counted) + failed, completed=len(counted),
                tokens_in=sum(r.tokens_in for r in counted), tokens_out=sum(r.tokens_out for r in counted),
                value=sum(r.cost for r in counted),
                turned_away=away.get((model, hour), 0) if role == "provider" else 0,
                prices=tuple(protocol.PricePoint(i, o, n) for (i, o), n in sorted(kept.items())),
                issued_at=self.now()))
        return out

    async def observe(self, hour: int) -> list[protocol.Observation]:
        """Sign, hold and gossip this node's observations of ``hour`` not held yet."""
        signed = []
        compiled = await trio.to_thread.run_sync(self.compile, hour, dict(self._failures), dict(self._away))
        for o in compiled:
            if self.data.has(o.observer, o.role, o.model, o.hour):
                continue
            o = protocol.sign(o, "sig", self.identity)
            data = protocol.encode(o, max_size=protocol.MAX_OBSERVATION_BYTES)
            self.data.add(o, data)
            self.observed += 1
            signed.append(o)
            if self.topic is not None:
                await self.topic.publish(data)
        return signed

    async def run(self) -> None:
        """Every ``TICK_S``: count refusals; once an hour is over, observe it (and, at start, the hour before)."""
        last_done = self.now() // HOUR * HOUR - 2 * HOUR
        while True:
            self.tick()
            finished = self.now() // HOUR * HOUR - HOUR
            for hour in range(last_done + HOUR, finished + HOUR, HOUR):
                await self.observe(hour)
            last_done = max(last_done, finished)
            await trio.sleep(TICK_S)

    # ---- what the node shows -------------------------------------------------------------------

    async def advise(self, hours: int) -> Advice:
        """``node advise`` over the last ``hours`` (its reads and sums run in a worker thread)."""
        self.tick()
        return await trio.to_thread.run_sync(self._advise, hours, dict(self._away))

    async def market(self, model: str, hours: int) -> MarketFigures:
        return await trio.to_thread.run_sync(self.data.figures, model, hours)

    def _advise(self, hours: int, away_by_hour: dict[tuple[str, int], int]) -> Advice:
        until = self.now() // HOUR * HOUR + HOUR  # the hour in progress counts for what this node did
        since = until - hours * HOUR
        served = self.receipts.query("SELECT model, cost, latency_ms, stored_at FROM receipts WHERE role = 'provider' "
                                     "AND stored_at >= ? AND stored_at < ? LIMIT 1000000", (since, until))
        away: collections.Counter[str] = collections.Counter()
        for (model, hour), n in away_by_hour.items():
            if since <= hour < until:
                away[model] += n
        for o in self.data.observations(None, since, until):  # refusals of hours before a restart
            if o.observer == self.identity.peer_id and o.role == "provider" \
                    and (o.model, o.hour) not in away_by_hour:
                away[o.model] += o.turned_away
        return advise(self.offers(), served, dict(away), self.data.observations(None, since, until), since, until)

    def status(self) -> dict[str, Any]:
        return {"observed": self.observed,
                "gossip": {"accepted": self.topic.accepted, "refused": self.topic.refused} if self.topic else None}


@asynccontextmanager
async def open_insight(identity: Identity, home: Path, *, receipts: ReceiptStore, market: Market | None,
                       wall_clock: WallClock, turned_away: Callable[[], collections.Counter[str]],
                       offers: Callable[[], Iterable[OfferedModel]],
                       has_history: Callable[[str], bool] = lambda peer: False) -> AsyncIterator[Insight]:
    """Run a node's market insight for the block's duration (its store closed at its end)."""
    data = MarketData(home / "market.db", wall_clock)
    insight = Insight(identity, data, receipts, wall_clock, turned_away, offers)
    try:
        async with trio.open_nursery() as nursery:
            if market is not None:
                insight.topic = await _join(insight, market, has_history, nursery)
            nursery.start_soon(insight.run)
            try:
                yield insight
            finally:
                nursery.cancel_scope.cancel()
    finally:
        data.close()


async def _join(insight: Insight, market: Market, has_history: Callable[[str], bool], nursery: trio.Nursery) -> Topic:
    known = RateLimit(KNOWN_BURST, KNOWN_BURST / HOUR)
    fresh = RateLimit(FRESH_BURST, 1 / FRESH_EVERY_S, max_keys=1)
    me = insight.identity.peer_id

    def accept(data: bytes, now: int) -> tuple[protocol.Observation, bytes] | None:
        o = protocol.decode(data, max_size=protocol.MAX_OBSERVATION_BYTES, expect=(protocol.Observation,))
        if o.observer != me:
            # neither a forgery naming someone nor a replay of what is held spends anyone's tokens
            protocol.verify(o, "sig", protocol.public_key_from_peer_id(o.observer))
            if insight.data.has(o.observer, o.role, o.model, o.hour):
                return None
            limit, key = (known, o.observer) if has_history(o.observer) else (fresh, _FRESH)
            if not limit.take(key):
                return None
        protocol.check_observation(o, now)
        return o, data

    def on_message(taken: tuple[protocol.Observation, bytes]) -> None:
        o, data = taken
        if o.observer != me:
            insight.data.add(o, data)

    return await open_topic(market, protocol.OBSERVATION_TOPIC, max_bytes=protocol.MAX_OBSERVATION_BYTES,
                            accept=accept, on_message=on_message, nursery=nursery)
