"""Local discovery: two nodes started with mdns and no bootstrap address find each other's offers."""

from __future__ import annotations

from node import open_swarm


async def test_nodes_with_mdns_find_each_other_without_bootstrap(tmp_path):
    async with open_swarm(tmp_path / "a", passphrase="pw", mdns=True) as a, \
            open_swarm(tmp_path / "b", passphrase="pw", mdns=True) as b:
        await a.offer("local-model", input_price=1, output_price=1)
        rows = await b.wait_for("local-model", timeout=30)  # on the market's change event
        assert [r["peer_id"] for r in rows] == [a.peer_id]
        assert b.service.host.get_id() in a.service.host.get_connected_peers()
