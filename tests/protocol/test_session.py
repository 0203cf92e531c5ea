"""The consumer and provider session machines, joined by an in-memory link."""

from __future__ import annotations

import dataclasses

import pytest

import protocol
from protocol import ConsumerState, ProviderState
from tests.support import AGENT, CONSUMER, MALLORY, PRICE, PROVIDER, Pair, channel


def _check_chain(receipts, cap):
    prev, total = protocol.ZERO_HASH, 0
    for i, r in enumerate(receipts):
        protocol.verify(r, "provider_sig", PROVIDER.public_key)
        protocol.verify(r, "consumer_sig", CONSUMER.public_key)
        assert r.call_seq == i and r.prev_hash == prev
        total += r.cost
        assert r.cumulative == total <= cap
        prev = protocol.receipt_hash(r)


def test_full_session_several_calls_and_close():
    pair = Pair()
    pair.open()
    texts = []
    for i in range(4):
        settled = pair.call(f"hello {i}", [("Hi", 1), (" there", 2), (f" #{i}", 1)], tokens_in=12)
        assert isinstance(settled, protocol.ReceiptSettled)
        assert settled.text == f"Hi there #{i}"
        texts.append(settled.text)
    assert pair.consumer.receipts == pair.provider.receipts
    assert len(pair.consumer.receipts) == 4
    _check_chain(pair.consumer.receipts, pair.consumer.cap)
    r = pair.consumer.receipts[-1]
    assert r.tokens_in == 12 and r.tokens_out == 4
    assert r.cost == protocol.call_cost(PRICE, 12, 4)
    assert pair.consumer.cumulative == pair.provider.cumulative == 4 * r.cost
    pair.consumer.close(pair.now)
    (ev,) = pair.to_provider()
    assert isinstance(ev, protocol.SessionClosed)
    assert ev.close.cumulative == pair.provider.cumulative
    assert ev.close.last_receipt_hash == protocol.receipt_hash(pair.provider.receipts[-1])
    assert pair.consumer.state is ConsumerState.CLOSED and pair.provider.state is ProviderState.CLOSED


def test_provider_close_reaches_consumer():
    pair = Pair()
    pair.open()
    pair.call("x", [("y", 1)])
    pair.provider.close(pair.now, reason="shutdown")
    (ev,) = pair.to_consumer()
    assert isinstance(ev, protocol.SessionClosed) and ev.close.reason == "shutdown"


def test_reject_ends_the_session():
    pair = Pair()
    pair.consumer.open(pair.now)
    pair.to_provider()
    pair.provider.reject_open("price_changed", "now 0.60/1.60")
    (ev,) = pair.to_consumer()
    assert isinstance(ev, protocol.Rejected) and ev.reject.reason == "price_changed"
    assert pair.consumer.state is ConsumerState.CLOSED
    with pytest.raises(protocol.IllegalTransition):
        pair.consumer.request((protocol.ChatMessage(role="user", content="x"),), 5)


def test_only_a_refused_session_withdraws_its_channel_and_the_half_settles_nothing():
    accepted = Pair()
    accepted.open()
    with pytest.raises(protocol.IllegalTransition):
        accepted.consumer.withdraw(b"r" * 16, accepted.now)
    pair = Pair()
    pair.consumer.open(pair.now)
    pair.to_provider()
    pair.provider.reject_open("capacity")
    pair.to_consumer()
    close = pair.consumer.withdraw(b"r" * 16, pair.now)
    assert pair.consumer.outgoing() == [close]
    half = close.escrow_close
    assert half.receipt is None and half.channel_id == pair.consumer.channel.channel_id
    protocol.verify(close, "sig", CONSUMER.public_key)
    protocol.verify(half, "consumer_sig", CONSUMER.public_key)


def test_provider_cannot_accept_other_prices():
    pair = Pair()
    pair.consumer.open(pair.now)
    pair.to_provider()
    with pytest.raises(protocol.IllegalTransition, match="price_changed"):
        pair.provider.accept_open(dataclasses.replace(PRICE, output_per_1k=1), 4096, pair.now)


