"""Fix 12: a Yamux read cancelled after it took its bytes out of the stream's buffer still sends
its window update and returns them (before, the cancel landed in the window update and the bytes
were gone: the next frame read was out of order, and a cancelled call went unpaid)."""

from __future__ import annotations

import trio
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from node.net import _libp2p_fixes as fixes


async def test_the_window_update_after_a_read_is_not_cut_by_the_readers_cancel(monkeypatch):
    fixes.apply()
    assert YamuxStream._auto_tune_and_send_window_update is fixes._window_update_uncancelled
    sent: list[int] = []
    resume = trio.Event()

    async def update(self, *, bytes_read=0):  # a window update that has to wait for the connection
        await resume.wait()
        sent.append(bytes_read)

    monkeypatch.setattr(fixes, "_original_window_update", update)
    async with trio.open_nursery() as nursery:
        reader = trio.CancelScope()

        async def read() -> None:
            with reader:
                await fixes._window_update_uncancelled(object(), bytes_read=512)
                sent.append(-1)  # the read goes on to return its bytes (then sees its cancel)

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        reader.cancel()  # Ctrl-C while the update waits
        await trio.testing.wait_all_tasks_blocked()
        resume.set()
    assert sent == [512, -1]
