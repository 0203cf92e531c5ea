"""The market's acceptance rule for listings, shared by the DHT validator, gossip and the view.

A listing is accepted only if it is signed by the provider it names, is not expired, was
not issued in the future (beyond a small clock skew) and does not live longer than the
maximum TTL. Between two valid listings of one provider the higher ``seq`` wins; equal
``seq`` with different content is a conflict and the one already held stays.
"""

from __future__ import annotations

from ._codec import DEFAULT_MAX_MESSAGE, decode
from ._commitments import LISTING_TYPES
from ._errors import Expired, FrameTooLarge, TermsMismatch
from ._identity import public_key_from_peer_id
from ._messages import Listing
from ._signing import verify

__all__ = ["MAX_LISTING_BYTES", "MAX_LISTING_TTL_S", "CLOCK_SKEW_S", "check_listing", "decode_listing", "supersedes"]

MAX_LISTING_BYTES = 64 * 1024
MAX_LISTING_TTL_S = 24 * 3600
CLOCK_SKEW_S = 60


def check_listing(listing: Listing, now: int) -> None:
    """Raise unless ``listing`` is acceptable at time ``now``.

    Raises:
        BadSignature: not signed by the provider it names.
        Expired: expired, or issued too far in the future.
        TermsMismatch: a lifetime over the maximum TTL or an empty/duplicated model list.
    """
    verify(listing, "sig", public_key_from_peer_id(listing.provider))
    if listing.expires_at <= now:
        raise Expired(f"listing seq {listing.seq} expired at {listing.expires_at}")
    if listing.issued_at > now + CLOCK_SKEW_S:
        raise Expired(f"listing seq {listing.seq} issued in the future")
    if not listing.issued_at < listing.expires_at <= listing.issued_at + MAX_LISTING_TTL_S:
        raise TermsMismatch("listing lifetime is empty or longer than the maximum TTL")
    names = [m.name for m in listing.models]
    if len(set(names)) != len(names):
        raise TermsMismatch("listing names a model twice")


def decode_listing(data: bytes, now: int) -> Listing:
    """Decode and check listing bytes from the network (DHT value or gossip payload).

    Raises:
        FrameTooLarge: over ``MAX_LISTING_BYTES``; any DecodeError; what ``check_listing`` raises.
    """
    if len(data) > MAX_LISTING_BYTES:
        raise FrameTooLarge(f"listing of {len(data)} bytes is over {MAX_LISTING_BYTES}")
    listing = decode(data, max_size=min(MAX_LISTING_BYTES, DEFAULT_MAX_MESSAGE), expect=LISTING_TYPES)
    check_listing(listing, now)
    return listing


def supersedes(new: Listing, old: Listing | None) -> bool:
    """Whether ``new`` replaces ``old`` (same provider, strictly higher seq)."""
    return old is None or (new.provider == old.provider and new.seq > old.seq)
