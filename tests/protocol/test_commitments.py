"""Model commitments on the wire: listing v2 names them, Accept v2 signs one, receipts bind it."""

from __future__ import annotations

import dataclasses

import pytest

import protocol
from tests.support import PROVIDER, Pair

A = protocol.ModelCommitment(kind="weights", weights_hash=b"a" * 32, tokenizer_hash=b"t" * 32, files=4)
B = dataclasses.replace(A, weights_hash=b"b" * 32)


def _request_hash(pair: Pair) -> bytes:
    (requested,) = [e for e in pair.provider_events if isinstance(e, protocol.CallRequested)][-1:]
    return protocol.request_hash(requested.request)


def test_a_commitment_id_changes_with_every_field_and_none_is_zero():
    ids = {protocol.commitment_id(c) for c in (A, B, dataclasses.replace(A, tokenizer_hash=b"u" * 32),
                                                dataclasses.replace(A, files=5),
                                                protocol.ModelCommitment(kind="upstream", upstream="gpt@api"))}
    assert len(ids) == 5
    assert protocol.commitment_id(None) == protocol.ZERO_HASH


def test_a_listing_v2_carries_each_models_commitment_through_the_market_rule():
    offer = protocol.ModelOfferV2(name="m", price=protocol.Price(input_per_1k=1, output_per_1k=2), max_context=512,
                                  commitment=A, reproducible=True)
    listing = protocol.sign(protocol.ListingV2(provider=PROVIDER.peer_id, addrs=(), seq=1, issued_at=100,
                                               expires_at=200, provider_type="self_hosted", models=(offer,),
                                               escrow_agents=(), hardware=protocol.Hardware()), "sig", PROVIDER)
    back = protocol.decode_listing(protocol.encode(listing), now=150)
    assert back == listing and protocol.offer_commitment(back.models[0]) == A
    # a v1 offer names none; a v2 listing may not hide a v1 offer inside it
    assert protocol.offer_commitment(protocol.ModelOffer(name="m", price=offer.price, max_context=512)) is None
    with pytest.raises(protocol.InvalidMessage, match="expected ModelOfferV2"):
        protocol.encode(dataclasses.replace(listing, models=(protocol.ModelOffer(name="m", price=offer.price,
                                                                                 max_context=512),)))


def test_receipts_bind_the_accepted_commitment():
    pair = Pair(commitment=protocol.commitment_id(A))
    pair.open()
    assert isinstance(pair.consumer.accept, protocol.AcceptV2)
    settled = pair.call("hi", [("x", 1)])
    r = settled.receipt
    req_hash = _request_hash(pair)
    assert r.input_hash == protocol.committed_input_hash(req_hash, protocol.commitment_id(A)) != req_hash
    assert protocol.committed_input_hash(req_hash, protocol.ZERO_HASH) == req_hash


def test_a_session_accepted_under_another_commitment_is_refused():
    pair = Pair(commitment=protocol.commitment_id(A), served=protocol.commitment_id(B))
    pair.consumer.open(pair.now)
    pair.to_provider()
    pair.provider.accept_open(pair.price, pair.max_context, pair.now, commitment=pair.served)
    with pytest.raises(protocol.TermsMismatch, match="commitment"):
        pair.to_consumer()
    # and an Accept v1 (no commitment) does not answer a listing that named one
    pair = Pair(commitment=protocol.commitment_id(A), served=protocol.ZERO_HASH)
    pair.consumer.open(pair.now)
    pair.to_provider()
    pair.provider.accept_open(pair.price, pair.max_context, pair.now)
    with pytest.raises(protocol.TermsMismatch, match="commitment"):
        pair.to_consumer()


def test_a_listing_that_named_none_takes_the_accepted_one():
    pair = Pair(served=protocol.commitment_id(B))
    pair.open()
    assert pair.consumer.commitment == protocol.commitment_id(B)
    settled = pair.call("hi", [("x", 1)])
    assert settled.receipt.input_hash != _request_hash(pair)


def test_a_provider_cannot_bill_a_receipt_under_another_commitment():
    pair = Pair(commitment=protocol.commitment_id(A))
    pair.open()
    pair.provider.commitment = protocol.commitment_id(B)  # it swaps models after the Accept
    with pytest.raises(protocol.ReceiptHashMismatch):
        pair.call("hi", [("x", 1)])
