"""Gossip topics for signed records beside the listings: evidence, attestations, market observations.

Rules:
- Every message is checked before it is taken in or relayed: its size first (``max_bytes``), then
  the part's own ``accept(data, now)`` — strict decode, signature and consistency checks, and the
  part's rate limits. ``accept`` returns the decoded record, or None (or raises a
  ``protocol.ProtocolError``) to refuse it; a refused message is neither delivered nor relayed, so a
  flood stops at the first honest node it reaches.
- Accepted records go to ``on_message`` synchronously, in the validator, exactly once per gossip
  message; it must not block (a part that has slow work to do queues it, bounded). Our own published
  messages pass through the same ``accept`` and ``on_message``.
- The subscription is drained continuously (py-libp2p drops messages on a full buffer).
- ``RateLimit`` is a token bucket per key, holding at most ``max_keys`` keys (least recently used
  dropped), so a stranger inventing keys cannot grow it.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import trio

import protocol

from ._market import Market

__all__ = ["RateLimit", "Topic", "open_topic"]

_logger = logging.getLogger(__name__)


class RateLimit:
    """Token buckets per key: ``burst`` at once, refilled at ``per_s`` a second; at most ``max_keys`` keys."""

    def __init__(self, burst: int, per_s: float, clock: Callable[[], float] = trio.current_time,
                 max_keys: int = 10_000) -> None:
        self.burst, self.per_s, self.clock, self.max_keys = burst, per_s, clock, max_keys
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str) -> bool:
        """Spend one token of ``key``'s bucket; False when it is empty (the caller refuses)."""
        now = self.clock()
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok


class Topic:
    """One gossip topic of signed records. Create with ``open_topic``."""

    def __init__(self, market: Market, name: str, max_bytes: int, accept: Callable[[bytes, int], Any],
                 on_message: Callable[[Any], None]) -> None:
        self.market, self.name, self.max_bytes = market, name, max_bytes
        self._accept, self._on_message = accept, on_message
        self.accepted = 0
        self.refused = 0

    def _validate(self, forwarder: Any, msg: Any) -> bool:
        data = getattr(msg, "data", b"")
        if len(data) > self.max_bytes:
            self.refused += 1
            return False
        try:
            record = self._accept(data, self.market.now())
        except protocol.ProtocolError as exc:
            _logger.debug("%s: refused a message from %s: %s", self.name, forwarder, exc)
            record = None
        if record is None:
            self.refused += 1
            return False
        self.accepted += 1
        try:
            self._on_message(record)
        except Exception:  # a part's bug must not break gossip for the others
            _logger.exception("%s: handling an accepted message failed", self.name)
        return True

    async def publish(self, data: bytes) -> None:
        """Gossip ``data`` (it passes our own validator first). A network failure is logged, not raised."""
        if len(data) > self.max_bytes:
            raise ValueError(f"{self.name}: a message of {len(data)} bytes is over {self.max_bytes}")
        try:
            await self.market.pubsub.publish(self.name, data)
        except Exception as exc:  # no peers yet, a closing host: the record is republished later or lost
            _logger.info("%s: publishing failed: %s", self.name, exc)

    async def _drain(self, subscription: Any) -> None:
        async for _ in subscription:
            pass  # the validator already took each message in


async def open_topic(market: Market, name: str, *, max_bytes: int, accept: Callable[[bytes, int], Any],
                     on_message: Callable[[Any], None], nursery: trio.Nursery) -> Topic:
    """Subscribe to ``name`` with its validator; the drain runs in ``nursery`` (the topic lives as long)."""
    topic = Topic(market, name, max_bytes, accept, on_message)
    market.pubsub.set_topic_validator(name, topic._validate, False)
    if market.config.subscribe:
        subscription = await market.pubsub.subscribe(name)
        nursery.start_soon(topic._drain, subscription)
    return topic
