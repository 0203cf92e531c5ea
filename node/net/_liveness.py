"""Dead connections are found and closed: a libp2p ping to every connected peer at intervals.

A network link that goes down (a partition, a laptop's Wi-Fi, a NAT that forgot its mapping)
sends no FIN and no RST: TCP keeps such a connection "open" for as long as nothing is written,
and for ~15 minutes of retransmissions when something is. Until it is closed, py-libp2p dials
nobody anew (one connection per peer), gossip keeps the peer in its mesh and the bootstrap loop
sees a peer that looks connected, so the node never heals. ``keep_alive`` pings every connected
peer (``/ipfs/ping/1.0.0``, which every py-libp2p host answers) every ``interval_s``; a peer that
misses ``misses`` pings in a row (no answer within ``timeout_s`` each) has its connections closed,
which ends its sessions' streams (the session code then fails the unfinished call, unpaid) and
lets the reconnect logic dial anew. A dead link is so found within ~``misses x (interval + timeout)``
(30 s by default).

Not fooled by our own stalls: a round that starts late (our event loop was blocked, e.g. by a
burst of CPU work) records no misses, so a slow moment of ours never drops healthy peers; and one
lost ping is not a verdict.

Cost: one 32-byte ping stream per peer per interval (200 connections at 10 s: 20 small streams
a second), at most ``concurrency`` at once. Peers ping us the same way; the ping protocol is a
background protocol (``_host.BACKGROUND_PROTOCOLS``): it never makes a connection look busy.
"""

from __future__ import annotations

import logging
import secrets

import trio
from libp2p.abc import IHost
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import PING_LENGTH
from libp2p.peer.id import ID

from ._circuit import close_quietly

__all__ = ["keep_alive", "ping_once", "KEEPALIVE_INTERVAL_S", "KEEPALIVE_TIMEOUT_S", "KEEPALIVE_MISSES"]

_logger = logging.getLogger(__name__)

#: a dead link is found within misses x (interval + timeout): 30 s by default
KEEPALIVE_INTERVAL_S = 10.0
KEEPALIVE_TIMEOUT_S = 5.0
KEEPALIVE_MISSES = 2
#: a round that starts this much later than planned says our own loop stalled: it judges nobody
LATE_ROUND_S = 1.0


async def ping_once(host: IHost, peer: ID, timeout_s: float) -> bool:
    """One ping round trip to ``peer`` on its existing connection; whether it answered in time."""
    payload = secrets.token_bytes(PING_LENGTH)
    with trio.move_on_after(timeout_s):
        stream = None
        try:
            stream = await host.new_stream(peer, [PING_PROTOCOL_ID])
            await stream.write(payload)
            got = b""
            while len(got) < PING_LENGTH:
                chunk = await stream.read(PING_LENGTH - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == payload
        except Exception as exc:  # reset, refused, gone: not alive
            _logger.debug("ping to %s failed: %s", peer, exc)
            return False
        finally:
            if stream is not None:
                await close_quietly(stream, 1.0, shield=True)
    return False


async def keep_alive(host: IHost, interval_s: float = KEEPALIVE_INTERVAL_S, timeout_s: float = KEEPALIVE_TIMEOUT_S,
                     concurrency: int = 32, misses: int = KEEPALIVE_MISSES) -> None:
    """Ping every connected peer every ``interval_s``; close the connections of a peer that missed
    ``misses`` pings in a row (each ``timeout_s``); until cancelled."""
    limiter = trio.CapacityLimiter(concurrency)
    missed: dict[ID, int] = {}

    async def check(peer: ID, judge: bool) -> None:
        async with limiter:
            if peer not in host.get_connected_peers():
                return
            started = trio.current_time()
            if await ping_once(host, peer, timeout_s):
                missed.pop(peer, None)
                return
            if not judge or trio.current_time() - started > timeout_s + LATE_ROUND_S:
                return  # our loop stalled during the wait: no verdict on the peer
            missed[peer] = missed.get(peer, 0) + 1
            if missed[peer] < misses:
                return
            missed.pop(peer, None)
            _logger.info("peer %s missed %d pings of %.0f s: closing its connection", peer, misses, timeout_s)
            with trio.move_on_after(5):
                try:
                    await host.get_network().close_peer(peer)
                except Exception as exc:  # already going
                    _logger.debug("closing the connection of %s failed: %s", peer, exc)

    planned = trio.current_time() + interval_s
    while True:
        await trio.sleep_until(planned)
        judge = trio.current_time() - planned <= LATE_ROUND_S
        me = host.get_id()
        connected = set(host.get_connected_peers())
        for gone in [p for p in missed if p not in connected]:
            del missed[gone]
        async with trio.open_nursery() as nursery:
            for peer in connected:
                if peer != me:
                    nursery.start_soon(check, peer, judge)
        planned = max(planned + interval_s, trio.current_time())
