"""Local discovery: two nodes started with mdns and no bootstrap address find each other's offers."""

from __future__ import annotations

import trio

from node import open_swarm


async def test_nodes_with_mdns_find_each_other_without_bootstrap(tmp_path):
    async with open_swarm(tmp_path / "a", passphrase="pw", mdns=True) as a, \
            open_swarm(tmp_path / "b", passphrase="pw", mdns=True) as b:
        a.offer("local-model", input_price=1, output_price=1)
        with trio.fail_after(30):
            while not b.service.market.view.listing(a.peer_id, b.service.market.now()):
                await trio.sleep(0.1)
        assert b.service.host.get_id() in a.service.host.get_connected_peers()
