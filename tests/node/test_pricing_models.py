"""Dynamic pricing: bounded, monotonic in utilization, integer, and pinned at accept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from node.provider._pricing_models import DynamicPricing, parse_dynamic

models = st.builds(DynamicPricing, demand_threshold=st.floats(0, 1), max_multiplier=st.floats(1, 100),
                   adjustment_interval_s=st.just(30.0))
prices = st.builds(protocol.Price, input_per_1k=st.integers(0, 10**9), output_per_1k=st.integers(0, 10**9),
                   min_charge=st.integers(0, 10**6))
util = st.floats(-1, 2, allow_nan=False)


@given(models, prices, util, util)
def test_bounded_and_monotonic_in_utilization(model, base, u1, u2):
    lo, hi = sorted((u1, u2))
    p_lo, p_hi = model.price(base, lo), model.price(base, hi)
    assert p_lo.input_per_1k <= p_hi.input_per_1k and p_lo.output_per_1k <= p_hi.output_per_1k
    for p in (p_lo, p_hi):
        assert base.input_per_1k <= p.input_per_1k <= -(-base.input_per_1k * round(model.max_multiplier * 1000) // 1000)
        assert type(p.input_per_1k) is int and p.min_charge == base.min_charge


def test_the_curve():
    d = DynamicPricing(demand_threshold=0.5, max_multiplier=3.0)
    base = protocol.Price(input_per_1k=1000, output_per_1k=3000)
    assert d.price(base, 0.0) == d.price(base, 0.5) == base
    assert d.price(base, 0.75) == protocol.Price(input_per_1k=2000, output_per_1k=6000)
    assert d.price(base, 1.0) == protocol.Price(input_per_1k=3000, output_per_1k=9000)


def test_config():
    assert parse_dynamic(None) is None
    assert parse_dynamic({"max_multiplier": 2}).max_multiplier == 2
    with pytest.raises(ValueError):
        parse_dynamic({"max_multiplier": 0.5})
    with pytest.raises(ValueError, match="unknown"):
        parse_dynamic({"surge": 2})


async def test_the_price_rises_with_load_and_stays_pinned_for_running_sessions():
    from node.consumer._session_client import SessionRejected
    from node.provider._offers import Offer
    from tests.node.session_rig import ScriptedBackend, session_rig

    surge = DynamicPricing(demand_threshold=0.0, max_multiplier=2.0)
    the_offer = Offer(model="m", backend="builtin", input_price=1000, output_price=1000, max_concurrent=2)

    async with session_rig({"m": the_offer}, {"m": ScriptedBackend()}, tag="surge",
                           dynamic_pricing=surge) as rig:
        idle_price = protocol.Price(input_per_1k=1000, output_per_1k=1000)
        async with rig.session(await rig.open_channel(cap=100_000), price=idle_price) as first:
            with pytest.raises(SessionRejected) as changed:  # one of two slots busy: 1.5x now
                async with rig.session(await rig.open_channel(cap=100_000), price=idle_price):
                    pass
            assert changed.value.reason == "price_changed" and "1500/1500" in changed.value.detail
            busy = protocol.Price(input_per_1k=1500, output_per_1k=1500)
            async with rig.session(await rig.open_channel(cap=100_000), price=busy) as second:
                r2 = (await second.call([{"role": "user", "content": "hi"}], 8)).receipt
            r1 = (await first.call([{"role": "user", "content": "hi"}], 8)).receipt
        assert r1.price == idle_price and r2.price == busy  # each pinned at its own accept
