"""Counter-signatures are delivered or known lost (issue #12, finding 3): the provider
acknowledges each; a call is done only then; a receipt in doubt is redelivered on
/inferswarm/receipt/1.0.0 until the provider holds it, and the agent pays it."""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

import protocol
from node.consumer._delivery import ReceiptDelivery, SettlementUnconfirmed, attach
from node.consumer._session_client import SessionRejected
from node.provider._offers import Offer
from node.provider._receipt_intake import ReceiptIntake
from node.provider._session_service import ProviderService
from tests.node.helpers import wait_until
from tests.node.session_rig import Rig, ScriptedBackend, session_rig
from tests.support import identity

USER = [{"role": "user", "content": "Say something."}]
MINT = 10_000_000


def offer(**kw):
    fields = dict(model="m", backend="builtin", input_price=500_000, output_price=1_500_000, max_context=2048,
                  max_concurrent=256)
    fields.update(kw)
    return Offer(**fields)


@asynccontextmanager
async def delivering(rig: Rig, path, *, intake: bool = True) -> AsyncIterator[tuple[ReceiptDelivery, ReceiptIntake]]:
    """The consumer's redelivery queue and task (attached to the rig's consumer receipts) and,
    with ``intake``, the provider's receipt protocol handler: what ``open_node`` wires."""
    taker = ReceiptIntake(rig.provider_service)
    if intake:
        rig.provider_host.set_stream_handler(protocol.RECEIPT_PROTOCOL, taker.handle)
    delivery = ReceiptDelivery(path / "consumer-delivery.db", rig.clock, connect_timeout_s=2.0, answer_timeout_s=2.0)
    attach(rig.consumer_receipts, delivery)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(delivery.serve, rig.consumer_host, 0.05)
            yield delivery, taker
            nursery.cancel_scope.cancel()
    finally:
        delivery.close()


def provider_holds(rig: Rig, receipt: protocol.Receipt) -> bool:
    return bool(rig.provider_service.receipts.query("SELECT 1 FROM receipts WHERE receipt_id = ?",
                                                    (protocol.receipt_hash(receipt),)))


def consumer_id(rig: Rig) -> str:
    return rig.consumer_ops.identity.peer_id


def drop_countersign(session) -> None:
    """The counter-signature is written nowhere: lost between the consumer and the provider."""
    framed = session._framed
    send = framed.send

    async def lossy(msg):
        if not isinstance(msg, protocol.CounterSign):
            await send(msg)

    framed.send = lossy


class NoAckProvider(ProviderService):
    """Stores each counter-signed receipt but never sends its acknowledgement."""

    async def send(self, framed, msgs):
        await super().send(framed, [m for m in msgs if not isinstance(m, protocol.CounterSignAck)])


async def test_a_call_is_done_only_when_the_provider_acknowledged_and_its_queue_entry_is_gone(tmp_path):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="ack") as rig, \
            delivering(rig, tmp_path) as (delivery, _):
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            result = await session.call(USER, 16)
            assert provider_holds(rig, result.receipt)  # the ack came: the provider holds it already
            assert session.machine.unacked is None
            assert delivery.pending() == []


async def test_the_counter_signature_lost_after_the_provider_gave_up_waiting_is_redelivered_and_paid(tmp_path):
    """Finding 3's cause: the provider's wait for the counter-signature ran out (a consumer slow to
    read under load) and it ended the session; the consumer then read the receipt, counter-signed
    it into a stream nobody read and reported success. Now the call waits for the ack, hears the
    provider's Close, redelivers the receipt on the receipt protocol, and the agent pays it."""
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="late", countersign_timeout_s=0.5) as rig, \
            delivering(rig, tmp_path) as (delivery, _):
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            framed = session._framed
            receive = framed.receive

            async def slow_reader(*args, **kwargs):
                msg = await receive(*args, **kwargs)
                if isinstance(msg, protocol.Receipt):  # read only once the provider has given up on us
                    await wait_until(lambda: rig.provider_service.active["m"] == 0, what="the provider to give up")
                return msg

            framed.receive = slow_reader
            result = await session.call(USER, 16)
        receipt = result.receipt
        assert provider_holds(rig, receipt) and delivery.pending() == []
        await wait_until(lambda: rig.balance(rig.provider_id).available == receipt.cumulative, what="the claim")
        consumer = rig.balance(consumer_id(rig))
        assert consumer.available + consumer.locked == MINT - receipt.cumulative
        rig.agent.check()
        # it paid the call it was marked unpaid for: its sessions are no longer refused
        assert rig.provider_service.admission.unpaid_until(consumer_id(rig), trio.current_time()) is None


