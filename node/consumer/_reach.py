"""Dialling a provider before any money is locked for it (``node.net._dial``: a restarted provider
is found at its new address, never refused for a minute by libp2p's negative cache)."""

from __future__ import annotations

from libp2p.abc import IHost
from libp2p.peer.id import ID

from ..net._dial import DialFailed, describe, dial
from ._failures import ProviderFailed, learn
from ._trust import TrustBook

__all__ = ["reach"]


async def reach(host: IHost, provider: str, addrs: tuple[str, ...], *, timeout_s: float = 5.0,
                trust: TrustBook | None = None) -> None:
    """Make sure ``provider`` is connected (dialling ``addrs``, then what else is known of it, if
    not), before money is locked for it.

    Raises:
        ProviderFailed: it cannot be reached within ``timeout_s`` (recorded in ``trust``); the
            message names the cause.
    """
    try:
        pid = ID.from_base58(provider)
    except Exception as exc:  # not a peer id: a bad listing never reaches here, a caller's might
        failed = ProviderFailed(f"cannot reach provider {provider}: not a peer id ({describe(exc)})")
        learn(trust, provider, failed)
        raise failed from exc
    try:
        await dial(host, pid, addrs, timeout_s=timeout_s)
    except DialFailed as exc:
        failed = ProviderFailed(f"cannot reach provider {provider}: {exc}")
        learn(trust, provider, failed)
        raise failed from exc
