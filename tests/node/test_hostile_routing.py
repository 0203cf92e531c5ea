"""Issue #11, finding 11 (routing that resists Sybils): listings are free to make, so a consumer
locks money only for a provider it has reached, a refusal is paid for in trust, and a refused
attempt's channel is released at once when the provider co-signs. A real ``Renter`` rents
through a real agent and provider; the Sybils are listings (and, for one, a host) of our making."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import protocol
from node._receipts import ReceiptStore
from node.consumer import Preferences, Renter, TrustBook
from node.consumer._renter import RentError, estimate_prompt_tokens
from node.consumer._trust import START
from node.net._host import open_host, peer_addrs
from node.net._streams import FramedStream
from node.provider._offers import Offer
from protocol import SESSION_PROTOCOL
from tests.node.helpers import LOOPBACK
from tests.node.session_rig import Rig, ScriptedBackend, session_rig
from tests.support import identity

PRICE = protocol.Price(input_per_1k=500_000, output_per_1k=1_500_000)
CHEAP = protocol.Price(input_per_1k=1, output_per_1k=1)
MINTED = 10_000_000
USER = [{"role": "user", "content": "hi"}]


def listing(who: Any, addrs: tuple[str, ...], price: protocol.Price, agent: str) -> protocol.Listing:
    now = int(time.time())
    lst = protocol.Listing(provider=who.peer_id, addrs=addrs, seq=1, issued_at=now, expires_at=now + 300,
                           provider_type="self_hosted",
                           models=(protocol.ModelOffer(name="m", price=price, max_context=2048, max_concurrent=4),),
                           escrow_agents=(agent,), hardware=protocol.Hardware())
    return protocol.sign(lst, "sig", who)


class _Market:
    """What the Renter reads of a market: these listings, this node's host and identity."""

    def __init__(self, rig: Rig, listings: list[protocol.Listing]) -> None:
        self.host, self.identity = rig.consumer_host, rig.consumer_ops.identity
        self.view = SimpleNamespace(rows=lambda now, model: [SimpleNamespace(listing=lst, offer=o)
                                                             for lst in listings for o in lst.models])

    def now(self) -> int:
        return int(time.time())

    async def lookup(self, model: str) -> None:
        pass


def renter_for(rig: Rig, listings: list[protocol.Listing], tmp: Path) -> Renter:
    trust = TrustBook(tmp / "trust.db")
    return Renter(_Market(rig, listings), rig.consumer_ops, None, ReceiptStore(tmp / "receipts.db"), trust,
                  clock=rig.clock, rng=random.Random(0))


def offer() -> Offer:
    return Offer(model="m", backend="builtin", input_price=PRICE.input_per_1k, output_price=PRICE.output_per_1k,
                 max_context=2048, max_concurrent=4)


async def test_an_unreachable_sybil_gets_no_channel_and_the_honest_provider_serves():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sybil-dial") as rig:
        agent = rig.agent.identity.peer_id
        sybils = [listing(identity(f"sybil-{i}"), ("/ip4/127.0.0.1/tcp/1",), CHEAP, agent) for i in range(2)]
        honest = listing(rig.provider_service.identity, tuple(peer_addrs(rig.provider_host)), PRICE, agent)
        with tempfile.TemporaryDirectory() as tmp:
            renter = renter_for(rig, sybils + [honest], Path(tmp))
            done = await renter.run("m", USER, max_tokens=8, temperature_milli=0,
                                    prefs=Preferences(sort="cheapest"))
            assert done.provider == rig.provider_id
            assert [a.provider for a in done.attempts[:2]] == [s.provider for s in sybils]
            assert all(renter.trust.get(s.provider).score < START for s in sybils)
            # no money was ever locked for the Sybils: only the honest call was paid, the rest is back
            cost = done.receipt.cumulative
            assert rig.balance(rig.consumer_ops.identity.peer_id) == protocol.Balance(available=MINTED - cost,
                                                                                     locked=0)
            renter.trust.close()
            renter.receipts.close()
        rig.agent.check()


async def test_a_refusing_sybil_loses_trust_and_an_honest_refusal_locks_nothing():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sybil-price") as rig:
        agent = rig.agent.identity.peer_id
        sybil_id = identity("sybil-price")
        async with open_host(sybil_id, LOOPBACK) as sybil_host:
            async def price_changed(stream: Any) -> None:  # answers every Open with price_changed
                framed = FramedStream(stream, read_timeout_s=10)
                try:
                    first = await framed.receive()
                    await framed.send(protocol.Reject(session_id=first.session_id, reason="price_changed"))
                finally:
                    await framed.close()

            sybil_host.set_stream_handler(SESSION_PROTOCOL, price_changed)
            sybil = listing(sybil_id, tuple(peer_addrs(sybil_host)), CHEAP, agent)
            # the honest provider is full: it refuses with capacity, then co-signs the channel's release
            rig.provider_service.storefront.available = lambda: False
            honest = listing(rig.provider_service.identity, tuple(peer_addrs(rig.provider_host)), PRICE, agent)
            with tempfile.TemporaryDirectory() as tmp:
                renter = renter_for(rig, [sybil, honest], Path(tmp))
                for _ in range(3):
                    with pytest.raises(RentError, match="every provider"):
                        await renter.run("m", USER, max_tokens=8, temperature_milli=0,
                                         prefs=Preferences(sort="cheapest"))
                assert renter.trust.get(sybil_id.peer_id).score == START - 3 * 2  # each refusal costs it trust
                me = rig.consumer_ops.identity.peer_id
                # the honest provider's refusals released their channels at once; the Sybil's stay
                # locked until they expire (ten minutes), and nothing was paid to anyone
                locked = rig.balance(me).locked
                assert rig.balance(rig.provider_id).available == 0
                assert rig.balance(me).available + locked == MINTED
                per_attempt = protocol.expected_call_cost(CHEAP, estimate_prompt_tokens(USER), 8, 2048)
                assert locked == 3 * per_attempt
                renter.trust.close()
                renter.receipts.close()
        rig.agent.check()