@pytest.mark.parametrize(
    "change",
    [dict(price=dataclasses.replace(PRICE, input_per_1k=9)), dict(spend_cap=10**9), dict(model="other")],
)
def test_consumer_refuses_an_accept_with_other_terms(change):
    pair = Pair()
    pair.consumer.open(pair.now)
    pair.to_provider()
    pair.provider.accept_open(PRICE, 4096, pair.now)
    (accept,) = pair.provider.outgoing()
    forged = protocol.sign(dataclasses.replace(accept, **change), "sig", PROVIDER)
    with pytest.raises(protocol.TermsMismatch):
        pair.consumer.receive(forged, pair.now)
    assert pair.consumer.state is ConsumerState.ERROR


def test_call_n_plus_1_waits_for_the_counter_signature():
    pair = Pair()
    pair.open()
    pair.consumer.request((protocol.ChatMessage(role="user", content="a"),), 8)
    pair.to_provider()
    pair.provider.start_call(3, pair.now)
    pair.provider.chunk("b", 1)
    pair.provider.finish_call("stop", pair.now)
    # the consumer cannot request again before settling; a rogue consumer that skips the
    # counter-signature and sends the next request is refused by the provider
    rogue = protocol.Request(session_id=b"s" * 16, call_seq=1, messages=(protocol.ChatMessage(role="user", content="c"),),
                             max_tokens=8)
    with pytest.raises(protocol.UnexpectedMessage, match="counter-signed"):
        pair.provider.receive(rogue, pair.now)
    assert pair.provider.state is ProviderState.ERROR
    with pytest.raises(protocol.IllegalTransition):
        pair.consumer.request((protocol.ChatMessage(role="user", content="c"),), 8)


def test_provider_clamps_to_the_cap_and_refuses_when_nothing_fits():
    price = protocol.Price(input_per_1k=1000, output_per_1k=1000)  # 1 µc per token
    pair = Pair(price=price, cap=31)
    pair.open()
    settled = pair.call("x", [("t", 1)] * 50, tokens_in=10, max_tokens=20)
    assert settled.receipt.tokens_out == 20 and settled.receipt.cumulative == 30
    failed = pair.call("x", [("t", 1)], tokens_in=2)  # 2 µc of prompt, 1 µc left
    assert isinstance(failed, protocol.CallFailed) and failed.error.reason == "over_budget"
    settled = pair.call("x", [("t", 1)] * 5, tokens_in=0, max_tokens=5)  # the clamp leaves room for 1 token
    assert settled.receipt.tokens_out == 1 and settled.receipt.cumulative == 31
    with pytest.raises(protocol.SpendLimitReached):
        pair.consumer.request((protocol.ChatMessage(role="user", content="x"),), 5)
    assert pair.provider.cumulative == 31 and len(pair.provider.receipts) == 2


def test_context_too_long_and_expiry_are_refused_without_charge():
    pair = Pair(max_context=100)
    pair.open()
    failed = pair.call("x", [("t", 1)], tokens_in=101)
    assert failed.error.reason == "context_too_long"
    pair.now = 10_000  # the channel's expiry
    failed = pair.call("x", [("t", 1)], tokens_in=1)
    assert failed.error.reason == "expired"
    assert pair.consumer.cumulative == 0 and pair.consumer.receipts == []


def test_provider_cannot_stream_past_its_limit():
    pair = Pair()
    pair.open()
    pair.consumer.request((protocol.ChatMessage(role="user", content="a"),), 2)
    pair.to_provider()
    assert pair.provider.start_call(1, pair.now) == 2
    pair.provider.chunk("a", 2)
    with pytest.raises(protocol.SpendLimitReached):
        pair.provider.chunk("b", 1)
    assert pair.provider.state is ProviderState.ERROR


