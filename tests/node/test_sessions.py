"""Sessions over real libp2p streams: metering, receipts, payment, lies, failures, limits."""

from __future__ import annotations

import dataclasses

import pytest
import trio

import protocol
from node.consumer._session_client import (
    CallRefused,
    ProviderFailed,
    ProviderMisbehaved,
    SessionRejected,
)
from node.escrow._ops import EscrowRefused
from node.provider._offers import Offer
from node.provider._session_service import ProviderService
from tests.node.session_rig import ScriptedBackend, builtin_backend, session_rig

USER = [{"role": "user", "content": "Say something."}]
PRICE_IN, PRICE_OUT = 500_000, 1_500_000  # µc per 1K tokens


def offer(model="m", **kw):
    fields = dict(model=model, backend="builtin", input_price=PRICE_IN, output_price=PRICE_OUT, max_context=2048,
                  max_concurrent=4)
    fields.update(kw)
    return Offer(**fields)


async def test_multi_call_session_with_the_builtin_model_chains_and_pays_exactly():
    async with session_rig({"m": offer()}, {"m": builtin_backend()}, tag="multi") as rig:
        channel = await rig.open_channel(cap=1_000_000)
        costs = []
        async with rig.session(channel) as session:
            for i in range(3):
                result = await session.call([{"role": "user", "content": f"Call {i}"}], 24)
                r = result.receipt
                protocol.verify(r, "provider_sig", protocol.public_key_from_peer_id(r.provider))
                protocol.verify(r, "consumer_sig", protocol.public_key_from_peer_id(r.consumer))
                assert r.output_hash == protocol.output_hash(result.text) and result.text.isascii()
                assert r.cost == protocol.call_cost(protocol.Price(input_per_1k=PRICE_IN, output_per_1k=PRICE_OUT),
                                                    r.tokens_in, r.tokens_out)
                costs.append(r.cost)
            chain = session.machine.receipts
        assert [r.call_seq for r in chain] == [0, 1, 2]
        assert chain[0].prev_hash == protocol.ZERO_HASH
        assert all(b.prev_hash == protocol.receipt_hash(a) for a, b in zip(chain, chain[1:]))
        assert chain[-1].cumulative == sum(costs)
        # the session's end settled the channel: the provider got exactly the cumulative cost
        assert rig.balance(rig.provider_id).available == sum(costs)
        assert rig.balance(rig.consumer_ops.identity.peer_id) == protocol.Balance(available=10_000_000 - sum(costs),
                                                                                 locked=0)
        rig.agent.check()
        stored = rig.consumer_receipts.list()
        assert [s["receipt_id"] for s in stored] == [protocol.receipt_hash(r).hex() for r in chain]


async def test_the_provider_refuses_call_n_plus_1_before_the_counter_signature():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="early") as rig:
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            machine, framed = session.machine, session._framed
            machine.request((protocol.ChatMessage(role="user", content="a"),), 8)
            await framed.send_all(machine.outgoing())
            while not any(isinstance(m, protocol.Receipt) for m in [await framed.receive()]):
                pass
            # a rogue consumer skips the counter-signature and asks for the next call
            await framed.send(protocol.Request(session_id=machine.session_id, call_seq=1,
                                               messages=(protocol.ChatMessage(role="user", content="b"),), max_tokens=8))
            with pytest.raises(Exception):
                with trio.fail_after(10):
                    await framed.receive()  # the provider drops the session: no chunk for call 1
        assert rig.balance(rig.provider_id).available == 0  # nothing was counter-signed, nothing paid


class LyingProvider(ProviderService):
    """Tampers with its receipts (re-signing them, so only the content lies)."""

    lie = "tokens"

    async def send(self, framed, msgs):
        out = []
        for m in msgs:
            if isinstance(m, protocol.Receipt) and m.call_seq == 1:
                change = {
                    "tokens": dict(tokens_out=m.tokens_out + 5,
                                   cost=m.cost + 10, cumulative=m.cumulative + 10),
                    "price": dict(price=dataclasses.replace(m.price, output_per_1k=m.price.output_per_1k * 2)),
                    "chain": dict(prev_hash=b"\x07" * 32),
                    "output": dict(output_hash=protocol.output_hash("something else")),
                }[self.lie]
                m = protocol.sign(dataclasses.replace(m, provider_sig=b"", **change), "provider_sig", self.identity)
            out.append(m)
        await framed.send_all(out)


@pytest.mark.parametrize("lie,code", [("tokens", "receipt_price_mismatch"), ("price", "receipt_price_mismatch"),
                                      ("chain", "receipt_chain_broken"), ("output", "receipt_hash_mismatch")])
async def test_a_lying_provider_is_caught_and_not_paid_for_the_lie(lie, code):
    cls = type(f"Lying_{lie}", (LyingProvider,), {"lie": lie})
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, provider_cls=cls, tag=f"lie-{lie}") as rig:
        channel = await rig.open_channel(cap=100_000)
        with pytest.raises(ProviderMisbehaved) as caught:
            async with rig.session(channel) as session:
                honest = await session.call(USER, 8)
                await session.call(USER, 8)
        assert caught.value.code == code
        await _wait_paid(rig, honest.receipt.cumulative)
        assert rig.balance(rig.provider_id).available == honest.receipt.cumulative  # the honest call only


async def _wait_paid(rig, amount):
    with trio.fail_after(20):
        while rig.balance(rig.provider_id).available < amount:
            await trio.sleep(0.02)