async def test_a_call_whose_ack_never_comes_is_not_a_success_and_its_receipt_is_resent_until_paid(tmp_path):
    """The CounterSign is lost and the receipt protocol is not served yet: the call fails with
    settlement_unconfirmed (not a success) and the receipt stays queued; once the provider takes
    receipts, the next session with it (a reconnect) has it resent at once, before its backoff
    is over, and the agent pays exactly that."""
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="lost", countersign_timeout_s=0.5) as rig, \
            delivering(rig, tmp_path, intake=False) as (delivery, intake):
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            drop_countersign(session)
            with pytest.raises(SettlementUnconfirmed, match="settlement_unconfirmed.*will be resent") as caught:
                await session.call(USER, 16)
        receipt = caught.value.receipt
        assert caught.value.reason == "settlement_unconfirmed"
        assert not provider_holds(rig, receipt)
        assert delivery.pending(rig.provider_id) == [receipt]  # durable, still in doubt
        rig.provider_host.set_stream_handler(protocol.RECEIPT_PROTOCOL, intake.handle)
        again = await rig.open_channel(cap=100_000)
        try:
            async with rig.session(again):
                pass
        except SessionRejected:  # it may hold the call as unpaid for a while: we reached it all the same
            pass
        # the receipt goes now, before its backoff (5 s) is over
        await wait_until(lambda: not delivery.pending(), timeout=3, what="the redelivery on reconnect")
        assert provider_holds(rig, receipt)
        await wait_until(lambda: rig.balance(rig.provider_id).available == receipt.cumulative, what="the claim")
        consumer = rig.balance(consumer_id(rig))
        assert consumer.available + consumer.locked == MINT - receipt.cumulative
        rig.agent.check()


async def test_without_an_ack_on_the_session_the_immediate_redelivery_confirms_the_call(tmp_path):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, provider_cls=NoAckProvider,
                           tag="noack") as rig, delivering(rig, tmp_path) as (delivery, _):
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            session._ack_timeout = 0.3
            result = await session.call(USER, 16)  # no ack in the session: confirmed on the receipt protocol
        assert provider_holds(rig, result.receipt) and delivery.pending() == []


async def test_a_receipt_queued_before_a_restart_is_resent_by_the_next_run(tmp_path):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="restart", countersign_timeout_s=0.5) as rig:
        async with delivering(rig, tmp_path, intake=False) as (delivery, _):
            channel = await rig.open_channel(cap=100_000)
            async with rig.session(channel) as session:
                drop_countersign(session)
                with pytest.raises(SettlementUnconfirmed) as caught:
                    await session.call(USER, 16)
        receipt = caught.value.receipt  # the consumer "restarts": a new queue on the same file
        async with delivering(rig, tmp_path) as (delivery, _):
            await wait_until(lambda: not delivery.pending(), what="the resend after the restart")
        assert provider_holds(rig, receipt)
        await wait_until(lambda: rig.balance(rig.provider_id).available == receipt.cumulative, what="the claim")


async def test_duplicate_forged_and_foreign_redeliveries_are_refused_or_acknowledged_without_harm(tmp_path):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="intake", claim_interval_s=3600) as rig, \
            delivering(rig, tmp_path) as (_, intake):
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            receipt = (await session.call(USER, 16)).receipt
        await wait_until(lambda: rig.balance(rig.provider_id).available == receipt.cumulative, what="the settlement")
        me = consumer_id(rig)

        def rows():
            return rig.provider_service.receipts.query("SELECT receipt_id, claimed FROM receipts")

        held = rows()
        # a duplicate: acknowledged again, nothing stored twice, nothing claimed again
        for _ in range(3):
            ack = await intake.take(receipt, me)
            assert isinstance(ack, protocol.CounterSignAck)
            protocol.verify_ack(ack, receipt)
        assert rows() == held and rig.provider_service.book.session(receipt.session_id) is None
        # forged: the consumer's signature is someone else's
        mallory = identity("intake-mallory")
        forged = protocol.sign(dataclasses.replace(receipt, consumer_sig=b"", cumulative=receipt.cumulative + 1),
                               "consumer_sig", mallory)
        assert (await intake.take(forged, me)).reason == "not_mine"  # the provider's signature no longer fits
        bad_consumer = protocol.sign(dataclasses.replace(receipt, consumer_sig=b""), "consumer_sig", mallory)
        assert (await intake.take(bad_consumer, me)).reason == "bad_signature"
        # foreign: signed by another provider, or delivered by someone other than its consumer
        other = identity("intake-other-provider")
        foreign = protocol.sign(dataclasses.replace(receipt, provider=other.peer_id, provider_sig=b"", consumer_sig=b""),
                                "provider_sig", other)
        foreign = protocol.sign(foreign, "consumer_sig", rig.consumer_ops.identity)
        assert (await intake.take(foreign, me)).reason == "not_mine"
        assert (await intake.take(receipt, mallory.peer_id)).reason == "not_sender"
        assert rows() == held
        assert rig.balance(rig.provider_id).available == receipt.cumulative  # paid once, exactly
        rig.agent.check()


