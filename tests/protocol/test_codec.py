"""Canonical encoding and strict decoding of every message kind."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from tests.support import MESSAGE_CLASSES, PROVIDER, any_message, instances_of


def _raw(msg):
    return msgpack.unpackb(protocol.encode(msg), raw=False)


def _pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


@given(any_message)
def test_every_message_round_trips(msg):
    data = protocol.encode(msg)
    assert protocol.decode(data) == msg
    assert protocol.encode(protocol.decode(data)) == data


def test_every_kind_is_covered_by_the_strategies():
    assert {c.KIND for c in MESSAGE_CLASSES} == set(protocol.registered_kinds())
    # the kinds docs/DESIGN.md names
    for kind in ("listing", "session_open", "session_accept", "session_reject", "call_request", "call_chunk",
                 "receipt", "receipt_countersign", "session_close", "escrow_claim", "escrow_response"):
        assert kind in protocol.registered_kinds()


@given(instances_of(protocol.Request))
def test_unknown_kind_and_version(msg):
    raw = _raw(msg)
    with pytest.raises(protocol.UnknownKind):
        protocol.decode(_pack({**raw, "kind": "call_requestx"}))
    with pytest.raises(protocol.UnknownVersion):
        protocol.decode(_pack({**raw, "v": 99}))


@given(instances_of(protocol.Chunk))
def test_missing_extra_and_wrong_type(msg):
    raw = _raw(msg)
    body = dict(raw["body"])
    del body["text"]
    with pytest.raises(protocol.MissingField, match="text"):
        protocol.decode(_pack({**raw, "body": body}))
    with pytest.raises(protocol.ExtraField, match="surprise"):
        protocol.decode(_pack({**raw, "body": {**raw["body"], "surprise": 1}}))
    for bad in (1.5, "3", True, -1, None, [1]):
        with pytest.raises(protocol.WrongFieldType, match="tokens"):
            protocol.decode(_pack({**raw, "body": {**raw["body"], "tokens": bad}}))


def test_floats_are_never_accepted_where_money_lives():
    price = {"input_per_1k": 1.0, "output_per_1k": 1, "min_charge": 0}
    raw = {"kind": "call_error", "v": 1, "body": {"session_id": b"s" * 16, "call_seq": 0.0, "reason": "timeout", "detail": ""}}
    with pytest.raises(protocol.WrongFieldType):
        protocol.decode(_pack(raw))
    with pytest.raises(protocol.InvalidMessage):
        protocol.encode(protocol.CallError(session_id=b"s" * 16, call_seq=1.0, reason="timeout"))  # type: ignore[arg-type]
    with pytest.raises(protocol.InvalidMessage):
        protocol.encode(protocol.Price(**price))  # a record is not a message either


def test_non_canonical_encodings_are_rejected():
    msg = protocol.CallError(session_id=b"s" * 16, call_seq=5, reason="timeout", detail="")
    raw = _raw(msg)
    reordered = {"v": raw["v"], "kind": raw["kind"], "body": raw["body"]}
    with pytest.raises(protocol.MalformedMessage, match="non-canonical"):
        protocol.decode(_pack(reordered))
    body = dict(reversed(list(raw["body"].items())))
    with pytest.raises(protocol.MalformedMessage, match="non-canonical"):
        protocol.decode(_pack({**raw, "body": body}))
    wide_int = protocol.encode(msg).replace(b"\xa8call_seq\x05", b"\xa8call_seq\xcd\x00\x05")
    with pytest.raises(protocol.MalformedMessage, match="non-canonical"):
        protocol.decode(wide_int)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", _pack([1, 2]), _pack({"kind": "x"}), b"\xa1"])
def test_garbage_is_malformed(data):
    with pytest.raises(protocol.DecodeError):
        protocol.decode(data)


def test_trailing_bytes_are_malformed():
    data = protocol.encode(protocol.CallError(session_id=b"s" * 16, call_seq=5, reason="timeout"))
    with pytest.raises(protocol.MalformedMessage, match="trailing"):
        protocol.decode(data + b"\x00")


def test_oversize_is_refused_before_parsing():
    big = protocol.Chunk(session_id=b"s" * 16, call_seq=0, index=0, text="x" * 2000, tokens=1)
    data = protocol.encode(big)
    with pytest.raises(protocol.FrameTooLarge):
        protocol.decode(data, max_size=1000)
    with pytest.raises(protocol.MessageTooLarge):
        protocol.encode(big, max_size=1000)


def test_unexpected_kind_when_a_kind_is_expected():
    data = protocol.encode(protocol.CallError(session_id=b"s" * 16, call_seq=5, reason="timeout"))
    with pytest.raises(protocol.UnexpectedMessage):
        protocol.decode(data, expect=(protocol.Listing,))


def test_bad_peer_ids_and_choices_are_wrong_types():
    ok = protocol.Close(session_id=b"s" * 16, by=PROVIDER.peer_id, reason="done", last_receipt_hash=bytes(32),
                        cumulative=0, issued_at=1)
    for bad in ("12D3KooWnotreallyapeerid", PROVIDER.peer_id[:-1] + "0", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", ""):
        with pytest.raises(protocol.InvalidMessage, match="by"):
            protocol.encode(dataclasses.replace(ok, by=bad))
    with pytest.raises(protocol.InvalidMessage, match="reason"):
        protocol.encode(dataclasses.replace(ok, reason="because"))


def test_errors_have_one_root_and_local_remote_split():
    assert issubclass(protocol.LocalProtocolError, protocol.ProtocolError)
    assert issubclass(protocol.RemoteProtocolError, protocol.ProtocolError)
    for name in protocol.__all__:
        obj = getattr(protocol, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, protocol.ProtocolError), name
            assert obj is protocol.ProtocolError or issubclass(obj, (protocol.LocalProtocolError, protocol.RemoteProtocolError))
            assert obj.code


@given(st.lists(any_message, min_size=1, max_size=5))
def test_messages_never_compare_equal_across_kinds(msgs):
    # the envelope's kind is part of the bytes: two different kinds never share an encoding
    encodings = {}
    for m in msgs:
        encodings.setdefault(protocol.encode(m), set()).add(type(m))
    assert all(len(kinds) == 1 for kinds in encodings.values())
