"""Which model served a call: model commitments in listings, sessions and receipts.

- A ``ModelCommitment`` names the model behind an offer: for local weights (``kind="weights"``)
  the sha256 over the model's weight files and over its tokenizer and chat-template files, each
  in a stated order (node/verify/_commitment.py computes them); for an upstream API
  (``kind="upstream"``) the upstream's model id and host, and the plain fact that no weights
  can be named. Its id, ``commitment_id``, is a hash of its canonical body.
- A listing v2 (``ListingV2``) carries one per model (``ModelOfferV2.commitment``), and says
  whether the provider's greedy decoding is reproducible bit for bit (``reproducible``).
- A session's ``AcceptV2`` signs the id of the commitment the session is served under; the
  consumer refuses one that differs from the listing it chose.
- Receipt v1 is frozen, so a receipt names its commitment through its ``input_hash``: under a
  commitment it is ``committed_input_hash(request_hash, commitment_id)``, which binds the
  request and the model together under both signatures. Without one (``ZERO_HASH``) it stays
  the request hash, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib

from ._codec import Bool, Bytes, ListOf, Nested, Optional, Str, UInt, encode_body, message, record, wire
from ._messages import ZERO_HASH, Accept, Listing, ModelOffer

__all__ = [
    "COMMITMENT_KINDS",
    "ModelCommitment",
    "ModelOfferV2",
    "ListingV2",
    "AcceptV2",
    "LISTING_TYPES",
    "ACCEPT_TYPES",
    "commitment_id",
    "offer_commitment",
    "accepted_commitment",
    "committed_input_hash",
]

COMMITMENT_KINDS = ("weights", "upstream")
_HASH = Bytes(32)


@record
@dataclasses.dataclass(frozen=True, slots=True)
class ModelCommitment:
    """The model behind an offer. ``weights``: ``weights_hash`` over the weight files and
    ``tokenizer_hash`` over the tokenizer and chat-template files (``files`` of them in all);
    ``upstream``: the hashes are zero and ``upstream`` is ``"model-id@host"``."""

    kind: str = wire(Str(choices=COMMITMENT_KINDS))
    weights_hash: bytes = wire(_HASH, default=ZERO_HASH)
    tokenizer_hash: bytes = wire(_HASH, default=ZERO_HASH)
    files: int = wire(UInt(1 << 16), default=0)
    upstream: str = wire(Str(256), default="")


@record
@dataclasses.dataclass(frozen=True, slots=True)
class ModelOfferV2(ModelOffer):
    """A ``ModelOffer`` with the commitment to its model and whether its greedy decoding is
    reproducible (the same tokens on a re-run, so a spot check compares them exactly)."""

    commitment: ModelCommitment | None = wire(Optional(Nested(ModelCommitment)), default=None)
    reproducible: bool = wire(Bool(), default=False)


@message("listing", 2, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class ListingV2(Listing):
    """Listing v1 whose models are ``ModelOfferV2``: each names the model it sells."""

    models: tuple[ModelOfferV2, ...] = wire(ListOf(Nested(ModelOfferV2), 32))


@message("session_accept", 2, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class AcceptV2(Accept):
    """Accept v1 plus the id of the commitment the session is served under."""

    commitment: bytes = wire(_HASH, default=ZERO_HASH)


LISTING_TYPES = (Listing, ListingV2)
ACCEPT_TYPES = (Accept, AcceptV2)


def commitment_id(commitment: ModelCommitment | None) -> bytes:
    """The 32-byte id of a commitment (``ZERO_HASH`` for none): sha256 of its canonical body."""
    if commitment is None:
        return ZERO_HASH
    return hashlib.sha256(b"inferswarm/commitment/1\0" + encode_body(commitment)).digest()


def offer_commitment(offer: ModelOffer) -> ModelCommitment | None:
    """The commitment an offer names (a v1 offer names none)."""
    return offer.commitment if isinstance(offer, ModelOfferV2) else None


def accepted_commitment(accept: Accept) -> bytes:
    """The commitment id an Accept signs (v1: ``ZERO_HASH``)."""
    return accept.commitment if isinstance(accept, AcceptV2) else ZERO_HASH


def committed_input_hash(request_hash: bytes, commitment: bytes) -> bytes:
    """A receipt's ``input_hash``: the request hash bound to the commitment id it was served under."""
    if commitment == ZERO_HASH:
        return request_hash
    return hashlib.sha256(b"inferswarm/committed-input/1\0" + commitment + request_hash).digest()

