"""SLA targets measured from the provider's records; a breach discounts the receipts, visibly."""

from __future__ import annotations

import pytest

import protocol
from node.provider._offers import Offer
from node.provider._sla import SlaConfig, SlaTracker, parse_sla
from tests.node.session_rig import ScriptedBackend, session_rig


def test_targets():
    t = SlaTracker(SlaConfig(ttft_ms=100, completion_rate=0.9, window=10, penalty_permille=200))
    assert t.breach("m") is None and t.discount("m") == 0
    for _ in range(9):
        t.record("m", 50, True)
    t.record("m", 500, True)  # one slow call in ten: the p95 is that call
    assert "p95" in t.breach("m") and t.discount("m") == 200
    for _ in range(10):
        t.record("m", 50, True)
    assert t.breach("m") is None
    t.record("m", None, False)
    t.record("m", None, False)
    assert "completion rate 80.0%" in t.breach("m")
    down = SlaTracker(SlaConfig(availability=0.99, penalty_permille=50), availability=lambda: 0.5)
    assert "availability" in down.breach("any") and down.discount("any") == 50
    with pytest.raises(ValueError):
        parse_sla({"penalty_permille": 2000})
    with pytest.raises(ValueError, match="unknown"):
        parse_sla({"ttft": 1})


async def test_a_breach_shows_as_a_discount_in_the_receipts_and_the_payment():
    the_offer = Offer(model="m", backend="builtin", input_price=500_000, output_price=1_500_000)
    slow = ScriptedBackend(delay_s=0.05)  # 50 ms to the first token: over the 5 ms target
    async with session_rig({"m": the_offer}, {"m": slow}, tag="sla",
                          sla=SlaTracker(SlaConfig(ttft_ms=5, penalty_permille=250))) as rig:
        async with rig.session(await rig.open_channel(cap=100_000)) as session:
            r = (await session.call([{"role": "user", "content": "hi"}], 8)).receipt
        assert r.discount_permille == 250
        full = protocol.call_cost(the_offer.to_model_offer().price, r.tokens_in, r.tokens_out)
        assert r.cost == full * 750 // 1000 < full
        assert rig.balance(rig.provider_id).available == r.cumulative  # paid the discounted amount
