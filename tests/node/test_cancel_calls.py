"""Cancellation is honest (docs/PROTOCOL.md, "Cancellation"), in-process with real libp2p hosts and
an escrow agent: a cancelled streamed call stops the provider, its receipt covers only the tokens
delivered to the caller, and the escrow pays exactly that; a consumer that vanishes stops the
model too; a provider that ignores the cancel or bills more is never paid for the call."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import pytest
import trio

import protocol
from node.consumer._results import cancelled_calls
from node.consumer._session_client import ProviderFailed, open_session
from node.net._host import peer_addrs
from node.provider import _session_service
from node.provider._offers import Offer
from node.provider._session_service import ProviderService
from node.provider.backends import Backend, Generation, OnPiece
from tests.node.session_rig import builtin_backend, session_rig

USER = [{"role": "user", "content": "Say something."}]
MAX_TOKENS = 1500
MINT = 10_000_000


def offer(**kw: Any) -> Offer:
    fields = dict(model="m", backend="builtin", input_price=1_000, output_price=2_000, max_context=4096,
                  max_concurrent=4)
    fields.update(kw)
    return Offer(**fields)


class Watched(Backend):
    """A backend wrapped to count the tokens it produced and to tell when its ``generate`` ended."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.spec, self.parallel = inner, inner.spec, inner.parallel
        self.produced = 0
        self.ended = trio.Event()
        self._started = False

    async def start(self) -> None:
        """Load once: the tests load it before the provider runs (importing torch on a busy machine
        can take longer than a session's open timeout)."""
        if not self._started:
            await self.inner.start()
            self._started = True

    async def count_prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return await self.inner.count_prompt_tokens(messages)

    async def generate(self, messages: Sequence[dict[str, str]], *, on_piece: OnPiece, **kw: Any) -> Generation:
        async def counted(text: str, tokens: int) -> None:
            self.produced += tokens
            await on_piece(text, tokens)

        try:
            return await self.inner.generate(messages, on_piece=counted, **kw)
        finally:
            self.ended.set()


class Slow(Backend):
    """A trio-native backend: one token ("ab ") every ``delay_s``, up to ``max_tokens``."""

    spec = "slow"

    def __init__(self, delay_s: float = 0.01) -> None:
        self.delay_s = delay_s

    async def count_prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return sum(len(m["content"]) for m in messages)

    async def generate(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece) -> Generation:
        for _ in range(max_tokens):
            await trio.sleep(self.delay_s)
            await on_piece("ab ", 1)
        return Generation("length", max_tokens)


def _cut_after(chars: int) -> tuple[trio.CancelScope, list[str], Any]:
    """A cancel scope, the text shown, and an ``on_text`` that cancels the scope once ``chars``
    characters were shown (the way Ctrl-C interrupts a reader)."""
    scope, shown = trio.CancelScope(), []

    async def on_text(text: str) -> None:
        shown.append(text)
        if len("".join(shown)) >= chars:
            scope.cancel()

    return scope, shown, on_text


async def _call_cut_after(session: Any, chars: int, max_tokens: int) -> tuple[Any, list[str]]:
    """A call cancelled once ``chars`` characters were shown: what it cost, and the text shown."""
    scope, shown, on_text = _cut_after(chars)
    with scope:
        await session.call(USER, max_tokens, on_text=on_text)
    return session.last_cancelled, shown


async def _wait_paid(rig: Any, amount: int) -> None:
    with trio.fail_after(20):
        while rig.balance(rig.provider_id).available < amount:
            await trio.sleep(0.02)


async def test_a_cancelled_streamed_call_stops_the_provider_and_the_escrow_pays_exactly_the_delivered_prefix():
    backend = Watched(builtin_backend())
    await backend.start()
    async with session_rig({"m": offer()}, {"m": backend}, tag="cancel-lib", mint=MINT) as rig:
        channel = await rig.open_channel(cap=5_000_000)
        scope, shown, on_text = _cut_after(40)
        async with rig.session(channel) as session:
            with cancelled_calls() as told, scope:
                await session.call(USER, MAX_TOKENS, temperature_milli=0, on_text=on_text)
            assert scope.cancelled_caught
            cancelled = session.last_cancelled
            assert cancelled is not None and told == [cancelled]
            assert cancelled.outcome == "settled" and cancelled.confirmed
            receipt = cancelled.receipt
            # the receipt covers exactly what the caller was shown
            assert cancelled.text == "".join(shown) and receipt.output_hash == protocol.output_hash("".join(shown))
            assert receipt.tokens_out == len(shown) and receipt.finish_reason == protocol.CANCELLED_FINISH
            assert receipt.cost == protocol.call_cost(receipt.price, receipt.tokens_in, receipt.tokens_out)
            # the provider stopped: its model ended long before max_tokens
            with trio.fail_after(30):
                await backend.ended.wait()
            assert backend.produced < MAX_TOKENS // 2, backend.produced
            assert rig.provider_service.receipts.has_session(receipt.session_id)
            after = await session.call(USER, 4, temperature_milli=0)  # the session goes on
            assert after.receipt.prev_hash == protocol.receipt_hash(receipt)
        total = after.receipt.cumulative
        assert total == receipt.cost + after.receipt.cost
        await _wait_paid(rig, total)
        assert rig.balance(rig.provider_id).available == total  # exactly the receipts both signed
        consumer = rig.balance(rig.consumer_ops.identity.peer_id)
        assert consumer.available + consumer.locked == MINT - total
        rig.agent.check()


