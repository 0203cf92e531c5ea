"""One price, four users: for random offers, tiers, batches and contracts, the terms routing ranks
a provider on, the budget of a one-call run, the price the consumer opens with and the price the
provider computes from its listing are the same Price — and the provider's machine accepts the
Open at it. The consumer side runs the real ``Renter`` (ranking, ``run``, ``session``) over a fake
market and escrow; only the stream is cut: the open is captured and replayed into the machines."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import random
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import protocol
from node._contracts import Contract, active_contract
from node.consumer import _renter
from node.consumer._renter import Renter, RentError, estimate_prompt_tokens
from node.consumer._routing import Preferences
from node.consumer._session_client import SessionRejected
from node.consumer._trust import ProviderStats
from protocol._messages import TIERS
from tests.protocol.test_session_terms import offers, prices
from tests.support import AGENT, CONSUMER, identity

PROVIDERS = [identity(f"agree-{i}") for i in range(3)]
NOW = 1_900_000_000
WHEN = dt.datetime.fromtimestamp(NOW, dt.timezone.utc)
MESSAGES = [{"role": "user", "content": "how much?"}]


class _Market:
    """What the Renter reads of a market: rows of one model, this node's identity."""

    def __init__(self, rows: list[tuple[protocol.Listing, protocol.ModelOffer]]) -> None:
        self.identity, self.host = CONSUMER, None
        self.view = SimpleNamespace(rows=lambda now, model: [SimpleNamespace(listing=lst, offer=o)
                                                             for lst, o in rows if o.name == model])

    def now(self) -> int:
        return NOW

    async def lookup(self, model: str) -> None:
        pass


class _Escrow:
    """Grants any channel, remembering its budget."""

    def __init__(self) -> None:
        self.budgets: dict[str, int] = {}

    async def open_grant(self, agent: str, provider: str, budget: int, ttl_s: int) -> protocol.ChannelGrant:
        self.budgets[provider] = budget
        grant = protocol.ChannelGrant(agent=agent, channel_id=provider.encode()[-16:], consumer=CONSUMER.peer_id,
                                      provider=provider, cap=budget, expires_at=NOW + ttl_s)
        return protocol.sign(grant, "sig", AGENT)


class _Trust:
    def get(self, peer: str) -> ProviderStats:
        return ProviderStats(peer)

    def refused(self, *a: Any) -> None:
        pass

    failed = violated = refused


def _renter_opening_nothing(rows, contracts):
    """A Renter over a fake market whose every session open is captured, then refused."""
    opens: dict[str, dict[str, Any]] = {}

    @asynccontextmanager
    async def capture(host, identity, **kw):
        opens[kw["provider"]] = kw
        raise SessionRejected("capacity", "captured for the test")
        yield  # pragma: no cover

    renter = Renter(_Market(rows), _Escrow(), None, None, _Trust(), clock=lambda: NOW, rng=random.Random(0),
                    contracts=contracts)
    async def reachable(*a: Any, **kw: Any) -> None:
        pass

    @contextlib.contextmanager
    def patched() -> Any:  # applied only while the test's block runs
        with mock.patch.object(_renter, "open_session", capture), mock.patch.object(_renter, "reach", reachable):
            yield

    return renter, opens, patched()


def _provider_accepts(provider, opened: dict[str, Any], terms: protocol.Price, max_context: int) -> None:
    """Replay the consumer's open into the two machines: the provider accepts it at ``terms``."""
    consumer = protocol.ConsumerSession(CONSUMER, session_id=b"s" * 16, provider=provider.peer_id,
                                        model=opened["model"], listing_seq=opened["listing_seq"],
                                        price=opened["price"], channel=opened["channel"],
                                        spend_limit=opened["spend_limit"], max_context=opened["max_context"],
                                        tier=opened["tier"],
                                        batch_calls=opened["batch_calls"])
    machine = protocol.ProviderSession(provider)
    consumer.open(NOW)
    (open_msg,) = consumer.outgoing()
    (ev,) = machine.receive(protocol.decode(protocol.encode(open_msg)), NOW)
    assert isinstance(ev, protocol.OpenReceived)
    accept = machine.accept_open(terms, max_context, NOW)  # IllegalTransition if the prices differ
    assert accept.price == terms
    (ev,) = consumer.receive(protocol.decode(protocol.encode(accept)), NOW)
    assert isinstance(ev, protocol.Accepted)


