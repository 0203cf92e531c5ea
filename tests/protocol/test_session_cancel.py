"""Cancellation (docs/PROTOCOL.md, "Cancellation"): a cancelled call is billed for exactly the
prefix the consumer says it received; chunks sent after the cut are not billed; the consumer
never counter-signs more; the races (a receipt or a CallError crossing the Cancel) end honestly."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import ConsumerState, ProviderState
from tests.support import PROVIDER, Pair

Q = (protocol.ChatMessage(role="user", content="q"),)


def _begin(pair: Pair, max_tokens: int = 64, tokens_in: int = 5) -> int:
    pair.consumer.request(Q, max_tokens)
    (ev,) = pair.to_provider()
    assert isinstance(ev, protocol.CallRequested)
    limit = pair.provider.start_call(tokens_in, pair.now)
    assert limit is not None
    return limit


def _stream(pair: Pair, pieces) -> None:
    for text, tokens in pieces:
        pair.provider.chunk(text, tokens)
    pair.to_consumer()


def _settle(pair: Pair) -> protocol.Receipt:
    """The provider's prefix receipt goes out, the consumer signs it, the provider acknowledges."""
    events = pair.to_consumer()
    (settled,) = [e for e in events if isinstance(e, protocol.ReceiptSettled)]
    assert settled.cancelled
    (countersigned,) = pair.to_provider()
    assert isinstance(countersigned, protocol.Countersigned)
    (acked,) = pair.to_consumer()
    assert isinstance(acked, protocol.CountersignConfirmed)
    assert countersigned.receipt == settled.receipt == pair.consumer.receipts[-1] == pair.provider.receipts[-1]
    return settled.receipt


def _prefix_bill(pieces, cut: int) -> tuple[str, int]:
    text = "".join(t for t, _ in pieces[:cut])
    return text, protocol.cancelled_output_tokens(sum(n for _, n in pieces[:cut]), len(text.encode()))


def test_a_cancelled_call_bills_only_the_chunks_received_before_the_cut():
    pair = Pair()
    pair.open()
    pieces = [("Hello", 2), (" wor", 2), ("ld", 1)]
    _begin(pair)
    _stream(pair, pieces[:2])
    cancel = pair.consumer.cancel()
    assert (cancel.call_seq, cancel.chunks) == (0, 2) and pair.consumer.state is ConsumerState.CANCELLING
    pair.provider.chunk(*pieces[2])  # already on its way when the Cancel left: not billed
    pair.to_consumer()
    (ev,) = pair.to_provider()
    assert isinstance(ev, protocol.CallCancelled) and pair.provider.state is ProviderState.CANCELLING
    with pytest.raises(protocol.IllegalTransition):  # the machine takes no more of the answer
        pair.provider.chunk("more", 1)


def test_the_prefix_receipt_is_checked_signed_and_acknowledged():
    pair = Pair()
    pair.open()
    pieces = [("Hello", 2), (" wor", 2), ("ld", 1)]
    _begin(pair)
    _stream(pair, pieces)
    pair.consumer.cancel(chunks=2)  # its caller saw only two of the three chunks
    pair.to_provider()
    receipt = pair.provider.finish_call("stop", pair.now)
    text, tokens = _prefix_bill(pieces, 2)
    assert receipt.finish_reason == protocol.CANCELLED_FINISH
    assert (receipt.output_hash, receipt.tokens_out) == (protocol.output_hash(text), tokens) == (
        protocol.output_hash("Hello wor"), 4)
    signed = _settle(pair)
    assert signed.cost == protocol.call_cost(pair.price, 5, 4) == pair.consumer.cumulative == pair.provider.cumulative
    assert pair.consumer.state is ConsumerState.READY and pair.provider.state is ProviderState.READY
    assert isinstance(pair.call("next", [("ok", 1)]), protocol.ReceiptSettled)  # the session goes on


def test_a_backend_that_claims_tokens_only_at_the_end_bills_the_byte_floor():
    pair = Pair()
    pair.open()
    _begin(pair)
    _stream(pair, [("x" * 40, 0), ("y" * 30, 0)])  # an upstream's pieces: the count comes with its usage
    pair.consumer.cancel()
    pair.to_provider()
    pair.provider.finish_call("stop", pair.now)
    assert _settle(pair).tokens_out == 3 == protocol.cancelled_output_tokens(0, 70)


def test_cancel_before_any_chunk_bills_the_prompt_only():
    pair = Pair()
    pair.open()
    _begin(pair, tokens_in=7)
    pair.provider.report_queue(2)
    pair.to_consumer()
    pair.consumer.cancel()
    pair.to_provider()
    pair.provider.finish_call("stop", pair.now, tokens_in=0)  # still queued: no prompt was run
    receipt = _settle(pair)
    assert (receipt.tokens_in, receipt.tokens_out, receipt.cost) == (0, 0, protocol.call_cost(pair.price, 0, 0))


