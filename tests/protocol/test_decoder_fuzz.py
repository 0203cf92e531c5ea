"""Fuzzing every decoder a peer's bytes reach (hostile peers, issue #11): ``protocol.decode`` for every
registered kind, ``FrameReader.feed`` and ``decode_listing`` raise nothing but ``ProtocolError``
subclasses, whatever they are fed — random bytes, random msgpack documents, envelopes of a real kind
around random bodies, and valid encodings mutated (bit flips, truncations, splices, field values
swapped or replaced, keys reordered). Valid bytes still decode to the very message, in any split.

Bounded: 15 examples per kind and strategy, 150 for the kind-free ones: about 10 s in all.
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from tests.protocol.test_wire_golden import KEY, example, registered

KINDS = sorted(registered().items())
IDS = [f"{kind}-v{v}" for (kind, v), _ in KINDS]
VALID = {key: protocol.encode(example(cls)) for key, cls in KINDS}
NOW = 1_800_000_000
GOOD_LISTING = protocol.sign(dataclasses.replace(example(protocol.Listing), provider=KEY.peer_id, issued_at=NOW - 60,
                                                 expires_at=NOW + 3600, sig=b""), "sig", KEY)
LISTING = protocol.encode(GOOD_LISTING)  # one a market accepts at NOW

FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# what msgpack can carry: every type, integers at every width and both signs, nested a little
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
            | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=40))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=12) | st.integers(-5, 5), inner, max_size=4),
                       max_leaves=12)
_field_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=2), max_leaves=3)  # one per field: cheap


def _decode_only_protocol_errors(data: bytes, **kwargs) -> None:
    """``decode(data)`` answers a message or a ProtocolError, nothing else (a crash fails the test)."""
    try:
        protocol.decode(data, **kwargs)
    except protocol.ProtocolError:
        pass


def _pack(doc) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


# ---- protocol.decode ---------------------------------------------------------------------------


@SOME
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(data):
    _decode_only_protocol_errors(data)
    _decode_only_protocol_errors(data, max_size=64)


@SOME
@given(doc=_values)
def test_random_msgpack_documents_raise_only_protocol_errors(doc):
    _decode_only_protocol_errors(_pack(doc))


@pytest.mark.parametrize("key,cls", KINDS, ids=IDS)
@FEW
@given(body=_values, v=st.sampled_from([1, 1, 0, 2, -1, 1 << 40]), field_values=st.data())
def test_an_envelope_of_a_real_kind_around_a_random_body(key, cls, body, v, field_values):
    _decode_only_protocol_errors(_pack({"kind": key[0], "v": v, "body": body}))
    # the right field names, random values: each field's own check runs
    names = [name for name, _ in cls._WIRE]
    fields = {name: field_values.draw(_field_values, label=name) for name in names}
    _decode_only_protocol_errors(_pack({"kind": key[0], "v": key[1], "body": fields}), expect=(cls,))


def _raw(key) -> dict:
    return msgpack.unpackb(VALID[key], raw=False)


@pytest.mark.parametrize("key,cls", KINDS, ids=IDS)
@FEW
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), min_size=1, max_size=4),
       cut=st.integers(0, 1 << 20), splice=st.binary(max_size=8), at=st.integers(0, 1 << 20))
def test_mutated_valid_encodings_raise_only_protocol_errors(key, cls, flips, cut, splice, at):
    valid = VALID[key]
    assert protocol.decode(valid) == example(cls)  # the seed itself is valid
    flipped = bytearray(valid)
    for pos, bit in flips:
        flipped[pos % len(valid)] ^= 1 << bit
    _decode_only_protocol_errors(bytes(flipped))
    _decode_only_protocol_errors(valid[: cut % len(valid)])  # truncated
    i = at % (len(valid) + 1)
    _decode_only_protocol_errors(valid[:i] + splice + valid[i:])  # bytes inserted
    _decode_only_protocol_errors(valid[:i] + valid[i + len(splice):])  # bytes removed
    _decode_only_protocol_errors(valid + splice)  # trailing bytes


@pytest.mark.parametrize("key,cls", KINDS, ids=IDS)
@FEW
@given(choice=st.data())
def test_valid_bodies_with_fields_swapped_replaced_or_reordered(key, cls, choice):
    raw = _raw(key)
    body = dict(raw["body"])
    names = list(body)
    a = choice.draw(st.sampled_from(names), label="a")
    b = choice.draw(st.sampled_from(names), label="b")
    swapped = dict(body)
    swapped[a], swapped[b] = body[b], body[a]
    _decode_only_protocol_errors(_pack(raw | {"body": swapped}))
    replaced = dict(body)
    replaced[a] = choice.draw(_values, label="value")
    _decode_only_protocol_errors(_pack(raw | {"body": replaced}))
    order = choice.draw(st.permutations(names), label="order")
    _decode_only_protocol_errors(_pack(raw | {"body": {n: body[n] for n in order}}))
    dropped = {n: v for n, v in body.items() if n != a}
    _decode_only_protocol_errors(_pack(raw | {"body": dropped}))
    _decode_only_protocol_errors(_pack(raw | {"body": body | {"extra": choice.draw(_values, label="extra")}}))
    other = choice.draw(st.sampled_from(KINDS), label="other kind")[0]
    _decode_only_protocol_errors(_pack(raw | {"kind": other[0], "v": other[1]}))  # another kind's envelope
    _decode_only_protocol_errors(_pack({"v": raw["v"], "kind": raw["kind"], "body": body}))  # envelope reordered


# ---- FrameReader.feed --------------------------------------------------------------------------


def _feed_all(reader: protocol.FrameReader, data: bytes, cuts: list[int]) -> list[bytes]:
    """Feed ``data`` in pieces cut at ``cuts``; every frame out, or a ProtocolError."""
    frames, start = [], 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        frames += reader.feed(data[start:cut])
        start = cut
    return frames


@SOME
@given(payloads=st.lists(st.sampled_from(sorted(VALID.values())), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=8))
def test_valid_frames_in_any_split_come_out_whole_and_decode(payloads, cuts):
    data = b"".join(protocol.frame(p) for p in payloads)
    reader = protocol.FrameReader()
    frames = _feed_all(reader, data, cuts)
    assert frames == payloads and reader.buffered == 0
    assert [protocol.encode(protocol.decode(f)) for f in frames] == payloads


@SOME
@given(prefix=st.binary(max_size=24), garbage=st.binary(max_size=200), cuts=st.lists(st.integers(0, 1 << 20),
                                                                                     max_size=8),
       max_size=st.sampled_from([16, 1024, protocol.DEFAULT_MAX_MESSAGE]))
def test_garbage_and_prefixes_raise_only_protocol_errors_and_stay_broken(prefix, garbage, cuts, max_size):
    reader = protocol.FrameReader(max_size=max_size)
    data = prefix + protocol.frame(LISTING) + garbage
    try:
        for f in _feed_all(reader, data, cuts):
            _decode_only_protocol_errors(f, max_size=max_size)
    except protocol.ProtocolError:
        with pytest.raises(protocol.ProtocolError):  # broken for good: a stream cannot resynchronise
            reader.feed(protocol.frame(b"x"))
    assert reader.buffered <= max(len(data), 0) and reader.buffered <= max_size + 9  # nothing over the limit held


@SOME
@given(length=st.integers(0, (1 << 63) - 1), cut=st.integers(0, 12))
def test_an_announced_length_over_the_limit_is_refused_at_the_prefix(length, cut):
    reader = protocol.FrameReader(max_size=1024)
    prefix = protocol.encode_varint(length)
    try:
        reader.feed(prefix[:cut])
        reader.feed(prefix[cut:])
    except protocol.FrameTooLarge:
        assert length > 1024
        return
    assert length <= 1024 and reader.buffered == 0


# ---- decode_listing ----------------------------------------------------------------------------


def _listing_only_protocol_errors(data: bytes, now: int = NOW) -> None:
    try:
        protocol.decode_listing(data, now)
    except protocol.ProtocolError:
        pass


def test_the_valid_listing_decodes():
    assert protocol.decode_listing(LISTING, NOW) == GOOD_LISTING


@SOME
@given(data=st.binary(max_size=400), flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)),
                                                     max_size=4),
       cut=st.integers(0, 1 << 20), now=st.integers(0, (1 << 64) - 1))
def test_listing_bytes_random_or_mutated_raise_only_protocol_errors(data, flips, cut, now):
    _listing_only_protocol_errors(data)
    flipped = bytearray(LISTING)
    for pos, bit in flips:
        flipped[pos % len(LISTING)] ^= 1 << bit
    _listing_only_protocol_errors(bytes(flipped))  # most flips break the signature, some the encoding
    _listing_only_protocol_errors(LISTING[: cut % len(LISTING)])
    _listing_only_protocol_errors(LISTING, now)  # expired, issued in the future, or fine


@FEW
@given(choice=st.data())
def test_listings_with_fields_replaced_raise_only_protocol_errors(choice):
    raw = msgpack.unpackb(LISTING, raw=False)
    body = dict(raw["body"])
    name = choice.draw(st.sampled_from(list(body)), label="field")
    body[name] = choice.draw(_values, label="value")
    _listing_only_protocol_errors(_pack(raw | {"body": body}))
    _listing_only_protocol_errors(b"\x00" * (protocol.MAX_LISTING_BYTES + 1))  # oversize, before parsing
