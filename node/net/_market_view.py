"""The market view: validated listings by provider and by model, with counters of what was
rejected and why. Pure bookkeeping: no I/O, time comes in as ``now``.

Listings arrive from gossip and the DHT in any order (gossip replays old messages to new
subscribers): the view orders them by ``seq`` only, never by arrival.

Every change of what the view holds (a listing added, replaced by a higher ``seq``, or dropped
by ``expire``) bumps ``version`` and calls each watcher, synchronously; a refusal or a duplicate
is no change. The view never waits: ``Market.wait_changed`` turns the watcher call into a trio
wake-up.

The view is bounded (listings are free to make; 1,000 x 32 KB cost ~70 MB on every node): at most
``max_listings`` providers, ``max_per_model`` providers per model and ``max_bytes`` of encoded
listings. When a new provider (or a model new to a held provider) does not fit, the held provider
with the lowest ``keep_score`` (the daemon passes trust; the longest held first among equals)
makes room, but only for a provider that scores at least as high: an unknown newcomer never
evicts a provider with history (it is refused with ``rejected["full"]``), and a flood of unknown
listings cannot lock later unknown ones out, honest newcomers included: they take turns, oldest
out first. Scores are read once per decision. Evictions are counted in ``evicted``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import protocol
from protocol import Listing, ModelOffer

__all__ = ["MarketView", "MarketRow", "REJECT_REASONS"]

REJECT_REASONS = ("bad_signature", "stale_seq", "expired", "malformed", "oversize", "full")

#: defaults: ~2 KiB listings make 2,000 of them ~4 MB; a model with 200 providers is a big market;
#: 16 MiB of encoded listings bounds the worst case (64 KiB listings) at ~40 MB of objects
MAX_LISTINGS = 2_000
MAX_PER_MODEL = 200
MAX_BYTES = 16 << 20


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

    def __init__(
        self,
        max_listings: int = MAX_LISTINGS,
        max_per_model: int = MAX_PER_MODEL,
        max_bytes: int = MAX_BYTES,
        keep_score: Callable[[str], float] | None = None,
    ) -> None:
        """Args:
            max_listings: providers held at most.
            max_per_model: providers held at most for any one model.
            max_bytes: encoded bytes of the listings held at most.
            keep_score: provider peer id -> how much to keep it (higher keeps); default all 0.
        """
        self.max_listings = max_listings
        self.max_per_model = max_per_model
        self.max_bytes = max_bytes
        self.keep_score = keep_score or (lambda provider: 0.0)
        self._by_provider: dict[str, Listing] = {}
        self._by_model: dict[str, set[str]] = {}
        self._size: dict[str, int] = {}  # provider -> encoded bytes of its listing
        self._arrival: dict[str, int] = {}  # provider -> order it arrived in (newest highest)
        self._arrivals = 0
        self.rejected: Counter[str] = Counter({r: 0 for r in REJECT_REASONS})
        self.evicted = 0
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
        if not self._make_room(listing, held, len(data)):
            self.rejected["full"] += 1
            return None
        self._put(listing, len(data))
        self.accepted += 1
        self._changed()
        return listing

    def score(self, provider: str) -> float:
        """``keep_score(provider)``; a scorer that fails scores 0 (it must not open the view to everyone)."""
        try:
            return float(self.keep_score(provider))
        except Exception:
            return 0.0

    def _make_room(self, listing: Listing, held: Listing | None, size: int) -> bool:
        """Evict what ``listing`` needs, if every victim scores no higher; False (nothing evicted) if not."""
        me = listing.provider
        scores: dict[str, float] = {}

        def score_of(p: str) -> float:
            if p not in scores:
                scores[p] = self.score(p)
            return scores[p]

        score = score_of(me)
        victims: set[str] = set()

        def take(pool: set[str] | list[str]) -> bool:
            options = [p for p in pool if p != me and p not in victims]
            if not options:
                return False
            victim = min(options, key=lambda p: (score_of(p), self._arrival[p]))
            if score_of(victim) > score:
                return False
            victims.add(victim)
            return True

        held_models = {m.name for m in held.models} if held is not None else set()
        for name in {m.name for m in listing.models} - held_models:
            holders = self._by_model.get(name, set())
            while len(holders - victims) >= self.max_per_model:
                if not take(holders):
                    return False
        while len(self._by_provider) - len(victims) + (held is None) > self.max_listings:
            if not take(list(self._by_provider)):
                return False
        used = sum(self._size.values()) - self._size.get(me, 0)
        while used - sum(self._size[v] for v in victims) + size > self.max_bytes:
            if not take(list(self._by_provider)):
                return False
        for victim in victims:
            self._drop(victim)
            del self._arrival[victim]
        self.evicted += len(victims)
        return True

    def _put(self, listing: Listing, size: int) -> None:
        me = listing.provider
        if me in self._by_provider:
            self._drop(me)
        else:
            self._arrivals += 1
            self._arrival[me] = self._arrivals
        self._by_provider[me] = listing
        self._size[me] = size
        for m in listing.models:
            self._by_model.setdefault(m.name, set()).add(me)

    def _drop(self, provider: str) -> None:
        listing = self._by_provider.pop(provider)
        self._size.pop(provider, None)
        for m in listing.models:
            holders = self._by_model.get(m.name)
            if holders is not None:
                holders.discard(provider)
                if not holders:
                    del self._by_model[m.name]

    def is_acceptable(self, data: bytes, now: int) -> bool:
        """``offer`` for a gateway (a gossip validator): takes it in and says whether to relay it."""
        return self.offer(data, now) is not None

    def expire(self, now: int) -> list[Listing]:
        """Drop expired listings; return them."""
        gone = [lst for lst in self._by_provider.values() if lst.expires_at <= now]
        for lst in gone:
            self._drop(lst.provider)
            self._arrival.pop(lst.provider, None)
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
        return {"listings": len(self), "accepted": self.accepted, "rejected": dict(self.rejected),
                "evicted": self.evicted}
