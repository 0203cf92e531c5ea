"""Nodes that joined through one bootstrap peer connect to their DHT neighbourhood (``Market._neighbour_loop``):
without it every node knew only the bootstrap node, the swarm was a star, and gossip (a 6-12 peer mesh on the
bootstrap node) left some leaves without a listing (bench/swarm_procs: 72 of 245 arrivals missing at 50 nodes)."""

from __future__ import annotations

from contextlib import AsyncExitStack

from node.net import MarketConfig, open_host, open_market, parse_peer_addr, peer_addrs
from tests.node.helpers import LOOPBACK, listing_template, wait_until
from tests.support import identity


async def test_leaves_of_a_star_connect_to_each_other_and_all_get_the_listing():
    config = MarketConfig(max_peers_per_subnet=0, min_peers=4, neighbours_every_s=0.5, routing_interval_s=0.2)
    async with AsyncExitStack() as stack:
        hub_id = identity("star-hub")
        hub_host = await stack.enter_async_context(open_host(hub_id, LOOPBACK))
        hub = await stack.enter_async_context(open_market(hub_host, hub_id, config))
        leaves = []
        for i in range(7):
            ident = identity(f"star-leaf-{i}")
            host = await stack.enter_async_context(open_host(ident, LOOPBACK))
            leaves.append(await stack.enter_async_context(open_market(host, ident, config)))
            await host.connect(parse_peer_addr(peer_addrs(hub_host)[0]))  # the hub is all a leaf is told
        hub_peer = hub_host.get_id()

        def leaf_peers(m):
            return [p for p in m.host.get_connected_peers() if p != hub_peer]

        await wait_until(lambda: all(len(leaf_peers(m)) >= 3 for m in leaves), timeout=30,
                         what="every leaf connected to other leaves, not only to the hub")
        provider = leaves[0]
        provider.set_listing(listing_template())
        pid = provider.identity.peer_id
        await wait_until(lambda: all(m.view.listing(pid, m.now()) for m in [hub, *leaves]), timeout=30,
                         what="the listing at every node")
