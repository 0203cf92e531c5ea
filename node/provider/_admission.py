"""Admission: who may open a session or start a call on this provider, and the seats they hold.

Pure: no I/O and no clock reads — the time, the offer as listed now and the agent's answer about
the channel come in as arguments, so every rule is unit-tested without a network. The session
service asks in this order and sends the first refusal it gets (as the protocol machine's
``Reject`` or ``CallError``):

1. ``check_open``: the model is sold, the schedule is open, the consumer offers exactly the
   session's terms, the escrow agent is one we accept, the consumer left no receipt of ours
   unsigned lately (``record_unpaid``: one unpaid call per consumer, not per session), the
   session can pay for at least one call (so holding a seat locks money), a seat is free
   (capacity less the seats that fixed-rate contracts reserve for their clients; the tier's own
   cap), the rate limit.
2. ``check_channel``: the channel as its agent reports it is open, this one, lives at least
   ``MIN_CHANNEL_LIFE_S`` more (so its receipts can be claimed before it expires), and holds
   at least the session's spend cap. What other sessions on the same channel may still spend is
   the ``ChannelBook``'s to check, next.
3. ``seat``: the seat is held (counted for capacity, tiers and utilization) until released.
4. ``check_call``: per call, the rate limit and ``max_tokens`` against the context.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
from contextlib import contextmanager
from typing import AbstractSet, Iterator

import protocol
from protocol import ChannelState, ModelOffer, Open

from .._contracts import Contract, active_contract, reserved_slots
from ._offers import Offer

__all__ = ["Admission", "Refusal", "RateLimiter", "MIN_CHANNEL_LIFE_S", "UNPAID_HOLD_S"]

MIN_CHANNEL_LIFE_S = 120  # a channel must outlive the session's calls and the claim after them
UNPAID_HOLD_S = 3600  # a consumer that left a receipt unsigned is refused this long
_MAX_TRACKED = 10_000  # consumers remembered by the rate limiter and the unpaid list


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a session or call is refused: a ``protocol`` reason code, a detail, when to retry."""

    reason: str
    detail: str
    retry_after_s: int = 0


class RateLimiter:
    """Requests per minute per consumer, over a sliding 60 s window (``now`` in seconds, any origin)."""

    def __init__(self, max_tracked: int = _MAX_TRACKED) -> None:
        self._seen: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self.max_tracked = max_tracked

    def allow(self, consumer: str, limit: int, now: float) -> float:
        """0 if a request may go now (and count it), else the seconds to wait. At most
        ``max_tracked`` consumers are remembered (the least recently seen are forgotten)."""
        if limit <= 0:
            return 0.0
        q = self._seen.pop(consumer, None) or collections.deque()
        self._seen[consumer] = q
        while len(self._seen) > self.max_tracked:
            self._seen.popitem(last=False)
        while q and q[0] <= now - 60:
            q.popleft()
        if len(q) >= limit:
            return max(0.001, q[0] + 60 - now)
        q.append(now)
        return 0.0


