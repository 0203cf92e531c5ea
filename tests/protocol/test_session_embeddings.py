"""Embeddings calls through both machines: one embed_result, a receipt billing input tokens only,
no cancel, and every dishonest variation the consumer refuses."""

from __future__ import annotations

import dataclasses
import struct

import pytest

import protocol
from protocol import ConsumerState, ProviderState
from tests.support import PRICE, PROVIDER, Pair

INPUTS = ("a cat sat on the mat", "a feline rested on the rug")


def _vectors(n: int, dims: int) -> bytes:
    return struct.pack(f"<{n * dims}f", *(float(i % 7) / 7 for i in range(n * dims)))


def _opened() -> Pair:
    pair = Pair()
    pair.open()
    return pair


def _start(pair: Pair, inputs=INPUTS, dimensions: int = 0, tokens_in: int = 12):
    sent = pair.consumer.embed(inputs, dimensions)
    (ev,) = pair.to_provider()
    assert isinstance(ev, protocol.CallRequested) and ev.request == sent
    assert pair.provider.start_call(tokens_in, pair.now) == 0
    return sent


def _resign(r, **changes):
    return protocol.sign(dataclasses.replace(r, provider_sig=b"", **changes), "provider_sig", PROVIDER)


def test_an_embeddings_call_settles_with_its_vectors_and_bills_input_only():
    pair = _opened()
    _start(pair, tokens_in=12)
    vectors = _vectors(2, 4)
    pair.provider.embed_result(4, vectors)
    pair.provider.finish_call("stop", pair.now)
    events = pair.to_consumer()
    assert [type(e) for e in events] == [protocol.EmbeddingsReceived, protocol.ReceiptSettled]
    assert events[0].result.vectors == vectors and events[0].result.dims == 4
    settled = events[1]
    assert (settled.text, settled.cancelled, settled.tool_calls) == ("", False, ())
    r = settled.receipt
    assert r.tokens_in == 12 and r.tokens_out == 0 and r.cost == protocol.call_cost(PRICE, 12, 0)
    assert r.output_hash == protocol.embedding_hash(4, vectors)
    (countersigned,) = pair.to_provider()
    assert isinstance(countersigned, protocol.Countersigned)
    (acked,) = pair.to_consumer()
    assert isinstance(acked, protocol.CountersignConfirmed)
    protocol.verify(pair.consumer.receipts[-1], "consumer_sig", pair.consumer._signer.public_key)
    # the session goes on with a chat call
    settled = pair.call("hi", [("hello", 1)])
    assert isinstance(settled, protocol.ReceiptSettled) and settled.text == "hello"


def test_the_provider_bills_at_most_the_embed_bound_and_no_context_check():
    pair = _opened()
    sent = _start(pair, tokens_in=100_000)  # over max_context 4096: inputs are each their own context
    pair.provider.embed_result(3, _vectors(2, 3))
    receipt = pair.provider.finish_call("stop", pair.now)
    assert receipt.tokens_in == protocol.request_token_bound(sent)
    events = pair.to_consumer()
    assert isinstance(events[-1], protocol.ReceiptSettled)


def test_an_embeddings_call_over_budget_is_refused():
    pair = Pair(cap=1000)  # one input token fits, 500 do not
    pair.open()
    pair.consumer.embed(("x" * 1000,))
    pair.to_provider()
    assert pair.provider.start_call(500, pair.now) is None
    (failed,) = pair.to_consumer()
    assert isinstance(failed, protocol.CallFailed) and failed.error.reason == "over_budget"


def test_the_consumer_refuses_to_send_no_input_or_too_many():
    with pytest.raises(protocol.InvalidMessage, match="at least one input"):
        _opened().consumer.embed(())
    with pytest.raises(protocol.InvalidMessage, match="at most 64"):
        _opened().consumer.embed(("x",) * (protocol.MAX_EMBED_INPUTS + 1))
    pair = _opened()
    forged = protocol.EmbedRequest(session_id=pair.consumer.session_id, call_seq=0, inputs=())
    assert pair.provider.receive(forged, pair.now) == []
    (error,) = pair.provider.outgoing()
    assert isinstance(error, protocol.CallError) and error.reason == "bad_request"


def test_an_embeddings_call_cannot_be_cancelled():
    pair = _opened()
    _start(pair)
    assert pair.consumer.embedding
    with pytest.raises(protocol.IllegalTransition, match="cannot be cancelled"):
        pair.consumer.cancel()
    pair = _opened()
    _start(pair)
    with pytest.raises(protocol.UnexpectedMessage, match="cannot be cancelled"):
        pair.provider.receive(protocol.Cancel(session_id=pair.consumer.session_id, call_seq=0, chunks=0), pair.now)


def test_the_provider_machine_keeps_an_embeddings_call_to_its_shape():
    pair = _opened()
    _start(pair)
    with pytest.raises(protocol.IllegalTransition, match="streams no chunks"):
        pair.provider.chunk("x", 1)
    pair = _opened()
    _start(pair)
    with pytest.raises(protocol.IllegalTransition, match="after its embed_result"):
        pair.provider.finish_call("stop", pair.now)
    pair = _opened()
    _start(pair, dimensions=4)
    with pytest.raises(protocol.InvalidMessage, match="asked 4"):
        pair.provider.embed_result(3, _vectors(2, 3))
    pair = _opened()
    _start(pair)
    with pytest.raises(protocol.InvalidMessage, match="expected 32"):
        pair.provider.embed_result(4, _vectors(1, 4))
    pair = _opened()
    _start(pair)
    pair.provider.embed_result(4, _vectors(2, 4))
    with pytest.raises(protocol.IllegalTransition, match="sent already"):
        pair.provider.embed_result(4, _vectors(2, 4))
    pair = _opened()
    pair.consumer.request((protocol.ChatMessage(role="user", content="q"),), 8)
    pair.to_provider()
    pair.provider.start_call(5, pair.now)
    with pytest.raises(protocol.IllegalTransition, match="embeddings call only"):
        pair.provider.embed_result(4, _vectors(2, 4))


