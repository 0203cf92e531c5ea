"""FramedStream over in-memory stream pairs, under trio's autojumping mock clock: frames split
anywhere, several frames in one read, an oversize prefix refused at once, the end mid-frame."""

from __future__ import annotations

import pytest
import trio

import protocol
from node.net._streams import FramedStream, StreamClosed
from tests.node.memory_stream import memory_stream_pair

SID = b"\x01" * 16


def chunk(i: int, text: str = "hello") -> protocol.Chunk:
    return protocol.Chunk(session_id=SID, call_seq=0, index=i, text=text, tokens=1)


def framed_bytes(msg: protocol.Chunk) -> bytes:
    return protocol.frame(protocol.encode(msg))


async def test_a_frame_split_across_reads_is_reassembled(autojump_clock):
    a, b = memory_stream_pair(max_read=1)  # every read returns one byte
    msg = chunk(0, "a message long enough to need a two-byte length prefix " * 4)
    await FramedStream(a).send(msg)
    assert await FramedStream(b).receive(expect=(protocol.Chunk,)) == msg
    assert b.reads == len(framed_bytes(msg))


async def test_several_frames_in_one_read_come_out_one_at_a_time(autojump_clock):
    a, b = memory_stream_pair()
    msgs = [chunk(i) for i in range(3)]
    await a.write(b"".join(framed_bytes(m) for m in msgs))  # one write, read back in one read
    framed = FramedStream(b)
    assert [await framed.receive() for _ in msgs] == msgs
    assert b.reads == 1


async def test_a_frame_and_a_half_keeps_the_half_for_the_next_read(autojump_clock):
    a, b = memory_stream_pair()
    first, second = framed_bytes(chunk(0)), framed_bytes(chunk(1))
    await a.write(first + second[:3])
    framed = FramedStream(b)
    assert await framed.receive() == chunk(0)
    await a.write(second[3:])
    assert await framed.receive() == chunk(1)
    assert b.reads == 2


async def test_an_oversize_length_prefix_is_refused_before_its_body(autojump_clock):
    a, b = memory_stream_pair()
    framed = FramedStream(b, max_size=1024)
    await a.write(protocol.encode_varint(1 << 40))  # a terabyte announced; no body follows
    with trio.fail_after(1):  # refused at the prefix: it never waits for (or buffers) the body
        with pytest.raises(protocol.FrameTooLarge):
            await framed.receive()
    assert b.reads == 1 and framed._reader.buffered == 0


async def test_the_end_of_the_stream_mid_frame_is_stream_closed(autojump_clock):
    a, b = memory_stream_pair()
    data = framed_bytes(chunk(0))
    await a.write(data[: len(data) // 2])
    await a.close()
    with pytest.raises(StreamClosed, match="end of stream"):
        await FramedStream(b).receive()


async def test_a_reset_stream_is_stream_closed_both_ways(autojump_clock):
    a, b = memory_stream_pair()
    framed_a, framed_b = FramedStream(a), FramedStream(b)
    async with trio.open_nursery() as nursery:
        async def reader() -> None:
            with pytest.raises(StreamClosed, match="reset"):
                await framed_b.receive()  # blocked when the reset lands

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await framed_a.reset()
    with pytest.raises(StreamClosed):
        await framed_b.send(chunk(0))
