"""Earnings add up to the micro-credit: the sum of the receipts served, split into what the agent
confirmed paying and pending."""

from __future__ import annotations

import random
import types

import pytest

import protocol
from node._receipts import ReceiptStore
from node.api._reports import earnings, parse_period
from tests.support import identity

PROVIDER = identity("books-provider")
CLIENTS = [identity(f"books-client-{i}") for i in range(3)]


def receipt(client, session: bytes, seq: int, cost: int, cumulative: int, model: str) -> protocol.Receipt:
    r = protocol.Receipt(session_id=session, call_seq=seq, model=model, provider=PROVIDER.peer_id,
                         consumer=client.peer_id, agent=PROVIDER.peer_id, channel_id=b"c" * 16, input_hash=b"i" * 32,
                         output_hash=b"o" * 32, tokens_in=1, tokens_out=1, finish_reason="stop",
                         price=protocol.Price(input_per_1k=0, output_per_1k=0), cost=cost, cumulative=cumulative,
                         prev_hash=bytes(32), issued_at=0)
    return protocol.sign(protocol.sign(r, "provider_sig", PROVIDER), "consumer_sig", client)


def test_earnings_equal_the_receipts_and_claims(tmp_path):
    store = ReceiptStore(tmp_path / "r.db")
    rng = random.Random(7)
    total = claimed = 0
    by_model: dict[str, int] = {}
    for s in range(12):
        client, model = rng.choice(CLIENTS), rng.choice(["a", "b"])
        cumulative, last = 0, None
        for seq in range(rng.randrange(1, 5)):
            cost = rng.randrange(0, 10_000)
            cumulative += cost
            last = receipt(client, bytes([s]) * 16, seq, cost, cumulative, model)
            store._put(last, "provider", 10)
            total += cost
            by_model[model] = by_model.get(model, 0) + cost
        if s % 3:  # two sessions in three were settled with the escrow: the agent said it paid them
            store.record_claim(PROVIDER.peer_id, b"c" * 16, last.session_id, cumulative, cumulative)
            store.mark_claimed(last)
            claimed += cumulative
    store._put(receipt(CLIENTS[0], b"x" * 16, 0, 999, 999, "a"), "consumer", None)  # what we paid: not earnings
    doc = earnings(types.SimpleNamespace(receipts=store), "1d", "model")
    assert doc == {"period": "1d", "total": total, "claimed": claimed, "pending": total - claimed, "forfeited": 0,
                   "by": by_model}
    by_client = earnings(types.SimpleNamespace(receipts=store), "1d", "client")["by"]
    assert sum(by_client.values()) == total and set(by_client) <= {c.peer_id for c in CLIENTS}
    hours = earnings(types.SimpleNamespace(receipts=store), "1d", "hour")["by"]
    assert sum(hours.values()) == total and all(k.endswith(":00Z") for k in hours)
    store.close()


@pytest.mark.parametrize("text,seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("10s", 10)])
def test_periods(text, seconds):
    assert parse_period(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "1w", "-1d", "1.5h"])
def test_bad_periods(text):
    with pytest.raises(ValueError):
        parse_period(text)
