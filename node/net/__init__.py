"""The network role: everything that touches libp2p, and nothing that knows what is sold.

    _libp2p_fixes   version-gated patches of py-libp2p 0.8.1's traps (each with a test)
    _host           the libp2p host: Noise + Yamux over TCP only, listen (a taken port is refused), addresses
    _dial           dialling a known peer across its restarts (fresh addresses, no negative cache, the
                    cause of every failure named); the peer cache a node rejoins at start
    _streams        FramedStream: protocol frames over a libp2p stream, with bounded reads
    _market_view    the validated view of every listing (pure: no I/O)
    _market         the market: DHT records + GossipSub, publishing our listing, lookups

Imports only ``protocol``, ``wallet``, libp2p and ``node``'s own ``_clock`` and ``_errors``: no other
role of ``node`` (a test checks it).
"""

from ._host import ConnectionManager, HostLimits, PeerInfo, connection_manager, open_host, parse_peer_addr, peer_addrs
from ._market import Market, MarketConfig, listing_key, model_key, open_market
from ._market_view import MarketRow, MarketView
from ._streams import FramedStream, StreamClosed

__all__ = [
    "connection_manager",
    "ConnectionManager",
    "FramedStream",
    "HostLimits",
    "listing_key",
    "Market",
    "MarketConfig",
    "MarketRow",
    "MarketView",
    "model_key",
    "open_host",
    "open_market",
    "parse_peer_addr",
    "peer_addrs",
    "PeerInfo",
    "StreamClosed",
]