def test_open_with_a_forged_or_foreign_channel_is_refused():
    bad_agent_sig = dataclasses.replace(channel(), sig=protocol.sign(channel(), "sig", MALLORY).sig)
    for grant, err in ((bad_agent_sig, protocol.BadSignature), (channel(expires_at=50), protocol.Expired)):
        consumer = protocol.ConsumerSession(CONSUMER, session_id=b"s" * 16, provider=PROVIDER.peer_id, model="m",
                                            listing_seq=1, price=PRICE, channel=grant, spend_limit=10,
                                            max_context=4096)
        provider = protocol.ProviderSession(PROVIDER)
        msg = protocol.Open(session_id=b"s" * 16, consumer=CONSUMER.peer_id, provider=PROVIDER.peer_id, model="m",
                            listing_seq=1, price=PRICE, channel=grant, spend_limit=10, issued_at=100)
        with pytest.raises(err):
            provider.receive(protocol.sign(msg, "sig", CONSUMER), 100)
        (reject,) = provider.outgoing()  # the machine, not its caller, tells the consumer why
        assert isinstance(reject, protocol.Reject) and reject.reason == "escrow_invalid"
        assert consumer.state is ConsumerState.IDLE
    with pytest.raises(protocol.InvalidMessage):
        protocol.ConsumerSession(MALLORY, session_id=b"s" * 16, provider=PROVIDER.peer_id, model="m", listing_seq=1,
                                 price=PRICE, channel=channel(), spend_limit=10, max_context=4096)
    assert AGENT.peer_id != MALLORY.peer_id


def _pending_receipt(pair, tokens_in=5, pieces=(("ab", 2),)):
    pair.consumer.request((protocol.ChatMessage(role="user", content="q"),), 16)
    pair.to_provider()
    pair.provider.start_call(tokens_in, pair.now)
    for text, n in pieces:
        pair.provider.chunk(text, n)
    receipt = pair.provider.finish_call("stop", pair.now)
    chunks = [m for m in pair.provider.outgoing() if isinstance(m, protocol.Chunk)]
    for c in chunks:
        pair.consumer.receive(c, pair.now)
    return receipt


def _resign(r, **changes):
    return protocol.sign(dataclasses.replace(r, provider_sig=b"", **changes), "provider_sig", PROVIDER)


@pytest.mark.parametrize(
    "tamper,error",
    [
        (lambda r: _resign(r, output_hash=bytes(32)), protocol.ReceiptHashMismatch),
        (lambda r: _resign(r, input_hash=bytes(32)), protocol.ReceiptHashMismatch),
        (lambda r: _resign(r, tokens_out=r.tokens_out + 1), protocol.ReceiptPriceMismatch),
        (lambda r: _resign(r, tokens_in=r.tokens_in + 1, cost=r.cost + 500, cumulative=r.cumulative + 500),
         None),  # more input tokens at the right price: not provable by the consumer, accepted
        (lambda r: _resign(r, cost=r.cost + 1, cumulative=r.cumulative + 1), protocol.ReceiptPriceMismatch),
        (lambda r: _resign(r, price=dataclasses.replace(r.price, input_per_1k=1)), protocol.ReceiptPriceMismatch),
        (lambda r: _resign(r, cumulative=r.cumulative + 1), protocol.ReceiptChainBroken),
        (lambda r: _resign(r, prev_hash=b"x" * 32), protocol.ReceiptChainBroken),
        (lambda r: _resign(r, channel_id=b"d" * 16), protocol.TermsMismatch),
        (lambda r: dataclasses.replace(r, cost=r.cost + 1), protocol.BadSignature),
        (lambda r: protocol.sign(r, "provider_sig", MALLORY), protocol.BadSignature),
    ],
)
def test_consumer_never_countersigns_a_bad_receipt(tamper, error):
    pair = Pair()
    pair.open()
    pair.call("first", [("ok", 1)])
    receipt = _pending_receipt(pair)
    bad = tamper(receipt)
    if error is None:
        (ev,) = pair.consumer.receive(bad, pair.now)
        assert isinstance(ev, protocol.ReceiptSettled)
        return
    with pytest.raises(error):
        pair.consumer.receive(bad, pair.now)
    assert pair.consumer.state is ConsumerState.ERROR
    assert len(pair.consumer.receipts) == 1
    assert not any(isinstance(m, protocol.CounterSign) for m in pair.consumer.outgoing())


