"""Moving framed protocol messages over libp2p streams (the only place node/ reads frames)."""

from __future__ import annotations

from typing import Any

import protocol

from .._errors import RemoteError

__all__ = ["FramedStream", "StreamClosed"]

_READ = 1 << 16


class StreamClosed(RemoteError):
    """The peer closed (or reset) the stream before a whole message arrived."""


class FramedStream:
    """One message per frame, decoded strictly, on a libp2p stream."""

    def __init__(self, stream: Any, max_size: int = protocol.DEFAULT_MAX_MESSAGE) -> None:
        self.stream = stream
        self.max_size = max_size
        self._reader = protocol.FrameReader(max_size)
        self._frames: list[bytes] = []

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

    async def receive(self, expect: tuple[type, ...] | None = None) -> Any:
        """The next message.

        Raises:
            StreamClosed: the stream ended first. protocol.DecodeError: the bytes are not a message.
        """
        while not self._frames:
            try:
                data = await self.stream.read(_READ)
            except Exception as exc:  # libp2p's EOF, reset and connection errors
                raise StreamClosed(str(exc) or type(exc).__name__) from exc
            if not data:
                raise StreamClosed("end of stream")
            self._frames.extend(self._reader.feed(data))
        return protocol.decode(self._frames.pop(0), self.max_size, expect=expect)

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
