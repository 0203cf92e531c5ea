"""Issue #11, findings 1-5, 7 (chunks), 10 and 15 (stalls), each written as the attack: a hostile
consumer or provider speaking the session protocol over real libp2p streams to a real provider
service (or a real consumer), with the exact balances at the escrow agent afterwards."""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import pytest
import trio

import protocol
from node.consumer._session_client import ProviderFailed, ProviderMisbehaved, SessionRejected, open_session, reach
from node.net._host import peer_addrs
from node.net._streams import FramedStream
from node.provider._offers import Offer
from protocol import SESSION_PROTOCOL
from tests.node.helpers import wait_until
from tests.node.session_rig import Rig, ScriptedBackend, session_rig

USER = [{"role": "user", "content": "hi"}]
PRICE = protocol.Price(input_per_1k=500_000, output_per_1k=1_500_000)
MINTED = 10_000_000


def offer(**kw: Any) -> Offer:
    fields = dict(model="m", backend="builtin", input_price=PRICE.input_per_1k, output_price=PRICE.output_per_1k,
                  max_context=2048, max_concurrent=4)
    fields.update(kw)
    return Offer(**fields)


def consumer_of(rig: Rig) -> str:
    return rig.consumer_ops.identity.peer_id


@asynccontextmanager
async def raw_session(rig: Rig, channel: protocol.ChannelGrant, spend_limit: int | None = None
                      ) -> AsyncIterator[tuple[protocol.ConsumerSession, FramedStream]]:
    """A consumer machine driven by hand over a real stream: the test decides what gets sent."""
    await reach(rig.consumer_host, rig.provider_id, tuple(peer_addrs(rig.provider_host)))
    stream = await rig.consumer_host.new_stream(rig.provider_host.get_id(), [SESSION_PROTOCOL])
    framed = FramedStream(stream, read_timeout_s=20)
    machine = protocol.ConsumerSession(rig.consumer_ops.identity, session_id=secrets.token_bytes(16),
                                       provider=rig.provider_id, model="m", listing_seq=1, price=PRICE,
                                       channel=channel, spend_limit=channel.cap if spend_limit is None else spend_limit,
                                       max_context=2048)
    try:
        yield machine, framed
    finally:
        await framed.reset()


def machine_now() -> int:
    return int(time.time())


# ---- providers robbed ---------------------------------------------------------------------------


async def test_1_a_second_session_cannot_close_away_the_first_sessions_receipts():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="h1", claim_interval_s=3600) as rig:
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel, spend_limit=50_000) as first:
            paid_for = [await first.call(USER, 8) for _ in range(3)]
            owed = paid_for[-1].receipt.cumulative
            # the attack: a second session on the same channel ends at once with a cooperative close
            # carrying no receipt, which would settle the channel and refund it all
            async with rig.session(channel, spend_limit=50_000) as second:
                pass
            assert second.machine.receipts == []
            status = (await rig.consumer_ops.channel(rig.agent_addr, channel.channel_id.hex())).state.status
            assert status == "open"  # declined: the first session still runs on it
        # the first session's own close settles it all: its receipts paid, the rest refunded
        assert rig.balance(rig.provider_id).available == owed
        assert rig.balance(consumer_of(rig)) == protocol.Balance(available=MINTED - owed, locked=0)
        rig.agent.check()


async def test_1b_a_zero_close_after_an_ended_session_pays_that_session_first():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="h1b", claim_interval_s=3600) as rig:
        channel = await rig.open_channel(cap=100_000)
        real_claim = rig.provider_service.settlement.claim

        async def agent_unreachable(receipt):  # the first session's end-of-session claim fails
            return False

        rig.provider_service.settlement.claim = agent_unreachable
        async with rig.session(channel, spend_limit=50_000) as first:
            owed = (await first.call(USER, 8)).receipt.cumulative
            await first.close(settle_escrow=False)
        assert rig.balance(rig.provider_id).available == 0  # owed, not yet paid
        rig.provider_service.settlement.claim = real_claim
        async with rig.session(channel, spend_limit=50_000):
            pass  # the attack: a close with no receipt, while the first session is owed
        assert rig.balance(rig.provider_id).available == owed  # claimed before the close was completed
        assert rig.balance(consumer_of(rig)) == protocol.Balance(available=MINTED - owed, locked=0)
        rig.agent.check()