def test_receipt_over_cap_is_refused():
    price = protocol.Price(input_per_1k=1000, output_per_1k=1000)
    pair = Pair(price=price, cap=10)
    pair.open()
    pair.consumer.request((protocol.ChatMessage(role="user", content="q"),), 16)
    pair.to_provider()
    pair.provider.start_call(2, pair.now)
    pair.provider.chunk("x" * 8, 8)
    pair.provider.finish_call("stop", pair.now)
    [m for m in pair.provider.outgoing() if isinstance(m, protocol.Chunk) and pair.consumer.receive(m, pair.now)]
    # a dishonest provider bills the prompt as 9 tokens: cost 17 > cap 10
    r = pair.provider._pending
    forged = _resign(r, tokens_in=9, cost=17, cumulative=17)
    with pytest.raises(protocol.ReceiptOverCap):
        pair.consumer.receive(forged, pair.now)


def test_replayed_receipt_and_countersign():
    pair = Pair()
    pair.open()
    first = pair.call("a", [("b", 1)]).receipt
    with pytest.raises(protocol.ReceiptReplay):
        pair.consumer.receive(first, pair.now)
    pair2 = Pair()
    pair2.open()
    r = pair2.call("a", [("b", 1)]).receipt
    cs = protocol.CounterSign(session_id=r.session_id, call_seq=0, receipt_hash=protocol.receipt_hash(r),
                              consumer_sig=r.consumer_sig)
    with pytest.raises(protocol.ReceiptReplay):
        pair2.provider.receive(cs, pair2.now)


def test_forged_countersign_is_refused_by_the_provider():
    pair = Pair()
    pair.open()
    receipt = _pending_receipt(pair)
    forged = protocol.sign(receipt, "consumer_sig", MALLORY)
    cs = protocol.CounterSign(session_id=receipt.session_id, call_seq=0, receipt_hash=protocol.receipt_hash(receipt),
                              consumer_sig=forged.consumer_sig)
    with pytest.raises(protocol.BadSignature):
        pair.provider.receive(cs, pair.now)
    assert pair.provider.receipts == []


def test_error_state_is_terminal():
    pair = Pair()
    pair.open()
    with pytest.raises(protocol.UnexpectedMessage):
        pair.consumer.receive(protocol.Chunk(session_id=b"s" * 16, call_seq=0, index=0, text="x", tokens=1), pair.now)
    with pytest.raises(protocol.IllegalTransition, match="error state"):
        pair.consumer.close(pair.now)


# ---- acknowledgements: a counter-signature is delivered or known to be in doubt -------------


def _counter_signed(pair):
    """Run a call up to the provider's Countersigned; return (receipt, the provider's ack)."""
    pair.consumer.request((protocol.ChatMessage(role="user", content="a"),), 8)
    pair.to_provider()
    pair.provider.start_call(3, pair.now)
    pair.provider.chunk("b", 1)
    pair.provider.finish_call("stop", pair.now)
    settled = pair.to_consumer()[-1]  # the chunk, then the receipt
    assert pair.consumer.unacked == settled.receipt
    (countersigned,) = pair.to_provider()
    (ack,) = pair.provider.outgoing()
    assert isinstance(ack, protocol.CounterSignAck)
    return countersigned.receipt, ack


def test_the_provider_acknowledges_each_counter_signature_and_the_consumer_checks_it():
    pair = Pair()
    pair.open()
    receipt, ack = _counter_signed(pair)
    assert ack.receipt_hash == protocol.receipt_hash(receipt) and ack.call_seq == receipt.call_seq
    protocol.verify(ack, "sig", PROVIDER.public_key)
    (ev,) = pair.consumer.receive(ack, pair.now)
    assert isinstance(ev, protocol.CountersignConfirmed) and ev.ack == ack and ev.receipt == receipt
    assert pair.consumer.unacked is None
    with pytest.raises(protocol.UnexpectedMessage, match="no counter-signature awaiting"):
        pair.consumer.receive(ack, pair.now)  # a second ack acknowledges nothing


