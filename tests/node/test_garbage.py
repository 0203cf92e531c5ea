"""A node keeps serving after garbage arrives on every protocol it speaks."""

from __future__ import annotations

import trio

from tests.node.helpers import listing_template, market_swarm, until_market

GARBAGE = [
    b"\x05\xff\xfe\xfd\xfc\xfb",  # a 6-byte frame that is not protobuf
    b"\xff\xff\xff\xff\x0f",  # a huge length prefix
    b"\x0a\x08garbage!" * 50,  # plausible-looking but wrong
    bytes(range(256)),
]


async def test_garbage_on_every_protocol_leaves_the_node_serving():
    async with market_swarm(3, prefix="garbage") as (stack, markets):
        victim, attacker, witness = markets
        protocols = [p for p in victim.host.get_mux().get_protocols() if p]
        assert any("meshsub" in p for p in protocols) and any("kad" in p for p in protocols)
        for proto in protocols:
            for junk in GARBAGE:
                try:
                    stream = await attacker.host.new_stream(victim.host.get_id(), [proto])
                except Exception:  # a protocol that refuses a new stream now is fine too
                    continue
                try:
                    await stream.write(junk)
                    with trio.move_on_after(0.5):
                        await stream.read(1024)
                    await stream.close()
                except Exception:  # the victim reset the stream: the right answer to garbage
                    pass
        # the victim still gossips, answers the DHT and accepts new streams
        victim.set_listing(listing_template())
        pid = victim.identity.peer_id
        await until_market(witness, lambda m: m.view.listing(pid, m.now()) is not None, what="gossip after garbage")
        found = await witness.lookup("tiny")
        assert [lst.provider for lst in found] == [pid]
        assert victim.host.get_network().listeners
