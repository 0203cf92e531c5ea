"""Varint length-prefixed framing (the unsigned LEB128 varints libp2p specs use).

``FrameReader`` is sans-IO: feed it whatever bytes arrived, in any split, and take whole
frames out. A length prefix over the limit is refused as soon as the prefix is complete,
before a byte of the payload is buffered; an overlong or non-minimal prefix is refused too.
After an error the reader stays broken: the stream cannot be resynchronised.
"""

from __future__ import annotations

from ._codec import DEFAULT_MAX_MESSAGE
from ._errors import BadVarint, FrameTooLarge, MessageTooLarge

__all__ = ["encode_varint", "decode_varint", "frame", "FrameReader"]

_MAX_VARINT_BYTES = 9  # libp2p's limit: values below 2**63


def encode_varint(n: int) -> bytes:
    if n < 0 or n >= 1 << 63:
        raise ValueError("varint out of range")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_varint(buf: bytes | bytearray, pos: int = 0) -> tuple[int, int] | None:
    """``(value, next_pos)``, or ``None`` if ``buf`` ends inside the varint.

    Raises:
        BadVarint: more than 9 bytes, or a non-minimal encoding (a trailing zero group).
    """
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            return None
        b = buf[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i > 0:
                raise BadVarint("non-minimal varint")
            return value, pos + i + 1
    raise BadVarint("varint longer than 9 bytes")


def frame(payload: bytes, max_size: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """``varint(len(payload)) + payload``.

    Raises:
        MessageTooLarge: the payload is over ``max_size``.
    """
    if len(payload) > max_size:
        raise MessageTooLarge(f"frame of {len(payload)} bytes is over {max_size}")
    return encode_varint(len(payload)) + payload


class FrameReader:
    """Reassembles frames from a byte stream split anywhere."""

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._need: int | None = None  # payload length once the prefix is parsed
        self._broken: Exception | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame it completes, in order.

        Raises:
            FrameTooLarge: a length prefix over ``max_size``.
            BadVarint: an invalid length prefix.
        """
        if self._broken is not None:
            raise type(self._broken)(str(self._broken))
        self._buf += data
        frames: list[bytes] = []
        try:
            while True:
                if self._need is None:
                    parsed = decode_varint(self._buf)
                    if parsed is None:
                        return frames
                    length, used = parsed
                    if length > self.max_size:
                        raise FrameTooLarge(f"frame of {length} bytes announced, limit {self.max_size}")
                    del self._buf[:used]
                    self._need = length
                if len(self._buf) < self._need:
                    return frames
                frames.append(bytes(self._buf[: self._need]))
                del self._buf[: self._need]
                self._need = None
        except (FrameTooLarge, BadVarint) as exc:
            self._broken = exc
            self._buf.clear()
            raise
