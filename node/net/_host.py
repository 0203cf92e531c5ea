"""The libp2p host every node runs: TCP + Noise (only) + Yamux, identity from the keystore.

Rules: no other security transport is ever offered (a plaintext or SECIO dialer is refused);
one connection per peer (py-libp2p adds 250 ms to every new connection otherwise); the
fixes in ``_libp2p_fixes`` are applied before any host exists; ``open_host`` closes the
host (every connection, stream and listener) when its block exits, however it exits.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from wallet import Identity

from ._libp2p_fixes import apply as _apply_libp2p_fixes

__all__ = ["open_host", "parse_peer_addr", "peer_addrs", "ID", "PeerInfo", "IHost"]

_apply_libp2p_fixes()


# One connection per peer; the auto-connector keeps a modest floor (py-libp2p's default of 50
# has every node dial 200 stale peerstore entries every 30 s).
_CONNECTIONS = ConnectionConfig(
    max_connections_per_peer=1, min_connections=8, low_watermark=16, high_watermark=200, max_connections=256
)


def _build_host(identity: Identity, mdns: bool = False) -> IHost:
    key_pair = create_new_key_pair(identity.seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        connection_config=_CONNECTIONS,
        enable_mDNS=mdns,
    )


@asynccontextmanager
async def open_host(identity: Identity, listen: Sequence[str], mdns: bool = False) -> AsyncIterator[IHost]:
    """Run a host listening on ``listen`` (multiaddr strings) for the duration of the block;
    with ``mdns``, it announces itself and learns peers on the local network.

    Raises:
        ValueError: a listen address is not a valid multiaddr.
        OSError: no listen address could be bound.
    """
    addrs = [multiaddr.Multiaddr(a) for a in listen]
    host = _build_host(identity, mdns)
    async with host.run(listen_addrs=addrs):
        if listen and not host.get_addrs():
            await host.close()
            raise OSError(f"could not listen on {', '.join(listen)}")
        try:
            yield host
        finally:
            # even when cancelled (shutdown, an embedding program's cancel scope): close the sockets
            # so peers see the connections end now, not at process exit
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await host.close()


def parse_peer_addr(addr: str) -> PeerInfo:
    """A ``/ip4/…/tcp/…/p2p/12D3…`` multiaddr as peer info.

    Raises:
        ValueError: not a multiaddr ending in /p2p/<peer id>.
    """
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:  # multiaddr raises several unrelated types
        raise ValueError(f"not a peer address (…/p2p/<peer id>): {addr!r}") from exc


def peer_addrs(host: IHost) -> list[str]:
    """The host's listen addresses, each ending in /p2p/<its peer id>."""
    return [str(a) for a in host.get_addrs()]
