"""Issue #12, finding 6 (bursts): a consumer bounds its own sessions per provider at what the
provider lists it serves at once and queues the rest (bounded, with a deadline); past the bound a
call fails at once with a named ``capacity`` error (HTTP 429, Retry-After), before anything is
dialled or any channel opened; and after the burst nothing of the consumer's stays locked."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from starlette.testclient import TestClient

import protocol
from node._receipts import ReceiptStore
from node.api import build_app
from node.consumer import AtCapacity, Busy, Pacing, Preferences, Renter, TrustBook
from node.consumer._failures import ProviderFailed
from node.consumer._renter import RentError, _named, estimate_prompt_tokens
from node.consumer._routing import rank
from node.consumer._trust import START
from node.net._host import open_host, peer_addrs
from node.net._streams import FramedStream
from node.provider._offers import Offer
from protocol import SESSION_PROTOCOL
from tests.node.helpers import LOOPBACK, wait_until
from tests.node.session_rig import Rig, ScriptedBackend, session_rig
from tests.support import identity

PRICE = protocol.Price(input_per_1k=500_000, output_per_1k=1_500_000)
USER = [{"role": "user", "content": "hi"}]
MINTED = 10_000_000
SLOTS = 2


def candidate(max_concurrent: int = SLOTS, peer: str | None = None) -> Any:
    peer = peer or identity("burst-provider").peer_id
    listing = protocol.Listing(provider=peer, addrs=(), seq=1, issued_at=1, expires_at=2, provider_type="self_hosted",
                               models=(), escrow_agents=(peer,), hardware=protocol.Hardware())
    offer = protocol.ModelOffer(name="m", price=PRICE, max_context=4096, max_concurrent=max_concurrent)
    return rank([(listing, offer)], Preferences(), prompt_tokens=1, max_tokens=1,
                stats=lambda p: SimpleNamespace(score=START, measured=False, violator=False, probe_due=False),
                agent_for=lambda lst: peer)[0]


async def test_pacing_runs_what_the_provider_serves_and_queues_the_rest_fifo(autojump_clock):
    pacing = Pacing(queue_per_slot=2, wait_s=10)
    c = candidate()
    arrived: list[int] = []
    order: list[int] = []
    release = trio.Event()
    refused: list[Busy] = []

    async def call(i: int) -> None:
        arrived.append(i)  # trio starts tasks in no fixed order
        try:
            async with pacing.slot(c):
                order.append(i)
                await release.wait()
        except Busy as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(call, i)
        await trio.sleep(1)
        assert order == arrived[:2] and pacing.running(c.provider) == SLOTS  # what it serves at once
        assert pacing.waiting(c.provider) == 4 and len(refused) == 2  # 2 per slot wait; the rest told at once
        assert all("capacity" in str(e) and e.retry_after_s > 0 for e in refused)
        release.set()
    assert sorted(order) == sorted(arrived[:6])  # first come, first served: the last two were told at once
    assert pacing.running(c.provider) == 0 and not pacing._gates  # nothing left behind


async def test_a_wait_past_the_deadline_is_a_capacity_refusal_and_frees_its_place(autojump_clock):
    pacing = Pacing(wait_s=5)
    c = candidate(max_concurrent=1)
    async with pacing.slot(c):
        with pytest.raises(Busy, match="came free within 5s"):
            async with pacing.slot(c):
                pass
        assert pacing.waiting(c.provider) == 0
        with trio.move_on_after(1):  # a waiter cancelled (its client went away) leaves no trace either
            async with pacing.slot(c):
                pass
        assert pacing.waiting(c.provider) == 0
    assert not pacing._gates


async def test_a_listing_cannot_make_us_run_more_than_our_own_bound():
    assert Pacing(max_per_provider=8).limit_of(candidate(max_concurrent=65_535)) == 8
    assert Pacing().limit_of(candidate(max_concurrent=0)) == 1


def test_a_failure_always_names_its_cause():
    try:
        try:
            raise OSError()
        except OSError as exc:
            raise ProviderFailed("cannot reach provider X: ") from exc
    except ProviderFailed as failed:
        assert _named(failed) == "cannot reach provider X: OSError"
    assert _named(ProviderFailed("")) == "ProviderFailed"
    assert _named(ProviderFailed("the provider sent nothing for 5s")) == "the provider sent nothing for 5s"


def test_at_capacity_is_a_429_with_retry_after_on_both_faces():
    async def run(*args: Any, **kwargs: Any) -> Any:
        raise AtCapacity("every provider of 'm' is at capacity: capacity: 2 sessions run", retry_after_s=7)

    service = SimpleNamespace(escrow=None, renter=SimpleNamespace(run=run))
    client = TestClient(build_app(service, "tok"), backend="trio", base_url="http://127.0.0.1")
    auth = {"Authorization": "Bearer tok"}
    for path in ("/api/v1/run", "/v1/chat/completions"):
        r = client.post(path, json={"model": "m", "messages": USER}, headers=auth)
        assert r.status_code == 429 and r.headers["retry-after"] == "7", r.text
        assert r.json()["error"]["code"] == "capacity" and "at capacity" in r.json()["error"]["message"]


# ---- a burst through a real agent and provider ---------------------------------------------------


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


def _listing(rig: Rig) -> protocol.Listing:
    now = int(time.time())
    lst = protocol.Listing(provider=rig.provider_id, addrs=tuple(peer_addrs(rig.provider_host)), seq=1, issued_at=now,
                           expires_at=now + 300, provider_type="self_hosted",
                           models=(protocol.ModelOffer(name="m", price=PRICE, max_context=2048,
                                                       max_concurrent=SLOTS),),
                           escrow_agents=(rig.agent.identity.peer_id,), hardware=protocol.Hardware())
    return protocol.sign(lst, "sig", rig.provider_service.identity)


async def test_a_burst_of_200_calls_is_served_or_refused_for_capacity_and_locks_nothing():
    offer = Offer(model="m", backend="builtin", input_price=PRICE.input_per_1k, output_price=PRICE.output_per_1k,
                  max_context=2048, max_concurrent=SLOTS)
    async with session_rig({"m": offer}, {"m": ScriptedBackend()}, tag="burst", mint=MINTED) as rig:
        me = rig.consumer_ops.identity.peer_id
        with tempfile.TemporaryDirectory() as tmp:
            trust = TrustBook(Path(tmp) / "trust.db")
            renter = Renter(_Market(rig, [_listing(rig)]), rig.consumer_ops, None,
                            ReceiptStore(Path(tmp) / "receipts.db"), trust, clock=rig.clock, rng=random.Random(0),
                            pacing=Pacing(queue_per_slot=10, wait_s=60))
            opened = 0
            open_grant = rig.consumer_ops.open_grant

            async def counted_open(*args: Any, **kwargs: Any) -> protocol.ChannelGrant:
                nonlocal opened
                opened += 1
                return await open_grant(*args, **kwargs)

            renter.escrow = SimpleNamespace(open_grant=counted_open, agent_id=rig.consumer_ops.agent_id)
            served: list[Any] = []
            refused: list[AtCapacity] = []
            most = 0

            async def one() -> None:
                nonlocal most
                try:
                    served.append(await renter.run("m", USER, max_tokens=8, temperature_milli=0))
                except AtCapacity as exc:
                    refused.append(exc)
                most = max(most, renter.pacing.running(rig.provider_id))

            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(one)
            assert len(served) + len(refused) == 200, (len(served), len(refused))
            assert len(served) >= SLOTS * 11 and refused  # the slots and their queue; the rest told at once
            assert most <= SLOTS
            assert all(len(done.attempts) == 1 for done in served)  # the provider never had to refuse one
            for exc in refused:  # named: capacity, ours, nothing dialled or locked for it
                assert [a.fault for a in exc.attempts] == ["capacity"]
                assert exc.attempts[0].error.startswith("capacity: ") and exc.retry_after_s >= 1
            assert opened == len(served)  # a channel only for an attempt that ran
            # every run's channel was settled at its end: nothing is locked, every µc accounted for
            paid = sum(done.receipt.cumulative for done in served)
            await wait_until(lambda: rig.balance(me).locked == 0, what="every channel settled")
            assert rig.balance(me) == protocol.Balance(available=MINTED - paid, locked=0)
            assert rig.balance(rig.provider_id).available == paid
            assert trust.get(rig.provider_id).score == START + len(served)  # our burst cost it nothing
            trust.close()
            renter.receipts.close()
        rig.agent.check()


async def test_a_provider_that_drops_every_open_locks_one_channel_not_one_per_attempt():
    """No Accept and nothing offered back: the channel is unused, and the next attempt to that
    provider takes it instead of locking another until it expires."""
    offer = Offer(model="m", backend="builtin", input_price=PRICE.input_per_1k, output_price=PRICE.output_per_1k,
                  max_context=2048, max_concurrent=SLOTS)
    async with session_rig({"m": offer}, {"m": ScriptedBackend()}, tag="burst-drop", mint=MINTED) as rig:
        dropper = identity("burst-dropper")
        async with open_host(dropper, LOOPBACK) as host:
            opens: list[bytes] = []

            async def drop(stream: Any) -> None:  # reads the Open, then hangs up
                framed = FramedStream(stream, read_timeout_s=10)
                try:
                    opens.append((await framed.receive()).channel.channel_id)
                finally:
                    await framed.close()

            host.set_stream_handler(SESSION_PROTOCOL, drop)
            now = int(time.time())
            listing = protocol.sign(protocol.Listing(
                provider=dropper.peer_id, addrs=tuple(peer_addrs(host)), seq=1, issued_at=now, expires_at=now + 300,
                provider_type="self_hosted", models=(protocol.ModelOffer(name="m", price=PRICE, max_context=2048),),
                escrow_agents=(rig.agent.identity.peer_id,), hardware=protocol.Hardware()), "sig", dropper)
            with tempfile.TemporaryDirectory() as tmp:
                trust = TrustBook(Path(tmp) / "trust.db")
                renter = Renter(_Market(rig, [listing]), rig.consumer_ops, None,
                                ReceiptStore(Path(tmp) / "receipts.db"), trust, clock=rig.clock,
                                rng=random.Random(0))
                for _ in range(5):
                    with pytest.raises(RentError, match="closed the session") as failed:
                        await renter.run("m", USER, max_tokens=8, temperature_milli=0)
                    assert [a.fault for a in failed.value.attempts] == ["provider"]
                assert len(opens) == 5 and len(set(opens)) == 1  # one channel, offered five times
                me = rig.consumer_ops.identity.peer_id
                cap = protocol.expected_call_cost(PRICE, estimate_prompt_tokens(USER), 8, 2048)
                assert rig.balance(me) == protocol.Balance(available=MINTED - cap, locked=cap)
                trust.close()
                renter.receipts.close()
        rig.agent.check()
