"""Moving framed protocol messages over libp2p streams (the only place node/ reads frames).

Rules: every read has a deadline (``timeout_s``, default the stream's ``read_timeout_s``; a
peer that goes quiet gets ``StreamTimeout``, a ``StreamClosed``); a frame over ``max_size`` is
refused at its length prefix before its body is buffered, and the limit can be raised once a
peer has earned it (``set_max_size``: a session's first frame is small, later ones may carry a
1 MiB prompt). After a refused frame the stream cannot be resynchronised: every later receive
fails at once.
"""

from __future__ import annotations

import math
from typing import Any

import trio

import protocol

from .._errors import RemoteError

__all__ = ["FramedStream", "StreamClosed", "StreamTimeout"]

_READ = 1 << 16


class StreamClosed(RemoteError):
    """The peer closed (or reset) the stream before a whole message arrived."""


class StreamTimeout(StreamClosed):
    """The peer sent no whole message within the read deadline."""


class FramedStream:
    """One message per frame, decoded strictly, on a libp2p stream."""

    def __init__(self, stream: Any, max_size: int = protocol.DEFAULT_MAX_MESSAGE,
                 read_timeout_s: float | None = None) -> None:
        """
        Args:
            max_size: the largest frame accepted (and sent).
            read_timeout_s: the default deadline of ``receive`` (None: wait as long as it takes).
        """
        self.stream = stream
        self.max_size = max_size
        self.read_timeout_s = read_timeout_s
        self._reader = protocol.FrameReader(max_size)
        self._frames: list[bytes] = []
        self._broken: protocol.ProtocolError | None = None

    def set_max_size(self, max_size: int) -> None:
        """Accept (and send) frames of up to ``max_size`` bytes from now on."""
        self.max_size = self._reader.max_size = max_size

    async def send(self, msg: Any) -> None:
        """Send one message.

        Raises:
            StreamClosed: the peer is gone. protocol.LocalProtocolError: the message is invalid.
        """
        data = protocol.frame(protocol.encode(msg, self.max_size), self.max_size)
        try:
            await self.stream.write(data)
        except Exception as exc:  # libp2p's closed/reset/connection errors
            raise StreamClosed(str(exc) or type(exc).__name__) from exc

    async def send_all(self, msgs: list[Any]) -> None:
        for msg in msgs:
            await self.send(msg)

    async def receive(self, expect: tuple[type, ...] | None = None, timeout_s: float | None = None) -> Any:
        """The next message.

        Args:
            timeout_s: how long to wait for it (default: ``read_timeout_s``).

        Raises:
            StreamTimeout: no whole message within the deadline. StreamClosed: the stream ended
            first. protocol.DecodeError: the bytes are not a message (and stay refused).
        """
        if self._broken is not None:
            raise type(self._broken)(str(self._broken))
        deadline = timeout_s if timeout_s is not None else self.read_timeout_s
        with trio.move_on_after(math.inf if deadline is None else deadline) as scope:
            while not self._frames:
                try:
                    data = await self.stream.read(_READ)
                except Exception as exc:  # libp2p's EOF, reset and connection errors
                    raise StreamClosed(str(exc) or type(exc).__name__) from exc
                if not data:
                    raise StreamClosed("end of stream")
                try:
                    self._frames.extend(self._reader.feed(data))
                except protocol.ProtocolError as exc:
                    self._broken = exc
                    raise
        if scope.cancelled_caught and not self._frames:
            raise StreamTimeout(f"no message within {deadline:g}s")
        frame = self._frames.pop(0)
        try:
            return protocol.decode(frame, self.max_size, expect=expect)
        except protocol.ProtocolError as exc:
            self._broken = exc
            raise

    async def close(self) -> None:
        try:
            await self.stream.close()
        except Exception:  # already reset by the peer
            pass

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:
            pass
