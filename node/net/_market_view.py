"""The market view: validated listings by provider and by model, with counters of what was
rejected and why. Pure bookkeeping: no I/O, time comes in as ``now``.

Listings arrive from gossip and the DHT in any order (gossip replays old messages to new
subscribers): the view orders them by ``seq`` only, never by arrival.

Every change of what the view holds (a listing added, replaced by a higher ``seq``, or dropped
by ``expire``) bumps ``version`` and calls each watcher, synchronously; a refusal or a duplicate
is no change. The view never waits: ``Market.wait_changed`` turns the watcher call into a trio
wake-up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import protocol
from protocol import Listing, ModelOffer

__all__ = ["MarketView", "MarketRow", "REJECT_REASONS"]

REJECT_REASONS = ("bad_signature", "stale_seq", "expired", "malformed", "oversize")


def reject_reason(exc: protocol.ProtocolError) -> str:
    """The counter a refused listing is filed under."""
    if isinstance(exc, protocol.FrameTooLarge):
        return "oversize"
    if isinstance(exc, protocol.BadSignature):
        return "bad_signature"
    if isinstance(exc, protocol.Expired):
        return "expired"
    return "malformed"


@dataclass(frozen=True)
class MarketRow:
    """One model offered by one provider, as the market shows it."""

    listing: Listing
    offer: ModelOffer


class MarketView:
    """Every valid listing this node knows, by provider and by model; counts what it refused and every change."""

    def __init__(self) -> None:
        self._by_provider: dict[str, Listing] = {}
        self.rejected: Counter[str] = Counter({r: 0 for r in REJECT_REASONS})
        self.accepted = 0
        self.version = 0  # bumped on every change of the listings held
        self._watchers: list[Callable[[], None]] = []

    def watch(self, notify: Callable[[], None]) -> None:
        """Call ``notify()`` after every change (it runs inside ``offer`` or ``expire``: keep it brief)."""
        self._watchers.append(notify)

    def _changed(self) -> None:
        self.version += 1
        for notify in self._watchers:
            notify()

    def __len__(self) -> int:
        return len(self._by_provider)

    def offer(self, data: bytes, now: int) -> Listing | None:
        """Consider listing bytes from the network.

        Returns:
            The listing if it is valid and not older than what the view holds (a duplicate of
            the held listing is returned too, and not counted), else ``None`` with the reason
            counted in ``rejected``.
        """
        try:
            listing = protocol.decode_listing(data, now)
        except protocol.ProtocolError as exc:
            self.rejected[reject_reason(exc)] += 1
            return None
        held = self._by_provider.get(listing.provider)
        if held is not None and held.seq == listing.seq and held == listing:
            return listing
        if held is not None and listing.seq <= held.seq:
            self.rejected["stale_seq"] += 1
            return None
        self._by_provider[listing.provider] = listing
        self.accepted += 1
        self._changed()
        return listing

    def is_acceptable(self, data: bytes, now: int) -> bool:
        """``offer`` for a gateway (a gossip validator): takes it in and says whether to relay it."""
        return self.offer(data, now) is not None

    def expire(self, now: int) -> list[Listing]:
        """Drop expired listings; return them."""
        gone = [lst for lst in self._by_provider.values() if lst.expires_at <= now]
        for lst in gone:
            del self._by_provider[lst.provider]
        if gone:
            self._changed()
        return gone

    def listing(self, provider: str, now: int) -> Listing | None:
        lst = self._by_provider.get(provider)
        return lst if lst is not None and lst.expires_at > now else None

    def listings(self, now: int) -> list[Listing]:
        return [lst for lst in self._by_provider.values() if lst.expires_at > now]

    def rows(self, now: int, model: str | None = None) -> list[MarketRow]:
        """Every (listing, model offer) pair alive at ``now``, optionally for one model."""
        return [
            MarketRow(lst, m)
            for lst in self.listings(now)
            for m in lst.models
            if model is None or m.name == model
        ]

    def models(self, now: int) -> dict[str, list[MarketRow]]:
        out: dict[str, list[MarketRow]] = {}
        for row in self.rows(now):
            out.setdefault(row.offer.name, []).append(row)
        return out

    def stats(self) -> dict[str, object]:
        return {"listings": len(self), "accepted": self.accepted, "rejected": dict(self.rejected)}
