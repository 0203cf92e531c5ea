"""Streaming a call's output without holding the backend up: the backend hands each piece to
``ChunkWriter.put`` and goes on generating while one task writes to the consumer. The first
piece goes alone and at once (``put`` returns only when the writer has taken it, so the first
token is never held back to be merged); a piece that comes while a write is in progress waits,
and everything that waited goes as one piece (``merge_pieces``) when the stream is free. So a
fast backend costs one frame — one msgpack encode, one Noise and one Yamux frame, one
consumer-side check — per write the stream can take, not per token, and a slow one still gets
a frame per token. Text is never reordered or dropped: pieces are merged in order, and the
output hash covers the same bytes. What waits is bounded (``max_pending_bytes``): past it,
``put`` waits for the writer (the consumer's reading paces the backend, as before).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio

from ._chunks import merge_pieces

__all__ = ["ChunkWriter"]

Piece = tuple[str, int, tuple[Any, ...], tuple[Any, ...]]


class ChunkWriter:
    """One call's pieces to ``send`` (which writes one merged piece), from one writer task (``run``)."""

    def __init__(self, send: Callable[[Piece], Awaitable[None]], max_pending_bytes: int = 256 << 10) -> None:
        self._send = send
        self._max = max_pending_bytes
        self._pending: list[Piece] = []
        self._bytes = 0
        self._done = False
        self._wake = trio.Event()  # a piece came, or the call ended
        self._taken = trio.Event()  # the writer took what was pending
        self.first_sent = False
        self.writes = 0  # merged pieces written (for tests and benches)

    async def put(self, text: str, tokens: int, tool_calls: tuple[Any, ...] = (),
                  logprobs: tuple[Any, ...] = ()) -> None:
        """Queue one piece; waits only for the first piece to be taken, or while too much waits."""
        self._pending.append((text, tokens, tool_calls, logprobs))
        self._bytes += len(text) + sum(len(d.arguments) for d in tool_calls)
        self._wake.set()
        if not self.first_sent or self._bytes > self._max:
            self.first_sent = True
            await self._taken.wait()

    def close(self) -> None:
        """No more pieces: ``run`` returns once what waits is written."""
        self._done = True
        self._wake.set()

    async def run(self) -> None:
        """Write until ``close`` and drained. Raises what ``send`` raises (the consumer went away)."""
        while True:
            while not self._pending:
                if self._done:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
            batch, self._pending, self._bytes = self._pending, [], 0
            self._taken.set()
            self._taken = trio.Event()
            await self._send(merge_pieces(batch))
            self.writes += 1
