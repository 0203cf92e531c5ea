"""The market's listing acceptance rule."""

from __future__ import annotations

import dataclasses

import pytest

import protocol
from tests.support import AGENT, MALLORY, PRICE, PROVIDER


def listing(seq=1, issued=1000, ttl=600, **changes):
    base = protocol.Listing(
        provider=PROVIDER.peer_id,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        seq=seq,
        issued_at=issued,
        expires_at=issued + ttl,
        provider_type="self_hosted",
        models=(protocol.ModelOffer(name="tiny", price=PRICE, max_context=2048),),
        escrow_agents=(AGENT.peer_id,),
        hardware=protocol.Hardware(gpus=(protocol.Gpu(name="H100", memory_total_mb=81559),), cpu_count=16, ram_mb=1 << 17),
    )
    return protocol.sign(dataclasses.replace(base, **changes), "sig", PROVIDER)


def test_a_good_listing_decodes_and_checks():
    good = listing()
    assert protocol.decode_listing(protocol.encode(good), now=1100) == good


@pytest.mark.parametrize(
    "bad,now,error",
    [
        (protocol.sign(listing(), "sig", MALLORY), 1100, protocol.BadSignature),
        (listing(), 1600, protocol.Expired),
        (listing(issued=5000), 1100, protocol.Expired),
        (listing(ttl=protocol.MAX_LISTING_TTL_S + 1), 1100, protocol.TermsMismatch),
        (listing(models=(protocol.ModelOffer(name="a", price=PRICE, max_context=1),) * 2), 1100, protocol.TermsMismatch),
    ],
)
def test_bad_listings_are_refused_with_the_reason(bad, now, error):
    with pytest.raises(error):
        protocol.decode_listing(protocol.encode(bad), now=now)


def test_oversize_and_malformed_listing_bytes():
    with pytest.raises(protocol.FrameTooLarge):
        protocol.decode_listing(b"\x00" * (protocol.MAX_LISTING_BYTES + 1), now=0)
    with pytest.raises(protocol.DecodeError):
        protocol.decode_listing(b"\x92\x01\x02", now=0)
    other = protocol.encode(protocol.CallError(session_id=b"s" * 16, call_seq=0, reason="timeout"))
    with pytest.raises(protocol.UnexpectedMessage):
        protocol.decode_listing(other, now=0)


def test_newer_seq_supersedes():
    assert protocol.supersedes(listing(seq=2), listing(seq=1))
    assert not protocol.supersedes(listing(seq=1), listing(seq=1))
    assert not protocol.supersedes(listing(seq=1), listing(seq=2))
    assert protocol.supersedes(listing(seq=0), None)