def test_the_consumer_cannot_cut_after_more_chunks_than_it_received():
    pair = Pair()
    pair.open()
    _begin(pair)
    _stream(pair, [("a", 1)])
    with pytest.raises(protocol.IllegalTransition):
        pair.consumer.cancel(chunks=2)


def test_a_cancel_naming_chunks_never_sent_is_a_protocol_error():
    pair = Pair()
    pair.open()
    _begin(pair)
    _stream(pair, [("a", 1)])
    with pytest.raises(protocol.UnexpectedMessage):
        pair.provider.receive(protocol.Cancel(session_id=b"s" * 16, call_seq=0, chunks=2), pair.now)
    assert pair.provider.state is ProviderState.ERROR


def test_a_cancel_for_another_call_or_outside_a_call_is_a_protocol_error():
    pair = Pair()
    pair.open()
    pair.call("first", [("ok", 1)])
    with pytest.raises(protocol.UnexpectedMessage):  # call 0 is settled; call 1 never asked for
        pair.provider.receive(protocol.Cancel(session_id=b"s" * 16, call_seq=0, chunks=0), pair.now)


def test_a_receipt_of_the_whole_call_crossing_the_cancel_is_replaced_by_the_prefix_receipt():
    pair = Pair()
    pair.open()
    pieces = [("one ", 2), ("two ", 2), ("three", 3)]
    _begin(pair)
    _stream(pair, pieces[:1])
    pair.consumer.cancel()  # after one chunk
    for text, n in pieces[1:]:
        pair.provider.chunk(text, n)
    whole = pair.provider.finish_call("stop", pair.now)  # the provider finished before it read the Cancel
    events = pair.to_consumer()
    assert not any(isinstance(e, protocol.ReceiptSettled) for e in events)  # not signed: it bills too much
    assert pair.consumer.state is ConsumerState.CANCELLING and not pair.consumer.receipts
    (ev,) = pair.to_provider()  # only the Cancel: no counter-signature
    assert isinstance(ev, protocol.CallCancelled)
    receipt = _settle(pair)
    assert receipt.tokens_out == 2 < whole.tokens_out and receipt.output_hash == protocol.output_hash("one ")


def test_a_second_cancel_of_a_call_is_a_protocol_error():
    # each accepted Cancel in the race would make the provider sign and send a fresh receipt, and
    # reset its wait for the counter-signature: a consumer could hold the seat forever, unpaid
    pair = Pair()
    pair.open()
    pieces = [("one ", 2), ("two ", 2)]
    _begin(pair)
    _stream(pair, pieces)
    pair.provider.finish_call("stop", pair.now)  # the whole call's receipt is out
    again = protocol.Cancel(session_id=b"s" * 16, call_seq=0, chunks=1)
    assert isinstance(pair.provider.receive(again, pair.now)[0], protocol.CallCancelled)  # the race: once
    with pytest.raises(protocol.UnexpectedMessage):
        pair.provider.receive(dataclasses.replace(again, chunks=0), pair.now)
    assert pair.provider.state is ProviderState.ERROR


def test_the_text_of_a_call_is_bounded_by_its_admitted_limit_so_a_cancelled_bill_stays_within_it():
    # a backend that claims its tokens only at the end sends text with zero claims; cancelled, the
    # call is billed one token per MAX_BYTES_PER_TOKEN of it, which must not pass the admitted limit
    pair = Pair(cap=50_000)  # room for 31 output tokens after the prompt
    pair.open()
    limit = _begin(pair, max_tokens=200)
    assert limit == 31
    room = protocol.completion_byte_limit(limit)
    pair.provider.chunk("x" * room, 0)
    with pytest.raises(protocol.SpendLimitReached):
        pair.provider.chunk("x", 0)


def test_a_call_error_crossing_the_cancel_ends_the_call_unpaid():
    pair = Pair()
    pair.open()
    _begin(pair)
    _stream(pair, [("a", 1)])
    pair.consumer.cancel()
    pair.provider.fail_call("backend_error", "it broke")
    (failed,) = pair.to_consumer()
    assert isinstance(failed, protocol.CallFailed) and pair.consumer.state is ConsumerState.READY
    assert pair.to_provider() == []  # the Cancel of a call that already ended: ignored
    assert pair.consumer.cumulative == pair.provider.cumulative == 0
    assert isinstance(pair.call("again", [("ok", 1)]), protocol.ReceiptSettled)