# ---- what the consumer refuses --------------------------------------------------------------------


def _result(pair: Pair, dims: int = 4, n: int = 2, **changes) -> protocol.EmbedResult:
    base = dict(session_id=pair.consumer.session_id, call_seq=pair.consumer.next_seq, dims=dims,
                vectors=_vectors(n, dims))
    return protocol.EmbedResult(**{**base, **changes})


@pytest.mark.parametrize("dimensions, result, says", [
    (0, dict(dims=4, n=3), "expected 32"),
    (0, dict(dims=4, n=1), "expected 32"),
    (0, dict(dims=0, n=2), "0 dimensions"),
    (8, dict(dims=4, n=2), "expected 8"),
    (0, dict(call_seq=5), "for call 5"),
])
def test_vectors_of_the_wrong_size_or_call_are_refused(dimensions, result, says):
    pair = _opened()
    pair.consumer.embed(INPUTS, dimensions)
    with pytest.raises(protocol.UnexpectedMessage, match=says):
        pair.consumer.receive(_result(pair, **result), pair.now)
    assert pair.consumer.state is ConsumerState.ERROR


def test_a_result_sent_twice_a_result_on_a_chat_call_and_a_chunk_on_an_embed_call_are_refused():
    pair = _opened()
    pair.consumer.embed(INPUTS)
    pair.consumer.receive(_result(pair), pair.now)
    with pytest.raises(protocol.UnexpectedMessage, match="twice"):
        pair.consumer.receive(_result(pair), pair.now)
    pair = _opened()
    pair.consumer.request((protocol.ChatMessage(role="user", content="q"),), 8)
    with pytest.raises(protocol.UnexpectedMessage, match="on a chat call"):
        pair.consumer.receive(_result(pair), pair.now)
    pair = _opened()
    pair.consumer.embed(INPUTS)
    chunk = protocol.Chunk(session_id=pair.consumer.session_id, call_seq=0, index=0, text="x", tokens=1)
    with pytest.raises(protocol.UnexpectedMessage, match="embeddings call"):
        pair.consumer.receive(chunk, pair.now)


def _honest_receipt(pair: Pair, tokens_in: int = 12):
    """The provider's receipt of an embeddings call, with the consumer holding the result."""
    _start(pair, tokens_in=tokens_in)
    result = pair.provider.embed_result(4, _vectors(2, 4))
    receipt = pair.provider.finish_call("stop", pair.now)
    pair.provider.outgoing()
    return result, receipt


def test_a_receipt_before_the_result_is_refused():
    pair = _opened()
    _, receipt = _honest_receipt(pair)
    with pytest.raises(protocol.UnexpectedMessage, match="before its embed_result"):
        pair.consumer.receive(receipt, pair.now)


@pytest.mark.parametrize("tamper, error, says", [
    (lambda r: dict(output_hash=protocol.embedding_hash(4, bytes(32))), protocol.ReceiptHashMismatch, "vectors"),
    (lambda r: dict(output_hash=protocol.output_hash("")), protocol.ReceiptHashMismatch, "vectors"),
    (lambda r: dict(tokens_out=1, cost=protocol.call_cost(PRICE, r.tokens_in, 1),
                    cumulative=protocol.call_cost(PRICE, r.tokens_in, 1)), protocol.ReceiptPriceMismatch, "not 0"),
    (lambda r: dict(tokens_in=r.tokens_in + 1, cost=protocol.call_cost(PRICE, r.tokens_in + 1, 0),
                    cumulative=protocol.call_cost(PRICE, r.tokens_in + 1, 0)), protocol.ReceiptPriceMismatch, "over"),
    (lambda r: dict(input_hash=bytes(32)), protocol.ReceiptHashMismatch, "input hash"),
])
def test_a_dishonest_embeddings_receipt_is_refused(tamper, error, says):
    pair = _opened()
    bound = protocol.request_token_bound(protocol.EmbedRequest(session_id=b"s" * 16, call_seq=0, inputs=INPUTS))
    result, receipt = _honest_receipt(pair, tokens_in=bound)
    pair.consumer.receive(result, pair.now)
    with pytest.raises(error, match=says):
        pair.consumer.receive(_resign(receipt, **tamper(receipt)), pair.now)
    assert pair.consumer.state is ConsumerState.ERROR and not pair.consumer.receipts
    assert pair.provider.state is ProviderState.AWAITING_COUNTERSIGN


def test_a_later_batch_of_another_size_is_refused_unpaid():
    """``expect_dims`` (not on the wire): a request split into calls pins the first call's size on the
    rest, so a provider that changes size half-way is refused before the consumer signs for it."""
    pair = _opened()
    sent = pair.consumer.embed(INPUTS, 0, expect_dims=4)
    assert sent.dimensions == 0  # the model's own size is still what is asked
    pair.to_provider()
    pair.provider.start_call(12, pair.now)
    pair.provider.embed_result(3, _vectors(2, 3))
    with pytest.raises(protocol.UnexpectedMessage, match="3 dimensions, expected 4"):
        pair.to_consumer()
    assert not pair.consumer.receipts