async def test_2_a_short_lived_channel_is_refused_and_a_session_is_paid_before_its_channel_expires():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="h2", claim_interval_s=3600) as rig:
        short = await rig.open_channel(cap=50_000, ttl=100)  # under the provider's 120 s
        with pytest.raises(SessionRejected) as refused:
            async with rig.session(short):
                pass
        assert refused.value.reason == "escrow_invalid" and "expires in" in refused.value.detail
        channel = await rig.open_channel(cap=50_000, ttl=130)
        async with rig.session(channel) as session:
            owed = (await session.call(USER, 8)).receipt.cumulative
            rig.clock.offset += 105  # inside the claim margin (30 s before expiry)
            await wait_until(lambda: rig.balance(rig.provider_id).available == owed, what="the claim before expiry")
            with pytest.raises(Exception, match="expired"):  # no call starts that could not be paid
                await session.call(USER, 8)
            rig.clock.offset += 60  # past the expiry: the agent refunds the rest
            await wait_until(lambda: rig.balance(consumer_of(rig)).locked == 0, what="the refunds")
        assert rig.balance(rig.provider_id).available == owed
        assert rig.balance(consumer_of(rig)) == protocol.Balance(available=MINTED - owed, locked=0)
        rig.agent.check()


async def test_3_concurrent_sessions_cannot_spend_past_what_the_channel_holds():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="h3") as rig:
        channel = await rig.open_channel(cap=60_000)
        async with rig.session(channel) as first:  # holds the whole cap
            for _ in range(2):
                with pytest.raises(SessionRejected) as refused:
                    async with rig.session(channel):
                        pass
                assert refused.value.reason == "escrow_invalid" and "committed" in refused.value.detail
            owed = (await first.call(USER, 8)).receipt.cumulative
        # sessions that split the cap between them run side by side, and never past it together
        channel = await rig.open_channel(cap=60_000)
        async with rig.session(channel, spend_limit=20_000) as a, rig.session(channel, spend_limit=20_000) as b, \
                rig.session(channel, spend_limit=20_000) as c:
            with pytest.raises(SessionRejected):
                async with rig.session(channel, spend_limit=1_000):
                    pass
            more = 0
            for s in (a, b, c):
                more = (await s.call(USER, 8)).receipt.cumulative + more
        await wait_until(lambda: rig.balance(rig.provider_id).available == owed + more, what="every session paid")
        assert rig.balance(consumer_of(rig)) == protocol.Balance(available=MINTED - owed - more, locked=0)
        rig.agent.check()


async def test_4_a_consumer_that_leaves_a_receipt_unsigned_gets_no_second_session():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="h4") as rig:
        channel = await rig.open_channel(cap=100_000)
        async with raw_session(rig, channel) as (machine, framed):
            machine.open(machine_now())
            await framed.send_all(machine.outgoing())
            assert isinstance(machine.receive(await framed.receive(), machine_now())[0], protocol.Accepted)
            machine.request(tuple(protocol.ChatMessage(role=m["role"], content=m["content"]) for m in USER), 8)
            await framed.send_all(machine.outgoing())
            events: list[Any] = []
            while not any(isinstance(e, protocol.ReceiptSettled) for e in events):
                events += machine.receive(await framed.receive(), machine_now())
            machine.outgoing()  # the attack: the counter-signature is never sent
        await wait_until(lambda: rig.provider_service.active.get("m", 0) == 0, what="the provider to end that session")
        # every new session of this consumer is refused, on any channel
        for _ in range(3):
            with pytest.raises(SessionRejected) as refused:
                async with rig.session(await rig.open_channel(cap=100_000)):
                    pass
            assert refused.value.reason == "rate_limited" and "never counter-signed" in refused.value.detail
        assert rig.balance(rig.provider_id).available == 0
        rig.agent.check()


# ---- consumers over-billed ---------------------------------------------------------------------


