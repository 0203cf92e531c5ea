"""``session_terms``, the one owner of the price a session pins, against a spelled-out model of
the rule: a contract replaces the listed terms (keeping the offer's min_charge); otherwise the
tier's price, less the batch discount rounded up; an unknown tier is refused either way."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from protocol._messages import TIERS

prices = st.builds(protocol.Price, input_per_1k=st.integers(0, 10**7), output_per_1k=st.integers(0, 10**7),
                   min_charge=st.integers(0, 10**5))
tiers = st.lists(st.sampled_from(TIERS), unique=True, max_size=3).flatmap(
    lambda names: st.tuples(*(st.builds(protocol.Tier, name=st.just(n), price=prices,
                                        max_concurrent=st.integers(1, 8), priority=st.integers(1, 5))
                              for n in names)))
offers = st.builds(protocol.ModelOffer, name=st.just("m"), price=prices, max_context=st.integers(1, 1 << 16),
                   tiers=tiers, batch_min_calls=st.integers(0, 20), batch_discount_permille=st.integers(0, 1000))


def model_of_the_rule(offer, tier, batch_calls, contract_price):
    chosen = {t.name: t.price for t in offer.tiers}
    if tier and tier not in chosen:
        return None  # refused
    if contract_price is not None:
        return (contract_price.input_per_1k, contract_price.output_per_1k, offer.price.min_charge)
    base = chosen[tier] if tier else offer.price
    if offer.batch_min_calls > 0 and batch_calls >= offer.batch_min_calls:
        keep = Fraction(1000 - offer.batch_discount_permille, 1000)
        return (math.ceil(base.input_per_1k * keep), math.ceil(base.output_per_1k * keep), base.min_charge)
    return (base.input_per_1k, base.output_per_1k, base.min_charge)


@given(offers, st.sampled_from(("",) + TIERS), st.integers(0, 30), st.none() | prices)
def test_session_terms_follows_the_rule(offer, tier, batch_calls, contract_price):
    want = model_of_the_rule(offer, tier, batch_calls, contract_price)
    if want is None:
        with pytest.raises(protocol.InvalidMessage, match=tier):
            protocol.session_terms(offer, tier=tier, batch_calls=batch_calls, contract_price=contract_price)
        return
    got = protocol.session_terms(offer, tier=tier, batch_calls=batch_calls, contract_price=contract_price)
    assert (got.input_per_1k, got.output_per_1k, got.min_charge) == want


def test_examples():
    premium = protocol.Tier(name="premium", price=protocol.Price(input_per_1k=5000, output_per_1k=9000, min_charge=3),
                            max_concurrent=1, priority=3)
    offer = protocol.ModelOffer(name="m", price=protocol.Price(input_per_1k=1000, output_per_1k=2000, min_charge=7),
                                max_context=8, tiers=(premium,), batch_min_calls=10, batch_discount_permille=250)
    terms = protocol.session_terms
    assert terms(offer) == offer.price
    assert terms(offer, tier="premium") == premium.price
    assert terms(offer, batch_calls=9) == offer.price  # below the batch size
    assert terms(offer, batch_calls=10) == protocol.Price(input_per_1k=750, output_per_1k=1500, min_charge=7)
    assert terms(offer, tier="premium", batch_calls=50) == protocol.Price(input_per_1k=3750, output_per_1k=6750,
                                                                         min_charge=3)
    odd = protocol.ModelOffer(name="m", price=protocol.Price(input_per_1k=1, output_per_1k=3), max_context=8,
                              batch_min_calls=1, batch_discount_permille=500)
    assert terms(odd, batch_calls=1) == protocol.Price(input_per_1k=1, output_per_1k=2)  # rounded up
    contract = protocol.Price(input_per_1k=10, output_per_1k=20, min_charge=99)
    # a contract replaces tier and discount alike; the listed min_charge stays
    for tier, calls in (("", 0), ("premium", 0), ("", 50), ("premium", 50)):
        assert terms(offer, tier=tier, batch_calls=calls, contract_price=contract) == protocol.Price(
            input_per_1k=10, output_per_1k=20, min_charge=7)
    with pytest.raises(protocol.InvalidMessage, match="enterprise"):
        terms(offer, tier="enterprise")
    with pytest.raises(protocol.InvalidMessage, match="enterprise"):  # named on the Open, refused either way
        terms(offer, tier="enterprise", contract_price=contract)


def test_expected_call_cost_is_one_full_call_within_the_context():
    p = protocol.Price(input_per_1k=1000, output_per_1k=2000, min_charge=5)
    assert protocol.expected_call_cost(p, 500, 100, 4096) == protocol.call_cost(p, 500, 100)
    assert protocol.expected_call_cost(p, 9000, 100, 4096) == protocol.call_cost(p, 4096, 100)
    assert protocol.expected_call_cost(p, 0, 0, 4096) == 5
