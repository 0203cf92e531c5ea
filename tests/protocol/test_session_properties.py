"""Property: a consumer/provider pair driven through random sequences of legal and illegal
events never settles a bad receipt and never lets cumulative cost pass the cap."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import ConsumerState, ProviderState
from tests.support import CONSUMER, MALLORY, PROVIDER, Pair, any_message

TAMPERS = {
    "output_hash": lambda r: dict(output_hash=bytes(32)),
    "tokens_out": lambda r: dict(tokens_out=r.tokens_out + 1),
    "cost": lambda r: dict(cost=r.cost + 1, cumulative=r.cumulative + 1),
    "cumulative": lambda r: dict(cumulative=r.cumulative + 1),
    "prev_hash": lambda r: dict(prev_hash=b"\x01" * 32),
    "call_seq": lambda r: dict(call_seq=r.call_seq + 1),
    "model": lambda r: dict(model="other"),
    # bill the whole context as prompt at the right price: refused only when it passes the cap
    "overbill": lambda r: dict(tokens_in=4096, cost=protocol.call_cost(r.price, 4096, r.tokens_out),
                               cumulative=r.cumulative - r.cost + protocol.call_cost(r.price, 4096, r.tokens_out)),
}

call_op = st.tuples(st.just("call"), st.integers(0, 300), st.lists(st.integers(1, 40), max_size=6),
                    st.integers(0, 200))
tamper = st.tuples(st.just("tamper"), st.sampled_from(sorted(TAMPERS)))
attack = st.one_of(
        tamper,
        tamper,
        tamper,
        st.tuples(st.just("unsigned"), st.just(0)),
        st.tuples(st.just("forged"), st.just(0)),
        st.tuples(st.just("replay_receipt"), st.just(0)),
        st.tuples(st.just("replay_countersign"), st.just(0)),
        st.tuples(st.just("early_request"), st.just(0)),
        st.tuples(st.just("noise"), any_message),
        st.tuples(st.just("close"), st.booleans()),
)
# a run of legal calls with illegal events mixed in; every sequence ends with one attack
ops = st.tuples(st.lists(st.one_of(call_op, call_op, call_op, attack), max_size=12), attack).map(
    lambda t: [*t[0], t[1]]
)
prices = st.builds(protocol.Price, input_per_1k=st.integers(0, 5000), output_per_1k=st.integers(0, 5000),
                   min_charge=st.integers(0, 50))


def _check(pair: Pair) -> None:
    c, p = pair.consumer, pair.provider
    assert c.cumulative <= c.cap and p.cumulative <= c.cap
    prev, total = protocol.ZERO_HASH, 0
    for i, r in enumerate(c.receipts):
        protocol.verify(r, "provider_sig", PROVIDER.public_key)
        protocol.verify(r, "consumer_sig", CONSUMER.public_key)
        assert r.call_seq == i and r.prev_hash == prev
        assert r.cost == protocol.call_cost(r.price, r.tokens_in, r.tokens_out)
        total += r.cost
        assert r.cumulative == total <= c.cap
        prev = protocol.receipt_hash(r)
    assert p.receipts == c.receipts[: len(p.receipts)]


def _pending(pair: Pair, tokens_in: int, pieces: list[int], max_tokens: int = 64) -> protocol.Receipt | None:
    """Run a call up to the provider's receipt (chunks delivered); ``None`` if it was refused."""
    pair.consumer.request((protocol.ChatMessage(role="user", content="q"),), max_tokens)
    pair.to_provider()
    limit = pair.provider.start_call(tokens_in, pair.now)
    if limit is None:
        pair.to_consumer()
        return None
    for n in pieces:
        if n > limit:
            break
        limit -= n
        pair.provider.chunk("t" * n, n)
    pair.provider.finish_call("stop", pair.now)
    receipt = None
    for msg in pair.provider.outgoing():
        if isinstance(msg, protocol.Receipt):
            receipt = msg
        else:
            pair.consumer.receive(msg, pair.now)
    return receipt


