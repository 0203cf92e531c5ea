"""libp2p fix 15: a reader sends a Yamux window update once half its window is consumed, not after
every read (py-libp2p 0.8.1 sends one per read: a second frame, encrypted, for every streamed token),
and a stream of many small messages still flows, in order, past several windows' worth of bytes."""

from __future__ import annotations

import trio
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from node.net import _libp2p_fixes
from node.net._host import open_host, parse_peer_addr, peer_addrs
from tests.node.helpers import LOOPBACK
from tests.support import identity

PROTO = "/fix15/1.0.0"


async def _updates_for(messages: list[bytes], monkeypatch) -> tuple[int, bytes]:
    sent = []
    original = YamuxStream.send_window_update

    async def counted(self, increment, skip_lock=False):
        sent.append(increment)
        await original(self, increment, skip_lock=skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    got = bytearray()
    done = trio.Event()
    total = sum(map(len, messages))

    async def reader(stream):
        while len(got) < total:
            data = await stream.read(65536)
            if not data:
                break
            got.extend(data)
        done.set()

    async with open_host(identity("fix15-a"), LOOPBACK) as a, open_host(identity("fix15-b"), LOOPBACK) as b:
        a.set_stream_handler(PROTO, reader)
        await b.connect(parse_peer_addr(peer_addrs(a)[0]))
        stream = await b.new_stream(a.get_id(), [PROTO])
        with trio.fail_after(30):
            for m in messages:
                await stream.write(m)
                await trio.sleep(0)  # one read per message on the other side
            await done.wait()
        await stream.close()
    return len(sent), bytes(got)


async def test_small_messages_cost_no_window_update_each(monkeypatch):
    messages = [f"token {i:04d} ".encode() for i in range(300)]
    updates, got = await _updates_for(messages, monkeypatch)
    assert got == b"".join(messages)
    assert updates <= 2


async def test_a_stream_past_several_windows_flows_and_updates_at_half_windows(monkeypatch):
    messages = [bytes([i % 251]) * 4096 for i in range(600)]  # 2.4 MB: several 256-512 KiB windows
    updates, got = await _updates_for(messages, monkeypatch)
    assert got == b"".join(messages)
    assert 1 <= updates < 60


async def test_without_the_fix_every_read_sends_one(monkeypatch):
    monkeypatch.setattr(_libp2p_fixes, "_window_update_due", lambda stream: True)
    messages = [f"token {i:04d} ".encode() for i in range(300)]
    updates, got = await _updates_for(messages, monkeypatch)
    assert got == b"".join(messages)
    assert updates > 100
