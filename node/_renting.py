"""Renting from the market on this node's behalf: pick a listing, open an escrow channel with an
agent the provider accepts, run a session, settle. (Routing strategies, failover and trust come
with the routing work; today: an explicit provider, else the cheapest for this request.)"""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import protocol
from protocol import Listing, ModelOffer
from wallet import EscrowAgent

from ._escrow_ops import EscrowOps
from ._market import Market
from ._receipts import ReceiptStore
from ._session_client import CallResult, ConsumerSessionHandle, open_session

__all__ = ["RentError", "Renter", "estimate_prompt_tokens", "completion_json"]

_HOUR = 3600


class RentError(Exception):
    """No provider could be rented for this request (the message says why)."""


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """An upper bound on a prompt's tokens for budgeting (byte-level tokenizers never need more)."""
    return 16 + sum(8 + len(m["content"].encode()) + len(m["role"]) for m in messages)


class Renter:
    def __init__(self, market: Market, escrow: EscrowOps, local_agent: EscrowAgent | None,
                 receipts: ReceiptStore, clock: Callable[[], float] = time.time) -> None:
        self.market = market
        self.escrow = escrow
        self.local_agent = local_agent
        self.receipts = receipts
        self.clock = clock

    async def candidates(self, model: str) -> list[tuple[Listing, ModelOffer]]:
        rows = self.market.view.rows(self.market.now(), model)
        if not rows:
            await self.market.lookup(model)
            rows = self.market.view.rows(self.market.now(), model)
        me = self.market.identity.peer_id
        return [(r.listing, r.offer) for r in rows if r.listing.provider != me]

    def _agent_for(self, listing: Listing, escrow: str | None) -> str:
        if escrow is not None:
            agent = self.escrow.agent_id(escrow)
            if agent not in listing.escrow_agents:
                raise RentError(f"provider {listing.provider} does not accept escrow agent {agent}")
            return agent
        if self.local_agent is not None and self.local_agent.identity.peer_id in listing.escrow_agents:
            return self.local_agent.identity.peer_id
        if not listing.escrow_agents:
            raise RentError(f"provider {listing.provider} names no escrow agent it accepts")
        return listing.escrow_agents[0]

    async def choose(self, model: str, prompt_tokens: int, max_tokens: int,
                     provider: str | None = None) -> tuple[Listing, ModelOffer]:
        """The listing to rent from: ``provider`` if given, else the cheapest for this request.

        Raises:
            RentError: nobody offers the model (or not that provider).
        """
        candidates = await self.candidates(model)
        if provider is not None:
            candidates = [c for c in candidates if c[0].provider == provider]
        if not candidates:
            raise RentError(f"no provider offers {model!r}" + (f" as {provider}" if provider else ""))
        return min(candidates, key=lambda c: (protocol.call_cost(c[1].price, prompt_tokens, max_tokens), c[0].provider))

    @asynccontextmanager
    async def session(self, model: str, *, budget: int, provider: str | None = None, escrow: str | None = None,
                      prompt_tokens: int = 0, max_tokens: int = 0, ttl_s: int = _HOUR
                      ) -> AsyncIterator[tuple[ConsumerSessionHandle, Listing, protocol.ChannelGrant]]:
        """A session with one escrow channel of ``budget`` µc; settled when the block ends."""
        listing, offer = await self.choose(model, prompt_tokens, max_tokens, provider)
        agent = self._agent_for(listing, escrow)
        channel = await self.escrow.open_grant(agent, listing.provider, max(1, budget), ttl_s)
        async with open_session(self.market.host, self.market.identity, provider=listing.provider,
                                addrs=listing.addrs, model=model, price=offer.price, listing_seq=listing.seq,
                                channel=channel, spend_limit=channel.cap, receipts=self.receipts,
                                clock=self.clock) as handle:
            yield handle, listing, channel

    async def run(self, model: str, messages: list[dict[str, str]], *, max_tokens: int, temperature_milli: int,
                  provider: str | None = None, budget: int | None = None, escrow: str | None = None,
                  on_text: Callable[[str], Awaitable[None]] | None = None) -> dict[str, Any]:
        """One paid call, start to settlement. Returns the CLI contract's JSON for ``node run``.

        Raises:
            RentError: nobody to rent from. SessionError: the session or call failed (not paid).
            EscrowRefused / EscrowUnreachable: the channel could not be opened.
        """
        started = time.monotonic()
        prompt = estimate_prompt_tokens(messages)
        if budget is None:
            _, offer = await self.choose(model, prompt, max_tokens, provider)
            budget = protocol.call_cost(offer.price, min(prompt, offer.max_context), max_tokens)
        async with self.session(model, budget=budget, provider=provider, escrow=escrow, prompt_tokens=prompt,
                                max_tokens=max_tokens) as (session, listing, channel):
            result = await session.call(messages, max_tokens, temperature_milli=temperature_milli, on_text=on_text)
            agent = channel.agent
        return completion_json(result, listing.provider, model, started) | {
            "escrow": {"agent": agent, "channel_id": channel.channel_id.hex(), "cap": channel.cap}}


def completion_json(result: CallResult, provider: str, model: str, started: float) -> dict[str, Any]:
    """A call's result in the shape of the CLI contract (and OpenAI's chat completion)."""
    r = result.receipt
    return {
        "id": "isw-" + secrets.token_hex(12),
        "provider": provider,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason}],
        "usage": {"prompt_tokens": r.tokens_in, "completion_tokens": r.tokens_out,
                  "total_tokens": r.tokens_in + r.tokens_out},
        "cost": {"amount": r.cost, "receipt_id": protocol.receipt_hash(r).hex(), "cumulative": r.cumulative},
        "latency_ms": int((time.monotonic() - started) * 1000),
    }
