"""Dialling a provider before any money is locked for it."""

from __future__ import annotations

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from ._failures import ProviderFailed, learn
from ._trust import TrustBook

__all__ = ["reach"]


async def reach(host: IHost, provider: str, addrs: tuple[str, ...], *, timeout_s: float = 5.0,
                trust: TrustBook | None = None) -> None:
    """Make sure ``provider`` is connected (dialling ``addrs`` if not), before money is locked for it.

    Raises:
        ProviderFailed: it cannot be reached within ``timeout_s`` (recorded in ``trust``).
    """
    try:
        pid = ID.from_base58(provider)
        with trio.fail_after(timeout_s):
            if pid not in host.get_connected_peers():
                await host.connect(PeerInfo(pid, [multiaddr.Multiaddr(a) for a in addrs]))
    except Exception as exc:  # libp2p's dial errors, bad addresses, and the timeout
        failed = ProviderFailed(f"cannot reach provider {provider}: {exc or type(exc).__name__}")
        learn(trust, provider, failed)
        raise failed from exc