@pytest.mark.parametrize("forge", ["other signer", "other receipt"])
def test_a_forged_acknowledgement_is_refused(forge):
    pair = Pair()
    pair.open()
    _, ack = _counter_signed(pair)
    if forge == "other signer":
        bad, error = protocol.sign(dataclasses.replace(ack, sig=b""), "sig", MALLORY), protocol.BadSignature
    else:
        bad = protocol.sign(dataclasses.replace(ack, receipt_hash=bytes(32), sig=b""), "sig", PROVIDER)
        error = protocol.ReceiptHashMismatch
    with pytest.raises(error):
        pair.consumer.receive(bad, pair.now)
    assert pair.consumer.state is ConsumerState.ERROR


def test_the_answer_to_the_next_call_proves_delivery_without_the_ack():
    pair = Pair()
    pair.open()
    receipt, _ = _counter_signed(pair)  # the ack is lost
    pair.consumer.request((protocol.ChatMessage(role="user", content="c"),), 8)
    pair.to_provider()
    pair.provider.start_call(3, pair.now)
    pair.provider.chunk("d", 1)
    proof, chunk = pair.to_consumer()
    assert isinstance(proof, protocol.CountersignConfirmed) and proof.ack is None and proof.receipt == receipt
    assert isinstance(chunk, protocol.ChunkReceived) and pair.consumer.unacked is None


def test_a_redelivered_receipt_is_checked_against_both_signatures_and_its_sender():
    pair = Pair()
    pair.open()
    receipt, _ = _counter_signed(pair)
    protocol.check_delivered(receipt, PROVIDER.peer_id, CONSUMER.peer_id)
    with pytest.raises(protocol.TermsMismatch, match="another provider"):
        protocol.check_delivered(receipt, MALLORY.peer_id, CONSUMER.peer_id)
    with pytest.raises(protocol.TermsMismatch, match="consumer may deliver"):
        protocol.check_delivered(receipt, PROVIDER.peer_id, MALLORY.peer_id)
    forged = protocol.sign(dataclasses.replace(receipt, consumer_sig=b""), "consumer_sig", MALLORY)
    with pytest.raises(protocol.BadSignature):
        protocol.check_delivered(forged, PROVIDER.peer_id, CONSUMER.peer_id)
    foreign = protocol.sign(dataclasses.replace(receipt, provider_sig=b""), "provider_sig", MALLORY)
    with pytest.raises(protocol.BadSignature):
        protocol.check_delivered(foreign, PROVIDER.peer_id, CONSUMER.peer_id)
    ack = protocol.acknowledge(receipt, PROVIDER)
    protocol.verify_ack(ack, receipt)


def test_an_ack_not_yet_sent_can_be_withheld_when_the_receipt_cannot_be_stored():
    pair = Pair()
    pair.open()
    pair.consumer.request((protocol.ChatMessage(role="user", content="a"),), 8)
    pair.to_provider()
    pair.provider.start_call(3, pair.now)
    pair.provider.chunk("b", 1)
    pair.provider.finish_call("stop", pair.now)
    pair.to_consumer()
    pair.to_provider()
    assert pair.provider.withhold_ack() is True
    assert pair.provider.outgoing() == [] and pair.provider.withhold_ack() is False
    assert pair.consumer.unacked is not None  # still in doubt: the consumer redelivers it


def test_a_receipt_acknowledged_out_of_the_session_is_no_longer_in_doubt():
    pair = Pair()
    pair.open()
    receipt, _ = _counter_signed(pair)
    pair.consumer.confirmed(dataclasses.replace(receipt, call_seq=7))  # another receipt: nothing changes
    assert pair.consumer.unacked == receipt
    pair.consumer.confirmed(receipt)
    assert pair.consumer.unacked is None
