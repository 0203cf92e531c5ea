"""DCUtR: after a relayed connection, the private side dials the consumer's addresses from the
Connect exchange; the direct connection replaces the relayed one for new streams. Also the
relayed vs direct round trip and the reservation time (printed, -s to see)."""

from __future__ import annotations

import statistics

import multiaddr
import trio

from node.net._dial import dialer
from node.net._relay import RelayClient, connection_kind
from tests.node.helpers import wait_until
from tests.node.test_relay import ECHO, relay_rig, roundtrip


async def rtts(host, peer, n=50):
    stream = await host.new_stream(peer, [ECHO])
    times = []
    for _ in range(n):
        start = trio.current_time()
        assert await roundtrip(stream, b"p" * 100) == b"p" * 100
        times.append(trio.current_time() - start)
    await stream.close()
    return statistics.median(times) * 1000, stream


async def test_relayed_connection_upgrades_to_direct():
    async with relay_rig() as (relay_host, relay, (client,), consumer, nursery):
        start = trio.current_time()
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        reserve_ms = (trio.current_time() - start) * 1000  # dial of the relay + reservation
        start = trio.current_time()
        await client.reserve(relay_host.get_id())  # a renewal over the standing connection
        renew_ms = (trio.current_time() - start) * 1000
        consumer_client = RelayClient(consumer)  # answers DCUtR (not needing a relay itself)
        await nursery.start(consumer_client.run, lambda: False)
        assert consumer_client.circuit_addrs() == []
        provider = client.host.get_id()
        await dialer(consumer).dial(provider, [multiaddr.Multiaddr(client.circuit_addrs()[0])],
                                    deadline=trio.current_time() + 10)
        dialled = trio.current_time()
        relayed_ms, relayed_stream = await rtts(consumer, provider)
        await wait_until(lambda: connection_kind(consumer, provider) == "direct", what="a direct connection")
        upgrade_ms = (trio.current_time() - dialled) * 1000  # at most: the round trips above ran first
        assert client.connection_kind(consumer.get_id()) == "direct" and client.upgrades == 1
        direct_ms, stream = await rtts(consumer, provider)
        assert stream.muxed_conn is not relayed_stream.muxed_conn  # new streams take the direct one
        # the relayed connection, idle now, is closed
        await wait_until(lambda: len(consumer.get_network().get_connections(provider)) == 1, what="relayed closed")
        await wait_until(lambda: relay.open_circuits == 0, what="the circuit released")
        print(f"\nreservation {reserve_ms:.1f} ms (renewal {renew_ms:.1f} ms); direct within {upgrade_ms:.0f} ms; round trip 100 B: relayed {relayed_ms:.2f} ms, "
              f"direct {direct_ms:.2f} ms (median of 50)")
