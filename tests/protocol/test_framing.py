"""Varint length-prefixed framing over arbitrary splits of a byte stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol


@given(st.integers(0, (1 << 63) - 1))
def test_varint_round_trip(n):
    data = protocol.encode_varint(n)
    assert protocol.decode_varint(data) == (n, len(data))
    assert protocol.decode_varint(data[:-1]) is None


@given(st.lists(st.binary(max_size=300), max_size=12), st.data())
def test_frames_survive_any_split(payloads, data):
    stream = b"".join(protocol.frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    reader = protocol.FrameReader()
    out = []
    prev = 0
    for c in cuts + [len(stream)]:
        out += reader.feed(stream[prev:c])
        prev = c
    assert out == payloads
    assert reader.buffered == 0


def test_oversize_prefix_is_refused_before_the_payload_arrives():
    reader = protocol.FrameReader(max_size=1024)
    with pytest.raises(protocol.FrameTooLarge):
        reader.feed(protocol.encode_varint(1 << 40))  # a terabyte announced: nothing allocated
    assert reader.buffered == 0
    with pytest.raises(protocol.FrameTooLarge):  # the stream stays broken
        reader.feed(protocol.frame(b"ok"))


def test_non_minimal_and_overlong_varints():
    with pytest.raises(protocol.BadVarint):
        protocol.FrameReader().feed(b"\x81\x00")
    with pytest.raises(protocol.BadVarint):
        protocol.FrameReader().feed(b"\xff" * 10)


def test_frame_refuses_oversize_payload():
    with pytest.raises(protocol.MessageTooLarge):
        protocol.frame(b"x" * 11, max_size=10)