def hostile_provider(rig: Rig, cheat: str) -> Callable[[Any], Any]:
    """A provider that accepts every Open, then lies the way ``cheat`` says."""
    provider = rig.provider_service.identity

    async def handle(stream: Any) -> None:
        framed = FramedStream(stream, read_timeout_s=20)
        machine = protocol.ProviderSession(provider)
        now = machine_now()
        try:
            first = await framed.receive()
            machine.receive(first, now)
            machine.accept_open(first.price, 1 << 24 if cheat == "context" else 2048, now)
            await framed.send_all(machine.outgoing())
            (event,) = machine.receive(await framed.receive(), now)
            assert isinstance(event, protocol.CallRequested)
            sid = first.session_id
            if cheat == "megabytes":  # 1 MiB-ish chunks claiming no tokens
                for i in range(200):
                    await framed.send(protocol.Chunk(session_id=sid, call_seq=0, index=i, text="x" * 900_000,
                                                     tokens=0))
                return
            text, tokens_in, tokens_out = ("Hello !", 1_997, 1) if cheat == "prompt" else ("Hello !", 2, 63)
            await framed.send(protocol.Chunk(session_id=sid, call_seq=0, index=0, text=text, tokens=tokens_out))
            cost = protocol.call_cost(first.price, tokens_in, tokens_out)
            receipt = protocol.Receipt(
                session_id=sid, call_seq=0, model="m", provider=provider.peer_id, consumer=first.consumer,
                agent=first.channel.agent, channel_id=first.channel.channel_id,
                input_hash=protocol.request_hash(event.request), output_hash=protocol.output_hash(text),
                tokens_in=tokens_in, tokens_out=tokens_out, finish_reason="stop", price=first.price, cost=cost,
                cumulative=cost, prev_hash=protocol.ZERO_HASH, issued_at=now)
            await framed.send(protocol.sign(receipt, "provider_sig", provider))
            with trio.move_on_after(5):
                while True:  # whatever comes back, it must not be a counter-signature
                    assert not isinstance(await framed.receive(), protocol.CounterSign)
        except Exception:  # the consumer hung up on the lie
            pass
        finally:
            await framed.close()

    return handle


@pytest.mark.parametrize("cheat", ["context", "prompt", "completion", "megabytes"])
async def test_5_7_a_provider_cannot_bill_counts_the_consumer_can_refute(cheat):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag=f"h5{cheat}") as rig:
        rig.provider_host.set_stream_handler(SESSION_PROTOCOL, hostile_provider(rig, cheat))
        channel = await rig.open_channel(cap=2_000_000)
        with pytest.raises((ProviderMisbehaved, SessionRejected)) as caught:
            async with rig.session(channel) as session:
                await session.call(USER, 100)
        assert isinstance(caught.value, ProviderMisbehaved)
        assert rig.balance(rig.provider_id).available == 0  # nothing was counter-signed, nothing can be claimed


async def test_5_an_honest_provider_bills_within_the_bounds_the_consumer_checks():
    # a backend whose tokenizer counts far more than was sent, and emits tokens with no text
    class Greedy(ScriptedBackend):
        async def count_prompt_tokens(self, messages):
            return 1_500

    backend = Greedy(pieces=[("", 5), ("Hi", 40)])
    async with session_rig({"m": offer()}, {"m": backend}, tag="h5honest") as rig:
        async with rig.session(await rig.open_channel(cap=2_000_000)) as session:
            r = (await session.call(USER, 100)).receipt
        assert r.tokens_in == protocol.prompt_token_bound([("user", "hi")])
        assert r.tokens_out == len("Hi") + protocol.TOKEN_SLACK
        assert rig.balance(rig.provider_id).available == r.cumulative


# ---- capacity held for nothing, and stalls -------------------------------------------------------


async def test_10_sessions_that_cannot_pay_or_sit_idle_hold_no_seat():
    async with session_rig({"m": offer(max_concurrent=1)}, {"m": ScriptedBackend()}, tag="h10",
                           session_idle_s=0.5) as rig:
        tiny = await rig.open_channel(cap=1)
        with pytest.raises(SessionRejected) as refused:
            async with rig.session(tiny, spend_limit=0):
                pass
        assert refused.value.reason == "over_budget"
        async with rig.session(await rig.open_channel(cap=100_000)):  # then it sits idle
            assert rig.provider_service.active["m"] == 1
            await wait_until(lambda: rig.provider_service.active.get("m", 0) == 0, what="the idle session closed")
        async with rig.session(await rig.open_channel(cap=100_000)) as next_one:  # the seat is free again
            await next_one.call(USER, 8)
        rig.agent.check()


class Trickle(ScriptedBackend):
    """A provider's backend that never stops: one token every 0.3 s, always inside the idle timeout."""

    async def generate(self, messages, *, on_piece, **kw):
        for _ in range(1000):
            await on_piece("a", 1)
            await trio.sleep(0.3)


async def test_15_a_provider_that_accepts_and_trickles_is_cut_off_by_the_call_deadline():
    async with session_rig({"m": offer()}, {"m": Trickle()}, tag="h15") as rig:
        channel = await rig.open_channel(cap=2_000_000)
        async with open_session(rig.consumer_host, rig.consumer_ops.identity, provider=rig.provider_id,
                                addrs=tuple(peer_addrs(rig.provider_host)), model="m", price=PRICE, listing_seq=1,
                                channel=channel, spend_limit=channel.cap, max_context=2048, clock=rig.clock,
                                idle_timeout_s=1, call_timeout_s=2) as session:
            with pytest.raises(ProviderFailed, match="did not finish within"):
                await session.call(USER, 1000)
        assert rig.balance(rig.provider_id).available == 0
