"""Peer ids: the libp2p identity of an Ed25519 public key, computed without libp2p.

A libp2p peer id for an Ed25519 key is the *identity* multihash of the protobuf-encoded
``PublicKey{Type: Ed25519, Data: key}``, written in base58btc (``12D3KooW...``). Because the
key is inside the id, any message that names a peer id can be verified from the id alone.
This module only converts; it never trusts an id it has not parsed.
"""

from __future__ import annotations

import functools

from ._errors import WrongFieldType

__all__ = ["peer_id_from_public_key", "public_key_from_peer_id"]

_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
# protobuf: field 1 (KeyType) varint = 1 (Ed25519); field 2 (Data) length-delimited, 32 bytes
_PROTO_PREFIX = b"\x08\x01\x12\x20"
# multihash: code 0x00 (identity), length 36
_MULTIHASH_PREFIX = b"\x00\x24"
_RAW_LEN = len(_MULTIHASH_PREFIX) + len(_PROTO_PREFIX) + 32


def _b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\x00"))
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    return (b"1" * zeros + bytes(reversed(out))).decode("ascii")


def _b58decode(text: str) -> bytes:
    raw = text.encode("ascii", "strict")
    n = 0
    for c in raw:
        n = n * 58 + _INDEX[c]
    zeros = len(raw) - len(raw.lstrip(b"1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * zeros + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer id of a raw 32-byte Ed25519 public key."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise WrongFieldType("an Ed25519 public key is 32 bytes")
    return _b58encode(_MULTIHASH_PREFIX + _PROTO_PREFIX + public_key)


@functools.lru_cache(maxsize=4096)  # peers recur in every message; parsing is the codec's hot spot
def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside a peer id.

    Raises:
        WrongFieldType: not a base58 identity-multihash peer id of an Ed25519 key.
    """
    if not isinstance(peer_id, str) or not 40 <= len(peer_id) <= 60:
        raise WrongFieldType(f"not an Ed25519 peer id: {peer_id!r:.80}")
    try:
        raw = _b58decode(peer_id)
    except (KeyError, UnicodeEncodeError) as exc:
        raise WrongFieldType(f"peer id is not base58: {peer_id!r:.80}") from exc
    prefix = _MULTIHASH_PREFIX + _PROTO_PREFIX
    if len(raw) != _RAW_LEN or not raw.startswith(prefix):
        raise WrongFieldType(f"not an Ed25519 peer id: {peer_id!r:.80}")
    key = raw[len(prefix):]
    if _b58encode(raw) != peer_id:  # reject non-canonical spellings
        raise WrongFieldType(f"non-canonical peer id: {peer_id!r:.80}")
    return key