async def test_a_provider_killed_mid_stream_is_not_paid_and_the_channel_is_refundable():
    backend = ScriptedBackend(hang=True)
    async with session_rig({"m": offer()}, {"m": backend}, tag="kill") as rig:
        channel = await rig.open_channel(cap=50_000, ttl=300)  # providers want 120 s of life or more
        async def kill():
            await backend.started.wait()  # mid-stream: the first chunk is out
            await rig.provider_host.disconnect(rig.consumer_host.get_id())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill)
            with pytest.raises(ProviderFailed, match="closed the session|sent nothing"):
                async with rig.session(channel) as session:
                    await session.call(USER, 8)
        consumer = rig.consumer_ops.identity.peer_id
        assert rig.balance(rig.provider_id).available == 0
        assert rig.balance(consumer).locked == 50_000
        rig.clock.offset += 301  # past the channel's expiry: the consumer takes it all back
        try:
            state = (await rig.consumer_ops.refund(rig.agent_addr, channel.channel_id.hex())).channel.to_json()
        except EscrowRefused as exc:  # the agent's expiry sweep got there first
            assert exc.code == "channel_closed"
            state = (await rig.consumer_ops.channel(rig.agent_addr, channel.channel_id.hex())).to_json()
        assert state["status"] == "refunded" and state["claimed"] == 0
        assert rig.balance(consumer) == protocol.Balance(available=10_000_000, locked=0)


async def test_limits_are_refused_with_their_reason_and_no_charge():
    offers = {"m": offer(max_context=64, rate_limit=2, max_concurrent=1)}
    async with session_rig(offers, {"m": ScriptedBackend()}, tag="limits") as rig:
        channel = await rig.open_channel(cap=100_000)
        with pytest.raises(SessionRejected) as unknown:
            async with rig.session(channel, model="nope"):
                pass
        assert unknown.value.reason == "unknown_model"
        with pytest.raises(SessionRejected) as price:
            async with rig.session(channel, price=protocol.Price(input_per_1k=1, output_per_1k=1)):
                pass
        assert price.value.reason == "price_changed"
        async with rig.session(channel) as first:
            with pytest.raises(SessionRejected) as busy:
                async with rig.session(channel):
                    pass
            assert busy.value.reason == "capacity"
            with pytest.raises(CallRefused) as long_prompt:
                await first.call([{"role": "user", "content": "x" * 100}], 8)
            assert long_prompt.value.reason == "context_too_long"
            with pytest.raises(CallRefused) as too_many:
                await first.call(USER, 65)
            assert too_many.value.reason in ("max_tokens_too_large", "rate_limited")
            with pytest.raises(CallRefused) as limited:
                for _ in range(3):
                    await first.call(USER, 8)
            assert limited.value.reason == "rate_limited"
        paid = rig.balance(rig.provider_id).available
        assert paid == sum(r.cost for r in first.machine.receipts)  # refused calls cost nothing
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, accept=False, tag="noescrow") as rig:
        channel = await rig.open_channel(cap=1_000)
        with pytest.raises(SessionRejected) as escrow:
            async with rig.session(channel):
                pass
        assert escrow.value.reason == "escrow_not_accepted"
        assert rig.balance(rig.consumer_ops.identity.peer_id).available == 10_000_000 - 1_000


async def test_the_provider_claims_during_a_long_session_not_only_at_close():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="eager",
                           claim_interval_s=0.0) as rig:
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            first = await session.call(USER, 8)
            await _wait_paid(rig, first.receipt.cumulative)  # paid while the session is still open
            second = await session.call(USER, 8)
            await _wait_paid(rig, second.receipt.cumulative)
            assert session.machine.state.name == "READY"
        assert rig.balance(rig.provider_id).available == second.receipt.cumulative


async def test_outside_the_schedule_new_sessions_are_refused_and_running_ones_finish():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sched") as rig:
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as running:
            rig.provider_service.storefront.available = lambda: False  # the schedule closes while a session runs
            await running.call(USER, 8)  # it finishes its work
            with pytest.raises(SessionRejected) as refused:
                async with rig.session(await rig.open_channel(cap=1_000)):
                    pass
            assert refused.value.reason == "unavailable"


async def test_a_waiting_call_hears_its_queue_position_and_a_full_queue_says_capacity():
    backend = ScriptedBackend(pieces=[("slow", 1)], hang=True)
    the_offer = offer(max_concurrent=8)

    async with session_rig({"m": the_offer}, {"m": backend}, tag="queue", max_waiting=1) as rig:
        positions: list[int] = []
        told = trio.Event()

        async def record(position):
            positions.append(position)
            told.set()

        async with trio.open_nursery() as nursery:
            hog_handle: list = []

            async def hog():  # holds the model's only slot
                async with rig.session(await rig.open_channel(cap=10_000)) as s:
                    hog_handle.append(s)
                    await s.call(USER, 8)

            nursery.start_soon(hog)
            await backend.started.wait()
            async with rig.session(await rig.open_channel(cap=10_000)) as second, \
                    rig.session(await rig.open_channel(cap=10_000)) as third:
                async def waiter():
                    with pytest.raises(Exception):
                        await second.call(USER, 8, on_queue=record)

                nursery.start_soon(waiter)
                with trio.fail_after(10):
                    await told.wait()
                assert positions == [1]
                with pytest.raises(CallRefused) as full:
                    await third.call(USER, 8)
                assert full.value.reason == "capacity"
                nursery.cancel_scope.cancel()
        # cancelled calls pay exactly the prefixes they were given (the hog's "slow"), nothing more
        paid = sum(h.last_cancelled.cost for h in (*hog_handle, second) if h.last_cancelled is not None)
        assert paid >= hog_handle[0].last_cancelled.cost > 0
        assert rig.balance(rig.provider_id).available == paid