async def test_a_consumer_that_vanishes_mid_call_stops_the_model_and_pays_nothing():
    backend = Watched(builtin_backend())
    await backend.start()
    async with session_rig({"m": offer()}, {"m": backend}, tag="cancel-vanish", mint=MINT) as rig:
        channel = await rig.open_channel(cap=5_000_000)
        async with rig.session(channel) as session:
            async def vanish(text: str) -> None:
                await session._framed.reset()  # the consumer's process dies: no Cancel, no Close

            with pytest.raises(ProviderFailed):
                await session.call(USER, MAX_TOKENS, temperature_milli=0, on_text=vanish)
        with trio.fail_after(30):
            await backend.ended.wait()
        assert backend.produced < MAX_TOKENS // 2, backend.produced
        assert rig.balance(rig.provider_id).available == 0


async def test_a_call_cancelled_while_queued_costs_nothing():
    backend = Watched(Slow(delay_s=0.01))
    async with session_rig({"m": offer()}, {"m": backend}, tag="cancel-queued", mint=MINT) as rig:  # one slot
        hog_scope, _, hog_text = _cut_after(10_000)
        async with rig.session(await rig.open_channel(cap=1_000_000)) as hog, \
                rig.session(await rig.open_channel(cap=1_000_000)) as waiter:
            queued, waited = trio.Event(), trio.Event()
            waiter_scope = trio.CancelScope()

            async def on_queue(position: int) -> None:
                queued.set()

            async with trio.open_nursery() as nursery:
                async def hold() -> None:
                    with hog_scope:
                        await hog.call(USER, 400, on_text=hog_text)

                async def wait_in_line() -> None:
                    with waiter_scope:
                        await waiter.call(USER, 400, on_queue=on_queue)
                    waited.set()

                nursery.start_soon(hold)
                with trio.fail_after(10):  # the hog holds the only slot
                    while backend.produced == 0:
                        await trio.sleep(0.01)
                nursery.start_soon(wait_in_line)
                with trio.fail_after(10):
                    await queued.wait()
                waiter_scope.cancel()  # cancelled while it waits for the slot the hog holds
                with trio.fail_after(10):
                    await waited.wait()
                nursery.cancel_scope.cancel()
            assert waiter.last_cancelled is not None and waiter.last_cancelled.outcome == "settled"
            receipt = waiter.last_cancelled.receipt
            assert (receipt.tokens_in, receipt.tokens_out, receipt.cost) == (0, 0, 0)


class DeafSession(_session_service._StreamSession):
    """Ignores what the consumer sends while it generates: a Cancel changes nothing."""

    async def _while_listening(self, run: Any) -> Any:
        return await run()


class BillsTheWholeCall(ProviderService):
    """Answers a cancel with a receipt of every chunk it streamed, not the consumer's prefix."""

    async def send(self, framed: Any, msgs: list[Any]) -> None:
        out = []
        for m in msgs:
            if isinstance(m, protocol.Receipt) and m.finish_reason == protocol.CANCELLED_FINISH:
                more = m.tokens_out + 5
                cost = protocol.call_cost(m.price, m.tokens_in, more)
                m = protocol.sign(dataclasses.replace(m, provider_sig=b"", tokens_out=more, cost=cost,
                                                      cumulative=m.cumulative - m.cost + cost), "provider_sig",
                                  self.identity)
            out.append(m)
        await framed.send_all(out)


def _session_with_cancel_bound(rig: Any, channel: protocol.ChannelGrant, cancel_timeout_s: float) -> Any:
    o = rig.offers["m"].to_model_offer()
    return open_session(rig.consumer_host, rig.consumer_ops.identity, provider=rig.provider_id,
                        addrs=tuple(peer_addrs(rig.provider_host)), model="m", price=o.price, listing_seq=1,
                        channel=channel, spend_limit=channel.cap, max_context=o.max_context,
                        receipts=rig.consumer_receipts, clock=rig.clock, idle_timeout_s=30,
                        cancel_timeout_s=cancel_timeout_s)


