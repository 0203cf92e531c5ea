"""The network role: everything that touches libp2p, and nothing that knows what is sold.

    _libp2p_fixes   version-gated patches of py-libp2p 0.8.1's traps (each with a test)
    _host           the libp2p host: Noise + Yamux over TCP only, listen (a taken port is refused), bounds
    _addrs          the address book: what we publish and tell each peer, reachability (AutoNAT client)
    _autonat        AutoNAT v1 client and bounded server (py-libp2p's answers OK without dialling)
    _identify       identify lists per-peer addresses; unspecified addresses peers send are dropped
    _relay          circuit relay v2: the relay role with limits, the client's reservations and circuits
    _dcutr          DCUtR on a relayed connection: connection reversal to a direct one, with dial bounds
    _circuit        what relay, DCUtR, AutoNAT and the address book share: IPs, direct addresses,
                    relayed vs direct connections, bounded protobuf messages on streams
    _liveness       keep-alive pings: a connection whose peer went silent is closed (partitions heal)
    _dial           dialling a known peer across its restarts (fresh addresses, no negative cache, the
                    cause of every failure named); the peer cache a node rejoins at start
    _streams        FramedStream: protocol frames over a libp2p stream, with bounded reads
    _market_view    the validated view of every listing (pure: no I/O)
    _market         the market: DHT records + GossipSub, publishing our listing, lookups

Imports only ``protocol``, ``wallet``, libp2p and ``node``'s own ``_clock`` and ``_errors``: no other
role of ``node`` (a test checks it).
"""

from ._addrs import AddressBook, AddressConfig
from ._autonat import AutoNATLimits, autonat_server
from ._host import ConnectionManager, HostLimits, PeerInfo, connection_manager, open_host, parse_peer_addr, peer_addrs
from ._liveness import keep_alive
from ._market import Market, MarketConfig, listing_key, model_key, open_market
from ._market_view import MarketRow, MarketView
from ._relay import Relay, RelayClient, RelayLimits, connection_kind, serve_relay
from ._streams import FramedStream, StreamClosed

__all__ = [
    "AddressBook",
    "AddressConfig",
    "autonat_server",
    "AutoNATLimits",
    "connection_kind",
    "connection_manager",
    "ConnectionManager",
    "FramedStream",
    "HostLimits",
    "keep_alive",
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
    "Relay",
    "RelayClient",
    "RelayLimits",
    "serve_relay",
    "StreamClosed",
]
