"""Domain-tagged Ed25519 signatures: any change to a signed message is rejected."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from tests.support import MALLORY, MESSAGE_CLASSES, PROVIDER, instances_of

SIGNED = [c for c in MESSAGE_CLASSES if c.SIGNATURES]


def _sign_all(msg):
    for field in type(msg).SIGNATURES:
        msg = protocol.sign(msg, field, PROVIDER)
    return msg


def _verify_all(msg):
    for field in type(msg).SIGNATURES:
        protocol.verify(msg, field, PROVIDER.public_key)


signed_message = st.sampled_from(SIGNED).flatmap(instances_of).map(_sign_all)


@given(signed_message)
def test_signed_messages_verify_after_a_round_trip(msg):
    _verify_all(protocol.decode(protocol.encode(msg)))


@given(signed_message, st.data())
def test_any_single_byte_change_is_rejected(msg, data):
    wire = bytearray(protocol.encode(msg))
    pos = data.draw(st.integers(0, len(wire) - 1), label="pos")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != wire[pos]), label="byte")
    wire[pos] = new
    with pytest.raises(protocol.ProtocolError):
        _verify_all(protocol.decode(bytes(wire)))


@given(signed_message)
def test_another_key_is_rejected(msg):
    field = type(msg).SIGNATURES[0]
    forged = protocol.sign(msg, field, MALLORY)
    with pytest.raises(protocol.BadSignature):
        protocol.verify(forged, field, PROVIDER.public_key)


def test_domain_tags_differ_per_kind_version_and_role():
    tags = {protocol.domain_tag(c, f) for c in SIGNED for f in c.SIGNATURES}
    assert len(tags) == sum(len(c.SIGNATURES) for c in SIGNED)
    assert protocol.domain_tag(protocol.Receipt, "provider_sig") == b"inferswarm/receipt/v1/provider"
    assert protocol.domain_tag(protocol.Listing, "sig") == b"inferswarm/listing/v1"


@given(instances_of(protocol.Receipt))
def test_a_provider_signature_is_not_a_consumer_signature(receipt):
    signed = protocol.sign(receipt, "provider_sig", PROVIDER)
    swapped = dataclasses.replace(signed, consumer_sig=signed.provider_sig)
    with pytest.raises(protocol.BadSignature):
        protocol.verify(swapped, "consumer_sig", PROVIDER.public_key)


def test_missing_signature_is_rejected():
    grant = protocol.ChannelGrant(agent=PROVIDER.peer_id, channel_id=b"c" * 16, consumer=PROVIDER.peer_id,
                                  provider=PROVIDER.peer_id, cap=1, expires_at=2)
    with pytest.raises(protocol.BadSignature, match="missing"):
        protocol.verify(grant, "sig", PROVIDER.public_key)


@given(st.binary(min_size=32, max_size=32))
def test_peer_id_round_trip(key):
    pid = protocol.peer_id_from_public_key(key)
    assert pid.startswith("12D3KooW")
    assert protocol.public_key_from_peer_id(pid) == key


def test_peer_id_matches_py_libp2p():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    kp = create_new_key_pair(PROVIDER.seed)
    assert kp.public_key.to_bytes() == PROVIDER.public_key
    assert ID.from_pubkey(kp.public_key).to_base58() == PROVIDER.peer_id


@given(st.text(max_size=60))
def test_peer_id_parser_never_crashes(text):
    try:
        key = protocol.public_key_from_peer_id(text)
    except protocol.WrongFieldType:
        return
    assert protocol.peer_id_from_public_key(key) == text
