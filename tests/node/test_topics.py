"""Gossip topics (node/net/_topics.py): checked before delivery, refused messages never relayed, rate limits bounded."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from node.net import MarketConfig, open_host, open_market, parse_peer_addr, peer_addrs
from node.net._topics import RateLimit, open_topic
from tests.node.helpers import LOOPBACK, wait_until
from tests.support import identity

TOPIC = "inferswarm/test-topic/1"


def _subscribed(market, topic, peer) -> bool:
    return peer in market.pubsub.peer_topics.get(topic, set())


async def test_a_refused_message_is_not_relayed_and_an_accepted_one_arrives():
    # a line a - b - c: whatever c gets came through b's validator
    got: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
    rules = {"a": lambda d: True, "b": lambda d: not d.startswith(b"bad"), "c": lambda d: True}
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())  # exits last: its drains end first
        markets = []
        for name in ("a", "b", "c"):
            ident = identity(f"topic-{name}")
            host = await stack.enter_async_context(open_host(ident, LOOPBACK))
            market = await stack.enter_async_context(open_market(host, ident, MarketConfig(max_peers_per_subnet=0)))
            if markets:
                await host.connect(parse_peer_addr(peer_addrs(markets[-1].host)[0]))
            markets.append(market)
            await open_topic(market, TOPIC, max_bytes=64, nursery=nursery,
                             accept=lambda data, now, rule=rules[name]: data if rule(data) else None,
                             on_message=got[name].append)
        a, b, c = markets
        await wait_until(lambda: _subscribed(a, TOPIC, b.host.get_id()) and _subscribed(b, TOPIC, c.host.get_id()),
                         what="the line subscribed")
        async def publish(data: bytes) -> None:
            await a.pubsub.publish(TOPIC, data)

        await publish(b"bad one")
        await publish(b"x" * 65)  # over max_bytes: refused by everyone, even the publisher
        await publish(b"good one")
        await wait_until(lambda: b"good one" in got["c"], what="the good message at c")
        assert got["a"] == [b"bad one", b"good one"]  # our own messages pass our own validator
        assert got["b"] == [b"good one"]
        assert got["c"] == [b"good one"]  # b refused the bad one, so it never reached c
        nursery.cancel_scope.cancel()


def test_rate_limit_refills_and_holds_a_bounded_number_of_keys():
    now = [0.0]
    limit = RateLimit(burst=2, per_s=0.5, clock=lambda: now[0], max_keys=3)
    assert [limit.take("k") for _ in range(3)] == [True, True, False]
    now[0] = 2.0  # one token back
    assert [limit.take("k") for _ in range(2)] == [True, False]
    for key in ("a", "b", "c", "d"):
        assert limit.take(key)
    assert len(limit._buckets) == 3  # the least recently used key went
