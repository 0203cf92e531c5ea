"""Coalescing a call's output (``provider/_chunk_writer.py``): pieces that wait for the stream go
as one, in order, nothing dropped; the first piece is never held back; the receipt the consumer
checks still covers exactly the text it got."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from node.provider._chunk_writer import ChunkWriter
from node.provider._chunks import merge_pieces
from node.provider._offers import Offer
from node.provider.backends import Backend, Generation, OnPiece
from tests.node.session_rig import session_rig

USER = [{"role": "user", "content": "hi"}]


def test_merged_pieces_keep_order_and_sum_tokens() -> None:
    a = protocol.ToolCallDelta(index=0, id="c", name="f", arguments='{"x"')
    b = protocol.ToolCallDelta(index=0, arguments=": 1}")
    assert merge_pieces([("He", 1, (a,), ()), ("llo", 2, (b,), ())]) == ("Hello", 3, (a, b), ())
    assert merge_pieces([("x", 1, (), ())]) == ("x", 1, (), ())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=6), st.integers(0, 3)), min_size=1, max_size=40),
       st.lists(st.integers(0, 3), min_size=1, max_size=8))
def test_whatever_the_stream_s_pace_the_text_arrives_whole_and_in_order(pieces: list[tuple[str, int]],
                                                                          pace: list[int]) -> None:
    written: list[tuple[str, int, tuple[Any, ...], tuple[Any, ...]]] = []

    async def main() -> None:
        async def send(piece: Any) -> None:
            for _ in range(pace[len(written) % len(pace)]):  # a stream that takes a few scheduler turns
                await trio.lowlevel.checkpoint()
            written.append(piece)

        writer = ChunkWriter(send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            for i, (text, tokens) in enumerate(pieces):
                await writer.put(text, tokens)
                if i % 3 == 0:
                    await trio.lowlevel.checkpoint()  # a backend that sometimes yields
            writer.close()

    trio.run(main)
    assert "".join(p[0] for p in written) == "".join(p[0] for p in pieces)
    assert sum(p[1] for p in written) == sum(p[1] for p in pieces)
    assert written[0][0] == pieces[0][0]  # the first piece went alone
    assert len(written) <= len(pieces)


def test_a_piece_that_comes_while_the_stream_is_busy_waits_and_goes_merged() -> None:
    written: list[str] = []

    async def main() -> None:
        free = trio.Event()

        async def send(piece: Any) -> None:
            written.append(piece[0])
            if len(written) == 1:
                await free.wait()  # the first write is slow: the consumer reads slowly

        writer = ChunkWriter(send)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await writer.put("first", 1)  # returns once the writer took it
                assert written == ["first"]
                for i in range(50):
                    await writer.put(f" {i}", 1)  # never waits: the stream is busy, they queue
                free.set()
                writer.close()

    trio.run(main)
    assert written == ["first", "".join(f" {i}" for i in range(50))]


class Burst(Backend):
    """Hands over its first piece, waits until the consumer has it (so a held-back first token
    would hang the test), then produces many pieces without yielding in between."""

    spec = "burst"

    def __init__(self, n: int) -> None:
        self.n = n
        self.consumer_has_first = trio.Event()

    async def count_prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return 1

    async def generate(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece) -> Generation:
        await on_piece("t0", 1)
        await self.consumer_has_first.wait()
        for i in range(1, self.n):
            await on_piece(f" t{i}", 1)
        return Generation("stop", self.n)


async def test_a_fast_backend_streams_in_fewer_frames_with_the_first_token_first_and_the_receipt_intact() -> None:
    n = 400
    backend = Burst(n)
    offer = Offer(model="m", backend="builtin", input_price=1000, output_price=1000, max_context=4096)
    got: list[str] = []

    async def on_text(text: str) -> None:
        got.append(text)
        backend.consumer_has_first.set()

    async with session_rig({"m": offer}, {"m": backend}, tag="coalesce") as rig:
        channel = await rig.open_channel(cap=5_000_000)
        async with rig.session(channel) as session:
            with trio.fail_after(30):
                result = await session.call(USER, n, temperature_milli=0, on_text=on_text)
    expected = "t0" + "".join(f" t{i}" for i in range(1, n))
    assert got[0] == "t0"  # the first token went alone, before the rest existed
    assert "".join(got) == result.text == expected
    assert 1 < len(got) < n  # merged while the stream was busy
    assert result.receipt.tokens_out == n
    assert result.receipt.output_hash == protocol.output_hash(expected) == hashlib.sha256(expected.encode()).digest()