# per provider: its offer, a context that may cut the prompt short, and maybe a contract (in force or over)
deals = st.lists(st.tuples(offers, st.integers(1, 80), st.none() | st.tuples(prices, st.booleans())),
                 min_size=1, max_size=3)


@given(deals, st.sampled_from(("",) + TIERS), st.integers(0, 30), st.integers(0, 4000))
def test_routing_budget_open_and_provider_agree_on_the_price(deals, tier, batch_calls, max_tokens):
    rows, client_side, provider_side = [], [], {}
    for provider, (offer, max_context, contract) in zip(PROVIDERS, deals):
        offer = dataclasses.replace(offer, max_context=max_context)
        listing = protocol.Listing(provider=provider.peer_id, addrs=(), seq=7, issued_at=NOW, expires_at=NOW + 60,
                                   provider_type="self_hosted", models=(offer,), escrow_agents=(AGENT.peer_id,),
                                   hardware=protocol.Hardware())
        rows.append((listing, offer))
        provider_side[provider.peer_id] = (provider, offer, ())
        if contract is not None:  # written on both sides; sometimes already over
            price, in_force = contract
            until = WHEN + dt.timedelta(days=1 if in_force else -1)
            client_side.append(Contract(provider.peer_id, "m", price, until))
            provider_side[provider.peer_id] = (provider, offer, (Contract(CONSUMER.peer_id, "m", price, until),))

    def provider_terms(peer: str, calls: int) -> protocol.Price:
        """As the provider's session service computes it from its listing and its contracts."""
        _, listed, contracts = provider_side[peer]
        contract = active_contract(contracts, CONSUMER.peer_id, listed.name, WHEN)
        return protocol.session_terms(listed, tier=tier, batch_calls=calls,
                                      contract_price=contract.price if contract is not None else None)

    offering = {lst.provider for lst, o in rows if not tier or any(t.name == tier for t in o.tiers)}
    prompt = estimate_prompt_tokens(MESSAGES)

    async def scenario() -> None:
        # routing, for a session: the terms and the cost it ranks on
        renter, opens, patched = _renter_opening_nothing(rows, tuple(client_side))
        if not offering:
            with pytest.raises(RentError, match=tier):
                await renter.candidates("m", Preferences(), prompt_tokens=prompt, max_tokens=max_tokens, tier=tier)
            return
        ranked = await renter.candidates("m", Preferences(), prompt_tokens=prompt, max_tokens=max_tokens, tier=tier,
                                         batch_calls=batch_calls)
        assert {c.provider for c in ranked} == offering  # those without the tier are left out
        for c in ranked:
            assert c.terms == provider_terms(c.provider, batch_calls)
            assert c.expected_cost == protocol.expected_call_cost(c.terms, prompt, max_tokens, c.offer.max_context)
        costs = [c.expected_cost for c in ranked]
        assert costs == sorted(costs)  # cheapest first, at the terms each would pin

        with patched:
            # a one-call run (no batch): its channel's budget and its open
            with pytest.raises(RentError):
                await renter.run("m", MESSAGES, max_tokens=max_tokens, temperature_milli=0, tier=tier)
            assert set(opens) == offering
            for peer, opened in opens.items():
                terms = provider_terms(peer, 0)
                assert opened["price"] == terms and (opened["tier"], opened["batch_calls"]) == (tier, 0)
                _, listed, _ = provider_side[peer]
                assert renter.escrow.budgets[peer] == max(1, protocol.expected_call_cost(
                    terms, prompt, max_tokens, listed.max_context))
                _provider_accepts(provider_side[peer][0], opened, terms, listed.max_context)

            # a session declaring ``batch_calls``: its open
            opens.clear()
            with pytest.raises(RentError):
                async with renter.session("m", budget=1_000_000, tier=tier, batch_calls=batch_calls):
                    pass  # pragma: no cover
            assert set(opens) == offering
            for peer, opened in opens.items():
                terms = provider_terms(peer, batch_calls)
                assert opened["price"] == terms and (opened["tier"], opened["batch_calls"]) == (tier, batch_calls)
                _provider_accepts(provider_side[peer][0], opened, terms, provider_side[peer][1].max_context)

    trio.run(scenario)
