"""A connection whose peer stopped answering is closed (node/net/_liveness.py): a link that goes down
sends no FIN, so without the pings the node would hold a dead connection and never redial."""

from __future__ import annotations

import trio
from libp2p.host.ping import ID as PING_PROTOCOL_ID

from node.net._dial import dial
from node.net._host import open_host, peer_addrs
from node.net._liveness import keep_alive, ping_once
from tests.node.helpers import LOOPBACK
from tests.support import identity


async def _wait_for(predicate, timeout_s: float, what: str) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


async def test_a_peer_that_answers_pings_stays_connected_one_that_does_not_is_closed():
    async with open_host(identity("pinger"), LOOPBACK) as pinger, \
            open_host(identity("alive"), LOOPBACK) as alive, \
            open_host(identity("mute"), LOOPBACK) as mute:

        async def swallow(stream) -> None:  # a peer whose link died: reads, never answers
            await trio.sleep_forever()

        mute.set_stream_handler(PING_PROTOCOL_ID, swallow)
        await dial(pinger, alive.get_id(), peer_addrs(alive), timeout_s=5)
        await dial(pinger, mute.get_id(), peer_addrs(mute), timeout_s=5)
        assert await ping_once(pinger, alive.get_id(), 2.0)
        assert not await ping_once(pinger, mute.get_id(), 0.3)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive, pinger, 0.1, 0.3)
            await _wait_for(lambda: mute.get_id() not in pinger.get_connected_peers(), 10, "the mute peer closed")
            assert alive.get_id() in pinger.get_connected_peers()
            nursery.cancel_scope.cancel()


async def test_one_lost_ping_is_not_a_verdict():
    from libp2p.host.ping import handle_ping

    async with open_host(identity("pinger2"), LOOPBACK) as pinger, open_host(identity("flaky"), LOOPBACK) as flaky:
        swallowed = trio.Event()

        async def lose_the_first(stream) -> None:
            if not swallowed.is_set():
                swallowed.set()
                await trio.sleep_forever()
            await handle_ping(stream)

        flaky.set_stream_handler(PING_PROTOCOL_ID, lose_the_first)
        await dial(pinger, flaky.get_id(), peer_addrs(flaky), timeout_s=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive, pinger, 0.1, 0.3)
            await swallowed.wait()
            answered = 0
            with trio.fail_after(10):
                while answered < 5:  # rounds after the lost one: each answered, the peer stays
                    assert await ping_once(pinger, flaky.get_id(), 2.0)
                    answered += 1
                    await trio.sleep(0.1)
            assert flaky.get_id() in pinger.get_connected_peers()
            nursery.cancel_scope.cancel()


async def test_a_stall_of_our_own_loop_drops_nobody():
    import time

    async with open_host(identity("pinger3"), LOOPBACK) as pinger, open_host(identity("calm"), LOOPBACK) as calm:
        await dial(pinger, calm.get_id(), peer_addrs(calm), timeout_s=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive, pinger, 0.05, 0.2, 32, 1)  # one miss would close
            for _ in range(3):
                await trio.sleep(0.03)
                time.sleep(1.5)  # our event loop blocked: every ping in flight looks late
            await trio.sleep(0.5)
            assert calm.get_id() in pinger.get_connected_peers()
            nursery.cancel_scope.cancel()
