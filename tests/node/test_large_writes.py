"""Large writes stay whole: a ~1 MiB framed message over a stream while other writes happen on
it, and ~100 KiB gossip messages, arrive intact."""

from __future__ import annotations

import hashlib

import trio

import protocol
from node.net._host import open_host, parse_peer_addr, peer_addrs
from tests.node.helpers import LOOPBACK, market_swarm, wait_until
from tests.support import identity

PROTO = "/inferswarm/test-bulk/1.0.0"


def payload(tag: int, size: int) -> bytes:
    seed = hashlib.sha256(str(tag).encode()).digest()
    return (seed * (size // 32 + 1))[:size]


async def test_one_mib_write_with_concurrent_small_writes_arrives_intact():
    big = [payload(i, 1 << 20) for i in range(2)]
    small = [payload(100 + i, 200) for i in range(40)]
    received: list[bytes] = []
    done = trio.Event()

    async def handler(stream):
        reader = protocol.FrameReader(max_size=2 << 20)
        while len(received) < len(big) + len(small):
            data = await stream.read(1 << 16)
            if not data:
                break
            received.extend(reader.feed(data))
        done.set()

    async with open_host(identity("bulk-server"), LOOPBACK) as server, open_host(identity("bulk-client"), LOOPBACK) as client:
        server.set_stream_handler(PROTO, handler)
        await client.connect(parse_peer_addr(peer_addrs(server)[0]))
        stream = await client.new_stream(server.get_id(), [PROTO])
        async with trio.open_nursery() as nursery:
            for b in big:
                nursery.start_soon(stream.write, protocol.frame(b, max_size=2 << 20))
            for s in small:
                nursery.start_soon(stream.write, protocol.frame(s))
        with trio.fail_after(30):
            await done.wait()
        await stream.close()
    assert sorted(received) == sorted(big + small)


async def test_hundred_kib_gossip_messages_arrive_intact():
    topic = "inferswarm/test-bulk/1"
    messages = [payload(200 + i, 100 * 1024) for i in range(5)]
    async with market_swarm(3, prefix="bulkgossip") as (stack, markets):
        subs = [await m.pubsub.subscribe(topic) for m in markets[1:]]
        await wait_until(lambda: all(len(m.pubsub.peer_topics.get(topic, ())) >= 1 for m in markets),
                         what="topic mesh")
        got: list[list[bytes]] = [[] for _ in subs]

        async def drain(i, sub):
            while len(got[i]) < len(messages):
                got[i].append((await sub.get()).data)

        async with trio.open_nursery() as nursery:
            for i, sub in enumerate(subs):
                nursery.start_soon(drain, i, sub)
            for m in messages:
                await markets[0].pubsub.publish(topic, m)
        assert all(sorted(g) == sorted(messages) for g in got)
