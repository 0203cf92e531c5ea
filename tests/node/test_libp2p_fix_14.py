"""libp2p fix 14: ``host.get_addrs()`` keeps a circuit address whole (py-libp2p 0.8.1 strips its first
/p2p/, putting the relay's IP under our id in the listing, the peer record and the DHT)."""

from __future__ import annotations

import multiaddr

from node.net import _libp2p_fixes
from node.net._host import open_host
from tests.node.helpers import LOOPBACK
from tests.support import identity

RELAY = "12D3KooWGC6TvWhfapngX6wvJHMYvKpDMXPb3ZnCZ6dMoaMtimQ5"


def _factory(host):
    def addrs(_candidates):
        return [multiaddr.Multiaddr(f"/ip4/10.60.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit"),
                multiaddr.Multiaddr(f"/ip4/10.0.0.5/tcp/4001/p2p/{host.get_id()}"),
                multiaddr.Multiaddr("/ip4/10.0.0.6/tcp/4001")]
    return addrs


async def test_circuit_addresses_keep_their_relay_part():
    async with open_host(identity("fix14"), LOOPBACK) as host:
        host._addrs_factory = _factory(host)
        me = str(host.get_id())
        assert [str(a) for a in host.get_addrs()] == [
            f"/ip4/10.60.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{me}",
            f"/ip4/10.0.0.5/tcp/4001/p2p/{me}",
            f"/ip4/10.0.0.6/tcp/4001/p2p/{me}",
        ]


async def test_without_the_fix_the_relay_ip_is_published_under_our_id(monkeypatch):
    from libp2p.host.basic_host import BasicHost

    monkeypatch.setattr(BasicHost, "get_addrs", _libp2p_fixes._PY_LIBP2P_GET_ADDRS)
    async with open_host(identity("fix14-off"), LOOPBACK) as host:
        host._addrs_factory = _factory(host)
        assert str(host.get_addrs()[0]) == f"/ip4/10.60.0.11/tcp/4001/p2p/{host.get_id()}"
