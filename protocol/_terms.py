"""The one owner of a session's price: the terms a session pins, from the offer as listed.

Routing ranks on it, a run budgets with it, the consumer opens with it and the provider admits
only an Open that offers exactly it (docs/DESIGN.md, "Money"). Apart from ``_pricing`` because
it reads a ``ModelOffer`` (``_messages``), which itself builds on ``Price``.
"""

from __future__ import annotations

import dataclasses

from ._errors import InvalidMessage
from ._messages import ModelOffer
from ._pricing import Price, _ceil_div

__all__ = ["session_terms"]


def session_terms(offer: ModelOffer, *, tier: str = "", batch_calls: int = 0,
                  contract_price: Price | None = None) -> Price:
    """The price a session pins, from the offer as listed (which carries the dynamic price).

    A fixed-rate contract's price replaces the listed terms altogether — tier price and batch
    discount included — keeping only the listed offer's ``min_charge``. Without one: the chosen
    tier's price (else the offer's), less ``batch_discount_permille`` on each per-1K rate, rounded
    up, when the session declares at least ``batch_min_calls`` calls; ``min_charge`` stays the
    tier's. A tier is named on the Open either way, so an unknown one is refused even under a
    contract.

    Args:
        offer: the model offer as listed (the listing the Accept pins against).
        tier: the tier named on the Open; "" for the offer's own price.
        batch_calls: the calls the Open declares.
        contract_price: the rate of a fixed-rate contract in force between the two peers, if any.

    Returns:
        The Price both sides put on the Open and the Accept.

    Raises:
        InvalidMessage: the offer has no such tier.
    """
    price = offer.price
    if tier:
        match = [t for t in offer.tiers if t.name == tier]
        if not match:
            raise InvalidMessage(f"{offer.name} has no {tier} tier")
        price = match[0].price
    if contract_price is not None:
        return dataclasses.replace(contract_price, min_charge=offer.price.min_charge)
    if offer.batch_min_calls and batch_calls >= offer.batch_min_calls and offer.batch_discount_permille:
        keep = 1000 - offer.batch_discount_permille
        price = Price(input_per_1k=_ceil_div(price.input_per_1k * keep, 1000),
                      output_per_1k=_ceil_div(price.output_per_1k * keep, 1000), min_charge=price.min_charge)
    return price