async def test_a_receipt_for_more_than_the_delivered_prefix_is_never_counter_signed():
    async with session_rig({"m": offer()}, {"m": Slow(delay_s=0.005)}, provider_cls=BillsTheWholeCall,
                           tag="cancel-bills-more", mint=MINT) as rig:
        channel = await rig.open_channel(cap=1_000_000)
        async with _session_with_cancel_bound(rig, channel, 1.0) as session:
            cancelled, shown = await _call_cut_after(session, 9, 400)
            assert cancelled is not None and cancelled.receipt is None and cancelled.cost == 0
            assert cancelled.outcome.startswith("nothing paid")
            assert not session.machine.receipts  # nothing was counter-signed
            assert session.machine.state.name in ("CLOSED", "ERROR")
        assert rig.balance(rig.provider_id).available == 0


async def test_a_provider_that_keeps_streaming_after_the_cancel_is_not_paid(monkeypatch):
    monkeypatch.setattr(_session_service, "_StreamSession", DeafSession)
    async with session_rig({"m": offer()}, {"m": Slow(delay_s=0.005)}, tag="cancel-deaf", mint=MINT) as rig:
        channel = await rig.open_channel(cap=1_000_000)
        async with _session_with_cancel_bound(rig, channel, 0.5) as session:
            cancelled, shown = await _call_cut_after(session, 9, 2000)
            assert cancelled is not None and cancelled.receipt is None
            assert "no receipt of the cancelled call within" in cancelled.outcome
            assert not session.machine.receipts and session.machine.state.name == "CLOSED"
            with pytest.raises(ProviderFailed, match="takes no more calls"):  # a plain failure, not a bug
                await session.call(USER, 4)
        assert rig.balance(rig.provider_id).available == 0


async def test_a_cancel_that_disowns_chunks_long_received_ends_the_session_and_marks_the_consumer(monkeypatch):
    # the hostile consumer reads the answer, then says it got none of it (chunks=0): the whole answer
    # for the prompt's price, call after call. Disowning a chunk sent longer ago than the grace (0
    # here, so the test needs no clock) bills the named prefix, ends the session, and marks it unpaid
    monkeypatch.setattr(_session_service, "CANCEL_GRACE_S", 0.0)
    real_cancel = protocol.ConsumerSession.cancel

    def lying_cancel(self, chunks=None):
        return real_cancel(self, chunks=0)

    monkeypatch.setattr(protocol.ConsumerSession, "cancel", lying_cancel)
    async with session_rig({"m": offer()}, {"m": Slow(delay_s=0.005)}, tag="cancel-lies", mint=MINT) as rig:
        channel = await rig.open_channel(cap=1_000_000)
        async with rig.session(channel) as session:
            cancelled, shown = await _call_cut_after(session, 30, 400)
            assert cancelled is not None and cancelled.receipt is not None
            assert cancelled.receipt.tokens_out == 0  # what it named: the prompt only
            with trio.fail_after(10):  # the provider ends the session once the prefix is settled
                while session.machine.state.name not in ("CLOSED", "ERROR"):
                    with pytest.raises(ProviderFailed):
                        await session.call(USER, 4)
        consumer = rig.consumer_ops.identity.peer_id
        assert rig.provider_service.admission.unpaid_until(consumer, trio.current_time()) is not None


class NeverAcks(ProviderService):
    """Takes the counter-signature of a cancelled call but never acknowledges it in the session."""

    async def send(self, framed: Any, msgs: list[Any]) -> None:
        await framed.send_all([m for m in msgs if not isinstance(m, protocol.CounterSignAck)])


async def test_a_cancelled_call_whose_ack_never_comes_is_reported_paid_not_free():
    # the prefix receipt is doubly signed and queued for redelivery: the caller is told what it
    # costs (in doubt, confirmed False), never "nothing paid", and the provider is not blamed
    async with session_rig({"m": offer()}, {"m": Slow(delay_s=0.005)}, provider_cls=NeverAcks,
                           tag="cancel-no-ack", mint=MINT) as rig:
        channel = await rig.open_channel(cap=1_000_000)
        async with _session_with_cancel_bound(rig, channel, 1.0) as session:
            cancelled, shown = await _call_cut_after(session, 9, 400)
            assert cancelled is not None and cancelled.outcome == "settled" and not cancelled.confirmed
            assert cancelled.receipt is not None and cancelled.receipt == session.machine.receipts[-1]
            assert cancelled.cost > 0 and cancelled.text == "".join(shown)[:len(cancelled.text)]