class Admission:
    """The provider's admission rules and the seats held now."""

    def __init__(self) -> None:
        self.rate = RateLimiter()
        self.active: collections.Counter[str] = collections.Counter()  # sessions per model
        self.active_tiers: collections.Counter[tuple[str, str]] = collections.Counter()  # (model, tier)
        self.active_by_client: collections.Counter[tuple[str, str]] = collections.Counter()  # (consumer, model)
        self._unpaid: collections.OrderedDict[str, float] = collections.OrderedDict()  # consumer -> refused until

    def record_unpaid(self, consumer: str, now: float, hold_s: float = UNPAID_HOLD_S) -> None:
        """``consumer`` left a receipt of ours unsigned (or walked away from an answer it got):
        refuse its sessions for ``hold_s`` seconds (``now`` on the rate limiter's clock)."""
        self._unpaid.pop(consumer, None)
        self._unpaid[consumer] = now + hold_s
        while len(self._unpaid) > _MAX_TRACKED:
            self._unpaid.popitem(last=False)

    def forgive_unpaid(self, consumer: str) -> None:
        """``consumer`` delivered the counter-signature it owed after all (``/inferswarm/receipt``):
        its sessions are no longer refused for it."""
        self._unpaid.pop(consumer, None)

    def unpaid_until(self, consumer: str, now: float) -> float | None:
        until = self._unpaid.get(consumer)
        if until is not None and until <= now:
            del self._unpaid[consumer]
            return None
        return until

    def utilization(self, model: str, max_concurrent: int) -> float:
        """Share of ``model``'s sessions in use (dynamic pricing reads it)."""
        return self.active[model] / max_concurrent if max_concurrent else 0.0

    def check_open(self, msg: Open, offer: Offer | None, listed: ModelOffer | None, terms: protocol.Price | None, *,
                   available: bool, accepted_agents: AbstractSet[str], contracts: tuple[Contract, ...],
                   when: dt.datetime, now: float) -> Refusal | None:
        """The first reason to refuse ``msg`` before asking the escrow agent, or None.

        Args:
            listed: the offer as listed now (dynamic price, measured concurrency).
            terms: the price this session would pin (``protocol.session_terms``).
            when: wall-clock time, for contracts; now: seconds, for the rate limit.
        """
        if offer is None or listed is None or terms is None:
            return Refusal("unknown_model", f"this provider does not serve {msg.model!r}")
        if not available:
            return Refusal("unavailable", "outside this provider's availability schedule")
        if msg.price != terms:
            return Refusal("price_changed", f"now {terms.input_per_1k}/{terms.output_per_1k} µc per 1K tokens "
                                            f"(in/out), min charge {terms.min_charge}")
        if msg.channel.agent not in accepted_agents:
            return Refusal("escrow_not_accepted", f"escrow agent {msg.channel.agent} is not one this provider accepts")
        until = self.unpaid_until(msg.consumer, now)
        if until is not None:
            return Refusal("rate_limited", "a receipt of an earlier session was never counter-signed",
                           int(until - now) + 1)
        least = protocol.call_cost(terms, 1, 1)
        if min(msg.spend_limit, msg.channel.cap) < least:
            return Refusal("over_budget", f"a session must be able to pay for one call ({least} µc at these prices)")
        reserved = reserved_slots(contracts, offer.model, when, except_peer=msg.consumer)
        held_by_others = sum(1 for (peer, model), n in self.active_by_client.items()
                             if n and model == offer.model and peer != msg.consumer
                             and active_contract(contracts, peer, model, when) is not None)
        usable = listed.max_concurrent - max(0, reserved - held_by_others)
        if self.active[offer.model] >= usable:
            return Refusal("capacity", f"{listed.max_concurrent} sessions of {offer.model}, "
                                       f"{reserved} reserved by contract, all taken")
        tier = next((t for t in listed.tiers if t.name == msg.tier), None)
        if tier is not None and self.active_tiers[(offer.model, msg.tier)] >= tier.max_concurrent:
            return Refusal("capacity", f"{tier.max_concurrent} {msg.tier} sessions of {offer.model} already running")
        wait = self.rate.allow(msg.consumer, offer.rate_limit, now)
        if wait:
            return Refusal("rate_limited", f"over {offer.rate_limit} requests/min", int(wait) + 1)
        return None

    @staticmethod
    def check_channel(msg: Open, answer: protocol.EscrowResponse, now: int) -> Refusal | None:
        """The first reason the channel, as its agent reports it, cannot back this session, or None."""
        if not answer.ok:
            return Refusal("escrow_invalid", f"the agent says {answer.error}: {answer.detail}")
        if not answer.channels:
            return Refusal("escrow_invalid", "the agent reported no channel")
        ch: ChannelState = answer.channels[0]
        spend_cap = min(msg.spend_limit, msg.channel.cap)
        if ch.channel.channel_id != msg.channel.channel_id:
            return Refusal("escrow_invalid", "the agent answered about another channel")
        if ch.status != "open":
            return Refusal("escrow_invalid", f"the channel is {ch.status}")
        if ch.channel.expires_at <= now:
            return Refusal("escrow_invalid", "the channel has expired")
        if ch.channel.expires_at - now < MIN_CHANNEL_LIFE_S:
            return Refusal("escrow_invalid", f"the channel expires in {ch.channel.expires_at - now}s; this provider "
                                             f"needs at least {MIN_CHANNEL_LIFE_S}s to serve and claim")
        if ch.channel.cap - ch.claimed < spend_cap:
            return Refusal("escrow_invalid",
                           f"the channel holds {ch.channel.cap - ch.claimed} µc, less than the spend cap {spend_cap}")
        return None

    @contextmanager
    def seat(self, consumer: str, model: str, tier: str) -> Iterator[None]:
        """Hold one session seat of ``model`` (and of ``tier``) for ``consumer`` for the block."""
        self.active[model] += 1
        self.active_tiers[(model, tier)] += 1
        self.active_by_client[(consumer, model)] += 1
        try:
            yield
        finally:
            for counter, key in ((self.active, model), (self.active_tiers, (model, tier)),
                                 (self.active_by_client, (consumer, model))):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    def check_call(self, consumer: str, offer: Offer, request: protocol.Request | protocol.RequestV2 |
                   protocol.EmbedRequest, now: float) -> Refusal | None:
        """The first reason to refuse one call of a running session, or None (the call is counted).
        An embeddings call counts against the rate limit like any other; it asks for no tokens."""
        if self.rate.allow(consumer, offer.rate_limit, now):
            return Refusal("rate_limited", f"over {offer.rate_limit} requests/min")
        if isinstance(request, protocol.EmbedRequest):
            return None
        if request.max_tokens > offer.max_context:
            return Refusal("max_tokens_too_large", f"max_tokens {request.max_tokens} is over {offer.max_context}")
        return None