def _expect_refusal(pair: Pair, bad: protocol.Receipt) -> None:
    before = list(pair.consumer.receipts)
    try:
        pair.consumer.receive(bad, pair.now)
    except protocol.RemoteProtocolError:
        assert pair.consumer.receipts == before
        assert not any(isinstance(m, protocol.CounterSign) for m in pair.consumer.outgoing())
        assert pair.consumer.state is ConsumerState.ERROR
        return
    raise AssertionError("the consumer settled a bad receipt")


@settings(max_examples=300)
@given(prices, st.integers(0, 40_000), ops)
def test_random_sequences_never_settle_bad_receipts_or_pass_the_cap(price, cap, sequence):
    pair = Pair(price=price, cap=cap)
    pair.open()
    for op in sequence:
        if pair.consumer.state is not ConsumerState.READY or pair.provider.state is not ProviderState.READY:
            break
        kind = op[0]
        if kind == "call":
            _, tokens_in, pieces, max_tokens = op
            try:
                receipt = _pending(pair, tokens_in, pieces, max_tokens)
            except protocol.SpendLimitReached:
                continue
            if receipt is not None:
                pair.consumer.receive(receipt, pair.now)
                pair.to_provider()
        elif kind in ("tamper", "unsigned", "forged"):
            try:
                receipt = _pending(pair, 5, [1, 2])
            except protocol.SpendLimitReached:
                continue
            if receipt is None:
                continue
            if kind == "tamper":
                changes = TAMPERS[op[1]](receipt)
                if op[1] == "overbill" and changes["cumulative"] <= pair.consumer.cap:
                    continue  # a dishonest token count within the cap is not provable by the consumer
                # re-signed by the provider: only the content is wrong (signatures: "unsigned", "forged")
                bad = protocol.sign(dataclasses.replace(receipt, provider_sig=b"", **changes), "provider_sig", PROVIDER)
            elif kind == "unsigned":
                bad = dataclasses.replace(receipt, provider_sig=b"")
            else:
                bad = protocol.sign(receipt, "provider_sig", MALLORY)
            _expect_refusal(pair, bad)
            break
        elif kind == "replay_receipt" and pair.consumer.receipts:
            _expect_refusal(pair, pair.consumer.receipts[-1])
            break
        elif kind == "replay_countersign" and pair.provider.receipts:
            r = pair.provider.receipts[-1]
            cs = protocol.CounterSign(session_id=r.session_id, call_seq=r.call_seq,
                                      receipt_hash=protocol.receipt_hash(r), consumer_sig=r.consumer_sig)
            try:
                pair.provider.receive(cs, pair.now)
            except protocol.ReceiptReplay:
                break
            raise AssertionError("a replayed counter-signature was taken")
        elif kind == "early_request":
            try:
                receipt = _pending(pair, 1, [1])
            except protocol.SpendLimitReached:
                continue
            if receipt is None:
                continue
            rogue = protocol.Request(session_id=b"s" * 16, call_seq=receipt.call_seq + 1,
                                     messages=(protocol.ChatMessage(role="user", content="z"),), max_tokens=1)
            try:
                pair.provider.receive(rogue, pair.now)
            except protocol.UnexpectedMessage:
                break
            raise AssertionError("the provider started call n+1 before call n was counter-signed")
        elif kind == "noise":
            before = list(pair.consumer.receipts)
            try:
                pair.consumer.receive(op[1], pair.now)
            except protocol.ProtocolError:
                assert pair.consumer.receipts == before
                break
            raise AssertionError(f"the consumer took a random {type(op[1]).__name__}")
        elif kind == "close":
            side = pair.consumer if op[1] else pair.provider
            side.close(pair.now)
            (pair.to_provider if op[1] else pair.to_consumer)()
            break
        _check(pair)
    _check(pair)
