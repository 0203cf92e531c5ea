"""libp2p-shaped streams over trio's in-memory streams: adapter tests without a host or a socket.

py-libp2p's streams offer ``read(n)``, ``write(data)``, ``close()`` (our writing half: the peer
reads the end of the stream) and ``reset()`` (both halves, at once, for both sides); that is all
``FramedStream`` and the session handlers use.
"""

from __future__ import annotations

import trio
import trio.testing

__all__ = ["MemoryStream", "StreamReset", "memory_stream_pair"]


class StreamReset(Exception):
    """The stream was reset (as py-libp2p's ``MuxedStreamReset``)."""


class _Link:
    def __init__(self) -> None:
        self.reset = False


class MemoryStream:
    """One end of a ``memory_stream_pair``.

    Attributes:
        max_read: the most bytes one ``read`` returns (1 splits every frame across reads).
        reads: how many ``read`` calls returned data or the end of the stream.
    """

    def __init__(self, end: trio.StapledStream, link: _Link, max_read: int | None = None) -> None:
        self._end = end
        self._link = link
        self.max_read = max_read
        self.reads = 0

    async def read(self, n: int = 1 << 16) -> bytes:
        if self._link.reset:
            raise StreamReset("stream reset")
        data = await self._end.receive_some(min(n, self.max_read or n))
        if self._link.reset:
            raise StreamReset("stream reset")
        self.reads += 1
        return data

    async def write(self, data: bytes) -> None:
        if self._link.reset:
            raise StreamReset("stream reset")
        await self._end.send_all(data)

    async def close(self) -> None:
        await self._end.send_eof()

    async def reset(self) -> None:
        self._link.reset = True
        await self._end.aclose()


def memory_stream_pair(max_read: int | None = None) -> tuple[MemoryStream, MemoryStream]:
    """Two joined ends; what one writes the other reads. ``max_read`` applies to both."""
    a, b = trio.testing.memory_stream_pair()
    link = _Link()
    return MemoryStream(a, link, max_read), MemoryStream(b, link, max_read)