def _resign(r: protocol.Receipt, **changes) -> protocol.Receipt:
    return protocol.sign(dataclasses.replace(r, provider_sig=b"", **changes), "provider_sig", PROVIDER)


@pytest.mark.parametrize("bill", ["one_more_token", "one_more_chunk", "whole_text_fewer_tokens"])
def test_a_receipt_for_more_than_the_prefix_is_never_counter_signed(bill):
    pair = Pair()
    pair.open()
    pieces = [("aa", 2), ("bb", 2), ("cc", 2)]
    _begin(pair)
    _stream(pair, pieces)
    pair.consumer.cancel(chunks=1)
    pair.to_provider()
    honest = pair.provider.finish_call("stop", pair.now)
    pair.provider.outgoing()
    cost = lambda n: protocol.call_cost(pair.price, honest.tokens_in, n)  # noqa: E731
    bad = {
        "one_more_token": _resign(honest, tokens_out=3, cost=cost(3), cumulative=cost(3)),
        "one_more_chunk": _resign(honest, tokens_out=4, output_hash=protocol.output_hash("aabb"), cost=cost(4),
                                  cumulative=cost(4)),
        "whole_text_fewer_tokens": _resign(honest, tokens_out=5, output_hash=protocol.output_hash("aabbcc"),
                                           cost=cost(5), cumulative=cost(5)),
    }[bill]
    with pytest.raises(protocol.ReceiptError):
        pair.consumer.receive(bad, pair.now)
    assert pair.consumer.state is ConsumerState.ERROR and not pair.consumer.receipts
    assert not any(isinstance(m, protocol.CounterSign) for m in pair.consumer.outgoing())


def test_chunks_after_the_cut_still_respect_the_call_bounds():
    pair = Pair()
    pair.open()
    _begin(pair, max_tokens=4)
    _stream(pair, [("a", 1)])
    pair.consumer.cancel()
    bad = protocol.Chunk(session_id=b"s" * 16, call_seq=0, index=1, text="b", tokens=9)  # past max_tokens
    with pytest.raises(protocol.UnexpectedMessage):
        pair.consumer.receive(bad, pair.now)


def test_the_consumer_may_close_instead_of_waiting():
    pair = Pair()
    pair.open()
    _begin(pair)
    pair.consumer.cancel()
    pair.consumer.close(pair.now)
    assert pair.consumer.state is ConsumerState.CLOSED


pieces_st = st.lists(st.tuples(st.text(alphabet="ab é", max_size=6), st.integers(0, 4)), min_size=0, max_size=8)


@settings(max_examples=150, deadline=None)
@given(pieces=pieces_st, data=st.data(), raced=st.booleans())
def test_property_a_cancelled_call_is_billed_exactly_its_received_prefix(pieces, data, raced):
    """Whatever was streamed, wherever the cut falls, whether the whole call's receipt crossed the
    Cancel: the receipt both sign bills the prefix by ``cancelled_output_tokens``, its hash is
    the prefix's, and the chain and cap hold."""
    pair = Pair()
    pair.open()
    limit = _begin(pair, max_tokens=64)
    sent: list[tuple[str, int]] = []
    for text, n in pieces:
        if sum(t for _, t in sent) + n > limit:
            break
        msg = pair.provider.chunk(text, n)
        sent.append((text, msg.tokens))  # what the chunk claimed
    chunks = pair.provider.outgoing()
    received = data.draw(st.integers(0, len(sent)), label="received before the cancel")
    for msg in chunks[:received]:
        pair.consumer.receive(Pair._wire(msg), pair.now)
    cut = data.draw(st.integers(0, received), label="cut")
    pair.consumer.cancel(chunks=cut)
    for msg in chunks[received:]:  # on their way when the Cancel left: checked, not billed
        pair.consumer.receive(Pair._wire(msg), pair.now)
    if raced:
        pair.provider.finish_call("stop", pair.now)
        pair.to_consumer()  # the whole call's receipt, never signed unless it bills just the prefix
    pair.to_provider()
    if pair.provider.state is ProviderState.CANCELLING:
        pair.provider.finish_call("stop", pair.now)
    receipt = _settle(pair) if not pair.consumer.receipts else pair.consumer.receipts[-1]
    text, tokens = _prefix_bill(sent, cut)
    assert (receipt.output_hash, receipt.tokens_out) == (protocol.output_hash(text), tokens)
    assert receipt.cost == protocol.call_cost(pair.price, receipt.tokens_in, tokens) == pair.consumer.cumulative
    assert pair.provider.receipts == pair.consumer.receipts and pair.consumer.cumulative <= pair.consumer.cap
