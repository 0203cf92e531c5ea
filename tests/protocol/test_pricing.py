"""Integer micro-credit pricing: ceil rounding, min charge, exact decimal parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from protocol import Price, call_cost

prices = st.builds(Price, input_per_1k=st.integers(0, 10**9), output_per_1k=st.integers(0, 10**9),
                   min_charge=st.integers(0, 10**6))
tokens = st.integers(0, 1 << 20)


def test_design_formula_examples():
    p = Price(input_per_1k=500_000, output_per_1k=1_500_000)  # 0.50 / 1.50 credits per 1K
    assert call_cost(p, 1000, 1000) == 2_000_000
    assert call_cost(p, 1, 0) == 500  # 500_000 / 1000
    assert call_cost(Price(input_per_1k=1, output_per_1k=0), 1, 0) == 1  # ceil(1/1000)
    assert call_cost(Price(input_per_1k=1, output_per_1k=0, min_charge=7), 1, 0) == 7
    assert call_cost(Price(input_per_1k=0, output_per_1k=0), 10, 10) == 0


@given(prices, tokens, tokens, tokens, tokens)
def test_cost_is_monotonic_and_never_below_min_charge(p, a, b, c, d):
    lo_in, hi_in = sorted((a, b))
    lo_out, hi_out = sorted((c, d))
    assert call_cost(p, lo_in, lo_out) <= call_cost(p, hi_in, hi_out)
    assert call_cost(p, a, c) >= p.min_charge
    exact = a * p.input_per_1k + c * p.output_per_1k
    assert call_cost(p, a, c) * 1000 >= exact  # ceil never undercharges
    assert isinstance(call_cost(p, a, c), int)


@given(prices, tokens, st.integers(0, 10**12), st.integers(0, 1 << 20))
def test_max_output_tokens_within_is_the_largest_that_fits(p, tin, budget, ceiling):
    n = protocol.max_output_tokens_within(p, tin, budget, ceiling)
    if n < 0:
        assert call_cost(p, tin, 0) > budget
        return
    assert 0 <= n <= ceiling
    assert call_cost(p, tin, n) <= budget
    if n < ceiling:
        assert call_cost(p, tin, n + 1) > budget


@pytest.mark.parametrize(
    "text,micro",
    [("0.50", 500_000), ("1", 1_000_000), ("0.000001", 1), ("12.345678", 12_345_678), (" 2.5 ", 2_500_000)],
)
def test_parse_credits_is_exact(text, micro):
    assert protocol.parse_credits(text) == micro


@pytest.mark.parametrize("text", ["", "-1", "1e3", "0.0000001", "abc", "1.2.3", "nan", "0x10", "1,5"])
def test_parse_credits_refuses(text):
    with pytest.raises(ValueError):
        protocol.parse_credits(text)


@given(st.integers(0, 10**15))
def test_format_parse_round_trip(micro):
    assert protocol.parse_credits(protocol.format_credits(micro)) == micro
