"""DCUtR (``/libp2p/dcutr``) on a relayed connection, as connection reversal to a direct one.

Rules: we run the spec's B (the side that accepted the relayed connection): Connect (our
addresses), Connect back (A's), Sync, then we dial A's addresses ourselves: at most ``MAX_ADDRS`` of
them, once each, at most one attempt per peer per ``PEER_S`` (remembered for ``MEMORY`` peers), never
unspecified, link-local, multicast or reserved ones, loopback only when the relay itself is on
loopback (one machine), non-global ones (private, CGNAT) only in a network we are on (an
interface's, or a relay's we reach directly), so a peer cannot make us scan our LAN or a third
party. As A we answer Connect with our addresses and wait for Sync.

A, per the spec, would also dial B on Sync; ours does not: TCP hole punching needs simultaneous
open from the listen port (SO_REUSEPORT, which libp2p fix 11 removes), and two crossing dials leave
two direct connections that each side would trim differently. So this works when A is reachable
(the usual case: a consumer with a public address, or a private provider dialled by a public
consumer); two peers both behind NAT stay relayed. Messages follow ``_circuit``'s bounds.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch

from ._circuit import (
    MESSAGE_TIMEOUT_S,
    close_quietly,
    connection_kind,
    direct_addrs,
    ip_of,
    read_message,
    reset_quietly,
    write_message,
)
from ._dial import DialFailed, describe, dialer

__all__ = ["DCUTR_PROTOCOL", "DCUtR", "dcutr_targets"]

_logger = logging.getLogger(__name__)

DCUTR_PROTOCOL = TProtocol("/libp2p/dcutr")
MAX_OBS_ADDRS = 8  # addresses we tell a peer in our Connect, and read of its


def dcutr_targets(raw: Sequence[Any], nets: Sequence[Any], *, loopback: bool, limit: int) -> list[multiaddr.Multiaddr]:
    """Which of a peer's DCUtR addresses we dial: at most ``limit``; never unspecified, link-local,
    multicast or reserved; loopback only if ``loopback``; a non-global IP (private, CGNAT's
    100.64/10, documentation ranges) only inside ``nets``."""
    out: list[multiaddr.Multiaddr] = []
    for addr in direct_addrs(raw, MAX_OBS_ADDRS):
        ip = ip_of(addr)
        if ip is None or ip.is_unspecified or ip.is_link_local or ip.is_multicast or (ip.version == 4 and ip.is_reserved):
            continue
        if ip.is_loopback:
            if not loopback:
                continue
        elif not ip.is_global and not any(ip in net for net in nets if net.version == ip.version):
            continue
        if addr not in out:
            out.append(addr)
        if len(out) >= limit:
            break
    return out


class DCUtR:
    """Both sides of DCUtR for one host (module docstring: the rules).

    Args:
        own_addrs: what our Connect tells the other side (default: the host's addresses).
        scope: for the relay a connection came through, the networks a dial may go to and whether
            loopback may (the relay client knows its relays' connections).
    """

    MAX_ADDRS = 4
    PEER_S = 60.0
    MEMORY = 1024

    def __init__(self, host: IHost, scope: Callable[[ID], tuple[list[Any], bool]],
                 own_addrs: Callable[[], Sequence[str]] | None = None) -> None:
        self.host = host
        self.scope = scope
        self.own_addrs = own_addrs
        self.upgrades = 0  # direct connections it made
        self._at: dict[ID, float] = {}  # peer -> when we last ran DCUtR with it (trio time)

    def _my_addrs(self) -> list[bytes]:
        texts = list(self.own_addrs()) if self.own_addrs is not None else [str(a) for a in self.host.get_addrs()]
        return [a.to_bytes() for a in direct_addrs(texts, MAX_OBS_ADDRS)]

    def _allowed(self, peer: ID) -> bool:
        """At most one attempt per peer per ``PEER_S`` (reconnecting does not buy dials)."""
        now = trio.current_time()
        if now - self._at.get(peer, -math.inf) < self.PEER_S:
            return False
        for old in [p for p, at in self._at.items() if now - at >= self.PEER_S]:
            del self._at[old]
        if len(self._at) >= self.MEMORY:  # that many attempts a minute: rest until one ages out
            return False
        self._at[peer] = now
        return True

    async def initiate(self, peer: ID, relay: ID) -> None:
        """B's side on a connection from ``peer`` through ``relay``: Connect, Connect back, Sync, then
        dial A's addresses (our connection reversal)."""
        if not self._allowed(peer):
            return
        stream = None
        try:
            with trio.fail_after(MESSAGE_TIMEOUT_S):
                stream = await self.host.new_stream(peer, [DCUTR_PROTOCOL])
                sent = trio.current_time()
                await write_message(stream, HolePunch(type=HolePunch.CONNECT, ObsAddrs=self._my_addrs()))
                reply = await read_message(stream, HolePunch)
                rtt = trio.current_time() - sent
                if reply.type != HolePunch.CONNECT:
                    raise ValueError("expected Connect")
                await write_message(stream, HolePunch(type=HolePunch.SYNC))
            await close_quietly(stream)
            nets, loopback = self.scope(relay)
            addrs = dcutr_targets(reply.ObsAddrs, nets, loopback=loopback, limit=self.MAX_ADDRS)
            if not addrs:
                return
            await trio.sleep(rtt / 2)
            if connection_kind(self.host, peer) == "direct":
                return
            try:  # one round: each address at most once
                await dialer(self.host).dial_direct(peer, addrs, deadline=trio.current_time() + 5)
                self.upgrades += 1
            except DialFailed as exc:
                _logger.debug("DCUtR dial of %s failed: %s", peer, exc)
        except Exception as exc:
            _logger.debug("DCUtR with %s failed: %s", peer, describe(exc))
            if stream is not None:
                await reset_quietly(stream)

    async def handle(self, stream: Any) -> None:
        """A's side: answer Connect with our addresses, wait for Sync (B dials us)."""
        try:
            msg = await read_message(stream, HolePunch)
            if msg.type != HolePunch.CONNECT:
                return
            await write_message(stream, HolePunch(type=HolePunch.CONNECT, ObsAddrs=self._my_addrs()))
            await read_message(stream, HolePunch)  # Sync
        except Exception as exc:  # the peer's garbage or its departure
            _logger.debug("DCUtR stream ended: %s", describe(exc))
        finally:
            await close_quietly(stream)
