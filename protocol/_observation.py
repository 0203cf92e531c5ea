"""Market observations: one node's signed figures for one model over one hour.

A consumer observes what it paid; a provider what it served and the demand it turned away. Each
node signs at most one ``Observation`` per (role, model, hour) once the hour is over, and gossips
it; everyone aggregates them into the market's price distribution and trend (``node market``) and
a provider's advice (``node advise``). An observation is its observer's word: nothing here proves
the figures (receipts stay private), so readers count observers, not the volumes they claim
(node/insight states how).
"""

from __future__ import annotations

import dataclasses

from ._codec import Bytes, ListOf, Nested, PeerId, Str, UInt, message, record, wire
from ._errors import TermsMismatch
from ._identity import public_key_from_peer_id
from ._signing import verify

__all__ = ["HOUR_S", "MAX_OBSERVATION_BYTES", "OBSERVATION_ROLES", "Observation", "PricePoint", "check_observation"]

HOUR_S = 3600
OBSERVATION_ROLES = ("consumer", "provider")
MAX_OBSERVATION_BYTES = 4096
_COUNT = UInt(1 << 32)
_AMOUNT = UInt(10**15)


@record
@dataclasses.dataclass(frozen=True, slots=True)
class PricePoint:
    """Calls made (or served) at one price, per 1K tokens, in µc."""

    input_per_1k: int = wire(_AMOUNT)
    output_per_1k: int = wire(_AMOUNT)
    calls: int = wire(_COUNT)


@message("observation", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    """``observer``'s figures, as ``role``, for ``model`` in the hour starting at ``hour``."""

    observer: str = wire(PeerId())
    role: str = wire(Str(choices=OBSERVATION_ROLES))
    model: str = wire(Str(128, min_bytes=1))
    hour: int = wire(UInt())  # unix seconds, a multiple of HOUR_S
    calls: int = wire(_COUNT)  # attempted (consumer) or admitted (provider)
    completed: int = wire(_COUNT)  # settled with a doubly-signed receipt
    tokens_in: int = wire(UInt(1 << 48))
    tokens_out: int = wire(UInt(1 << 48))
    value: int = wire(_AMOUNT)  # µc paid (consumer) or earned (provider) for the completed calls
    turned_away: int = wire(_COUNT)  # provider: sessions and calls refused for capacity
    prices: tuple[PricePoint, ...] = wire(ListOf(Nested(PricePoint), 16))
    issued_at: int = wire(UInt())
    sig: bytes = wire(Bytes(max_len=64), default=b"")


def check_observation(observation: Observation, now: int) -> None:
    """Raise unless ``observation`` is signed by its observer and its figures are consistent: a
    whole past hour, completed within calls, price points that count completed calls.

    Raises:
        BadSignature: not the observer's signature.
        TermsMismatch: inconsistent figures, or an hour not over yet.
    """
    verify(observation, "sig", public_key_from_peer_id(observation.observer))
    o = observation
    if o.hour % HOUR_S or o.hour + HOUR_S > now + 300:
        raise TermsMismatch("an observation covers one whole hour that is over")
    if o.completed > o.calls:
        raise TermsMismatch("more calls completed than made")
    if sum(p.calls for p in o.prices) != o.completed:
        raise TermsMismatch("the price points do not count the completed calls")
    if len({(p.input_per_1k, p.output_per_1k) for p in o.prices}) != len(o.prices):
        raise TermsMismatch("a price appears twice")
