"""Prices and costs in integer micro-credits (µc). No floats, ever.

1 credit = 1,000,000 µc. Prices are µc per 1,000 tokens, separately for input and output.
The cost of one call is ``max(min_charge, ceil((tokens_in*in_price + tokens_out*out_price) / 1000))``
(docs/DESIGN.md, "Money"). Decimal credit strings from the command line convert exactly or fail.

The price a session pins is derived from an offer in one place only: ``session_terms``
(``_terms``). This module is the arithmetic both build on.
"""

from __future__ import annotations

import dataclasses
import re

from ._codec import UInt, record, wire
from ._errors import InvalidMessage

__all__ = [
    "expected_call_cost",
    "discounted",
    "MICRO_PER_CREDIT",
    "Price",
    "call_cost",
    "max_output_tokens_within",
    "parse_credits",
    "format_credits",
]

MICRO_PER_CREDIT = 1_000_000
_MAX_PRICE = 10**12  # a million credits per 1K tokens: a sanity bound, not a business rule
_DECIMAL = re.compile(r"^(\d{1,12})(?:\.(\d{1,6}))?$")


@record
@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    """The terms one call is charged at: µc per 1K input and output tokens, and a minimum."""

    input_per_1k: int = wire(UInt(_MAX_PRICE))
    output_per_1k: int = wire(UInt(_MAX_PRICE))
    min_charge: int = wire(UInt(_MAX_PRICE), default=0)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def call_cost(price: Price, tokens_in: int, tokens_out: int) -> int:
    """The µc cost of one call of ``tokens_in`` prompt and ``tokens_out`` completion tokens."""
    if tokens_in < 0 or tokens_out < 0:
        raise InvalidMessage("token counts are never negative")
    raw = _ceil_div(tokens_in * price.input_per_1k + tokens_out * price.output_per_1k, 1000)
    return max(price.min_charge, raw)


def discounted(cost: int, discount_permille: int) -> int:
    """``cost`` less a discount of ``discount_permille`` thousandths, rounded down (in the payer's favour)."""
    if not 0 <= discount_permille <= 1000:
        raise InvalidMessage("a discount is 0 to 1000 thousandths")
    return cost * (1000 - discount_permille) // 1000


def max_output_tokens_within(price: Price, tokens_in: int, budget: int, ceiling: int) -> int:
    """The most completion tokens (up to ``ceiling``) whose call cost fits in ``budget`` µc.

    Returns -1 when even an empty completion of this prompt costs more than ``budget``.
    """
    if call_cost(price, tokens_in, 0) > budget:
        return -1
    if price.output_per_1k == 0:
        return ceiling
    # ceil((a + n*p) / 1000) <= budget  <=>  a + n*p <= 1000*budget
    n = (1000 * budget - tokens_in * price.input_per_1k) // price.output_per_1k
    return max(0, min(ceiling, n))


def parse_credits(text: str) -> int:
    """Exact µc of a decimal credit amount such as ``"0.50"`` (at most six decimals).

    Raises:
        ValueError: not a plain non-negative decimal with at most six decimals.
    """
    m = _DECIMAL.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an amount in credits (e.g. 0.50, at most 6 decimals)")
    whole, frac = m.group(1), (m.group(2) or "")
    return int(whole) * MICRO_PER_CREDIT + int(frac.ljust(6, "0"))


def format_credits(micro: int) -> str:
    """``1500000`` -> ``"1.500000"``: µc as credits with six decimals."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"


def expected_call_cost(terms: Price, prompt_tokens: int, max_tokens: int, max_context: int) -> int:
    """What one call may cost at ``terms``: the prompt (as much of it as the context holds) and a
    full ``max_tokens`` answer. Routing ranks on it; a one-call run budgets its channel with it.
    """
    return call_cost(terms, min(prompt_tokens, max_context), max_tokens)