async def test_a_peer_past_its_rate_is_refused_and_oversize_frames_cost_nothing(tmp_path):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="rate") as rig, \
            delivering(rig, tmp_path) as (_, intake):
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            receipt = (await session.call(USER, 16)).receipt
        slow = ReceiptIntake(rig.provider_service, rate_per_s=0.001, burst=2)
        answers = [await slow.take(receipt, consumer_id(rig)) for _ in range(3)]
        assert [type(a).__name__ for a in answers] == ["CounterSignAck", "CounterSignAck", "ReceiptRefused"]
        assert answers[2].reason == "rate_limited" and answers[2].retry_after_s > 0
        # on the wire: a frame over RECEIPT_FRAME_MAX ends the stream at its length prefix
        from libp2p.peer.id import ID

        from node.net._streams import FramedStream, StreamClosed
        stream = await rig.consumer_host.new_stream(ID.from_base58(rig.provider_id), [protocol.RECEIPT_PROTOCOL])
        framed = FramedStream(stream)
        await stream.write(protocol.encode_varint(1 << 20) + b"x" * 1024)
        with pytest.raises(StreamClosed):
            await framed.receive(timeout_s=10)
        await framed.close()
        assert len(rig.provider_service.receipts.query("SELECT 1 FROM receipts")) == 1


async def test_a_burst_of_200_concurrent_calls_leaves_no_counter_signed_receipt_behind(tmp_path):
    """200 paid runs started at once (8 sessions at a time: the rig's agent serves 8 streams a
    peer), against a provider that waits only 1 s for a counter-signature: whatever fails, every receipt the consumer counter-signed ends at the provider,
    every call reported done was held by the provider when it returned, and the agent pays
    exactly their sum."""
    n = 200
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="burst", countersign_timeout_s=1.0) as rig, \
            delivering(rig, tmp_path) as (delivery, _):
        done: list[protocol.Receipt] = []
        held_when_done: list[bool] = []
        failed: list[str] = []
        sessions = trio.CapacityLimiter(8)  # the agent serves 8 streams per peer: the rest would not open

        async def one(i: int) -> None:
            try:
                async with sessions:  # like a paid run: a channel of its own, a session, one call
                    channel = await rig.open_channel(cap=20_000)
                    async with rig.session(channel) as session:
                        receipt = (await session.call([{"role": "user", "content": f"call {i}"}], 16)).receipt
                        held_when_done.append(provider_holds(rig, receipt))
                        done.append(receipt)
            except Exception as exc:  # refused, reset, timed out: allowed, as long as nothing is lost
                failed.append(f"{type(exc).__name__}: {str(exc)[:90]}")

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        assert done, f"no call was served: {failed}"
        assert all(held_when_done)
        await wait_until(lambda: not delivery.pending(), timeout=60, what="every receipt in doubt delivered")
        signed = rig.consumer_receipts.query("SELECT receipt_id, cost FROM receipts")
        at_provider = {rid for (rid,) in rig.provider_service.receipts.query("SELECT receipt_id FROM receipts")}
        assert {rid for rid, _ in signed} <= at_provider
        total = sum(cost for _, cost in signed)
        await wait_until(lambda: rig.balance(rig.provider_id).available == total, timeout=60, what="every claim")
        consumer = rig.balance(consumer_id(rig))
        assert consumer.available + consumer.locked == MINT - total
        rig.agent.check()


async def test_a_provider_that_cannot_store_a_redelivered_receipt_does_not_acknowledge_it(tmp_path):
    from node._receipts import ReceiptStoreError

    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="full", countersign_timeout_s=0.5) as rig, \
            delivering(rig, tmp_path, intake=False) as (delivery, intake):
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            drop_countersign(session)
            with pytest.raises(SettlementUnconfirmed) as caught:
                await session.call(USER, 16)
        receipt = caught.value.receipt
        store = rig.provider_service.receipts

        async def full_disk(*args, **kwargs):
            raise ReceiptStoreError("database or disk is full")

        store.put = full_disk  # an instance attribute: the class's put comes back on delete
        answer = await intake.take(receipt, consumer_id(rig))
        assert isinstance(answer, protocol.ReceiptRefused) and answer.reason == "unavailable"
        rig.provider_host.set_stream_handler(protocol.RECEIPT_PROTOCOL, intake.handle)
        assert not await delivery.confirm_now(receipt)  # refused on the wire too: still queued
        assert delivery.pending() == [receipt]
        del store.put
        assert await delivery.confirm_now(receipt)
        assert provider_holds(rig, receipt) and delivery.pending() == []
        await wait_until(lambda: rig.balance(rig.provider_id).available == receipt.cumulative, what="the claim")


async def test_a_call_that_runs_out_of_time_after_its_counter_signature_says_it_is_in_doubt(tmp_path):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, provider_cls=NoAckProvider,
                           tag="late-call") as rig, delivering(rig, tmp_path, intake=False) as (delivery, _):
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            session._call_timeout, session._ack_timeout = 1.0, 60.0  # the call's own deadline ends the wait
            with pytest.raises(SettlementUnconfirmed, match="did not finish within") as caught:
                await session.call(USER, 16)
        assert delivery.pending() == [caught.value.receipt]
