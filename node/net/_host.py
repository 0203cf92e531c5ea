"""The libp2p host every node runs: TCP + Noise (only) + Yamux, identity from the keystore.

Rules: no other security transport is ever offered (a plaintext or SECIO dialer is refused);
one connection per peer (py-libp2p adds 250 ms to every new connection otherwise); the
fixes in ``_libp2p_fixes`` are applied before any host exists; ``open_host`` closes the
host (every connection, stream and listener) when its block exits, however it exits.

Resource bounds (``HostLimits``, docs/DESIGN.md "Resource bounds"): inbound streams are capped
per peer, per (peer, protocol) and in total; a handshake must finish within
``handshake_timeout_s`` in one of ``handshake_slots`` slots (a full pool drops its oldest); and a
``ConnectionManager`` task, living in ``open_host``'s nursery, closes idle connections whenever
there are more than ``high_watermark``, keeping busy, protected, outbound and DHT-table peers.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

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

from protocol import ESCROW_PROTOCOL, SESSION_PROTOCOL
from wallet import Identity

from ._circuit import carries_app_stream
from ._dial import PeerCache
from ._libp2p_fixes import StreamLimits, handshake_gate, set_stream_limits
from ._libp2p_fixes import apply as _apply_libp2p_fixes

__all__ = [
    "open_host",
    "parse_peer_addr",
    "peer_addrs",
    "ID",
    "PeerInfo",
    "IHost",
    "HostLimits",
    "ConnectionManager",
    "connection_manager",
]

_apply_libp2p_fixes()
_logger = logging.getLogger(__name__)

# Per peer: a consumer runs a few sessions at once (16 is generous, and the session handler bounds
# each); a party talks to an agent one request at a time per stream (8); gossip needs one inbound
# stream per peer (4 covers reconnects and both meshsub versions); DHT queries from one peer rarely
# overlap by more than a few (8). Over all protocols 64 per peer, 1024 in all: ~5 per connection at
# the 200-connection watermark; buffered bytes at most 1024 x 512 KiB (the Yamux window cap), 32 MiB a peer.
SESSION_STREAMS_PER_PEER = 16
ESCROW_STREAMS_PER_PEER = 8
DEFAULT_STREAM_LIMITS = StreamLimits(
    total=1024,
    per_peer=64,
    per_protocol=((SESSION_PROTOCOL, SESSION_STREAMS_PER_PEER), (ESCROW_PROTOCOL, ESCROW_STREAMS_PER_PEER),
                  ("/meshsub/", 4), ("/ipfs/kad/", 8),
                  # circuit relay (_relay): a hop stream lives as long as its circuit (the relay allows 8
                  # a peer); a relay we reserved on opens one stop stream per circuit it hands us; one
                  # DCUtR exchange per relayed connection
                  ("/libp2p/circuit/relay/0.2.0/hop", 12), ("/libp2p/circuit/relay/0.2.0/stop", 32),
                  ("/libp2p/dcutr", 2),
                  # AutoNAT (_autonat): the server answers one request per peer at a time
                  ("/libp2p/autonat/", 2),
                  # keep-alive pings (_liveness): one per peer per interval, each way
                  ("/ipfs/ping/", 4)),
    linger_s=2.0,
)

#: stream protocols that do not make a connection busy: gossip streams live as long as the
#: connection, identify/ping/DHT exchanges are background chatter any peer can keep up
BACKGROUND_PROTOCOLS = ("/meshsub/", "/floodsub/", "/ipfs/id/", "/ipfs/ping/", "/ipfs/kad/", "/libp2p/dcutr",
                        "/libp2p/autonat/")


@dataclasses.dataclass(frozen=True)
class HostLimits:
    """What one host holds at most, and how long it waits (the defaults are the daemon's).

    max_connections: py-libp2p's hard cap on connections; inbound ones may take all but
        ``min_connections`` (kept for our own dials).
    high_watermark: above it the connection manager closes idle connections down to ``trim_to``.
    idle_s: a connection with no stream on a non-background protocol for this long is idle.
    grace_s: a new connection is never closed as idle in its first seconds (time to open a stream).
    handshake_timeout_s: Noise + Yamux upgrade deadline (py-libp2p: 10 s; ~10 ms on loopback, well
        under 1 s at 300 ms RTT), and the inbound stream protocol negotiation deadline.
    handshake_slots: handshakes in progress at once; a full pool drops its oldest.
    streams: inbound stream caps.
    """

    max_connections: int = 256
    min_connections: int = 8
    high_watermark: int = 200
    trim_to: int = 160
    idle_s: float = 30.0
    grace_s: float = 10.0
    handshake_timeout_s: float = 5.0
    handshake_slots: int = 64
    check_interval_s: float = 1.0
    streams: StreamLimits = DEFAULT_STREAM_LIMITS

    def connection_config(self) -> ConnectionConfig:
        """py-libp2p's configuration: one connection per peer, trimmed as extra ones arrive (no grace
        period), our timeouts; its own pruner is off (``_libp2p_fixes``): ``ConnectionManager``
        decides what to close."""
        low = min(16, self.high_watermark)
        return ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=min(self.min_connections, low),
            low_watermark=low,
            high_watermark=self.high_watermark,
            max_connections=self.max_connections,
            inbound_upgrade_timeout=self.handshake_timeout_s,
            outbound_upgrade_timeout=self.handshake_timeout_s,
            inbound_stream_protocol_negotiation_timeout=max(1.0, self.handshake_timeout_s),
            grace_period=0.0,
        )


class ConnectionManager:
    """Closes idle connections while the host holds more than ``high_watermark``.

    Never closed: a connection in its grace period, one with a stream on a non-background
    protocol now or within ``idle_s``, a protected peer (``protect`` or libp2p's ``Swarm.protect``).
    Of the rest, closed first: inbound before outbound (we dialled bootstrap peers and those we
    rent from), peers no ``keep_peers`` predicate holds (the DHT routing table), longest idle first.
    """

    def __init__(self, host: IHost, limits: HostLimits) -> None:
        self.host = host
        self.limits = limits
        self.pruned = 0
        self._keep: list[Callable[[ID], bool]] = []
        self._protected: set[ID] = set()
        self._seen: dict[int, float] = {}  # id(connection) -> first seen
        self._active: dict[int, float] = {}  # id(connection) -> last seen busy

    def keep_peers(self, predicate: Callable[[ID], bool]) -> None:
        """Prefer to keep peers for which ``predicate(peer_id)`` holds (e.g. in the DHT table)."""
        self._keep.append(predicate)

    def protect(self, peer: ID) -> None:
        """Never close ``peer``'s connection as idle (a bootstrap peer)."""
        self._protected.add(peer)

    def _busy(self, conn: object) -> bool:
        return carries_app_stream(conn)

    def _kept(self, peer: ID) -> bool:
        for predicate in self._keep:
            try:
                if predicate(peer):
                    return True
            except Exception:  # a predicate of a service that is shutting down
                continue
        return False

    def _is_protected(self, peer: ID) -> bool:
        network = self.host.get_network()
        tags = getattr(network, "tag_store", None)
        return peer in self._protected or (tags is not None and tags.is_protected(peer))

    def candidates(self, now: float) -> tuple[list[object], list[object], int]:
        """What may be closed now (updates activity): idle inbound connections of peers no
        ``keep_peers`` predicate holds, longest idle first; then the other idle ones (outbound,
        kept); and how many inbound connections are still in their grace period."""
        conns = self.host.get_network().get_connections()
        live = {id(c) for c in conns}
        self._seen = {k: v for k, v in self._seen.items() if k in live}
        self._active = {k: v for k, v in self._active.items() if k in live}
        first: list[tuple[float, object]] = []
        rest: list[tuple[tuple[bool, bool, float], object]] = []
        young_inbound = 0
        for conn in conns:
            key = id(conn)
            self._seen.setdefault(key, now)
            if self._busy(conn):
                self._active[key] = now
            last = self._active.get(key, self._seen[key])
            outbound = str(getattr(conn, "direction", "")).lower().endswith("outbound")
            if now - self._seen[key] < self.limits.grace_s:
                young_inbound += not outbound
                continue
            if now - last < self.limits.idle_s:
                continue
            peer = conn.muxed_conn.peer_id  # type: ignore[attr-defined]
            if self._is_protected(peer):
                continue
            kept = self._kept(peer)
            if outbound or kept:
                rest.append(((kept, outbound, last), conn))
            else:
                first.append((last, conn))
        first.sort(key=lambda item: item[0])
        rest.sort(key=lambda item: item[0])
        return [c for _, c in first], [c for _, c in rest], young_inbound

    async def trim(self, now: float) -> int:
        """Close idle connections down to ``trim_to`` if above ``high_watermark``; return how many.

        Outbound and kept peers are closed only if the idle inbound ones, including those still in
        their grace period, cannot bring the count down alone."""
        count = len(self.host.get_network().get_connections())
        first, rest, young_inbound = self.candidates(now)
        if count <= self.limits.high_watermark:
            return 0
        excess = count - self.limits.trim_to
        chosen = first[:excess]
        more = excess - len(chosen) - young_inbound
        if more > 0:
            chosen += rest[:more]

        async def close(conn: object) -> None:
            try:
                with trio.move_on_after(5):
                    await conn.close()  # type: ignore[attr-defined]
            except Exception as exc:  # already going
                _logger.debug("closing idle connection failed: %s", exc)

        async with trio.open_nursery() as nursery:  # each close idles ~0.2 s inside py-libp2p
            for conn in chosen:
                nursery.start_soon(close, conn)
        closed = len(chosen)
        self.pruned += closed
        if closed:
            _logger.info("closed %d idle connections (%d open, watermark %d)", closed, count,
                         self.limits.high_watermark)
        return closed

    async def make_room(self) -> bool:
        """At the inbound cap: close the longest-idle inbound connection of a peer nothing keeps
        (past its grace), so a newcomer is not refused while idle throwaway connections stay.

        Returns:
            Whether one was closed.
        """
        first, _, _ = self.candidates(trio.current_time())
        if not first:
            return False
        try:
            with trio.move_on_after(5):
                await first[0].close()  # type: ignore[attr-defined]
        except Exception as exc:  # already going
            _logger.debug("closing an idle connection for a newcomer failed: %s", exc)
        self.pruned += 1
        return True

    async def run(self) -> None:
        """Check every ``check_interval_s`` until cancelled."""
        while True:
            try:
                await self.trim(trio.current_time())
            except Exception as exc:  # never let bookkeeping take the host down
                _logger.warning("connection manager cycle failed: %s", exc)
            await trio.sleep(self.limits.check_interval_s)


def connection_manager(host: IHost) -> ConnectionManager:
    """The connection manager of a host opened with ``open_host``.

    Raises:
        LookupError: the host was not opened by ``open_host``.
    """
    manager = host.__dict__.get("_isw_connection_manager")
    if manager is None:
        raise LookupError("host has no connection manager (not opened with open_host)")
    return manager


def _build_host(identity: Identity, mdns: bool = False, limits: HostLimits = HostLimits()) -> IHost:
    key_pair = create_new_key_pair(identity.seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        connection_config=limits.connection_config(),
        enable_mDNS=mdns,
    )
    set_stream_limits(host, limits.streams)
    handshake_gate(host.get_network()).slots = limits.handshake_slots  # type: ignore[arg-type]
    manager = host.__dict__["_isw_connection_manager"] = ConnectionManager(host, limits)
    handshake_gate(host.get_network()).make_room = manager.make_room
    return host


@asynccontextmanager
async def open_host(
    identity: Identity, listen: Sequence[str], mdns: bool = False, limits: HostLimits = HostLimits(),
    peer_cache: Path | None = None,
) -> AsyncIterator[IHost]:
    """Run a host listening on ``listen`` (multiaddr strings) for the duration of the block;
    with ``mdns``, it announces itself and learns peers on the local network.

    Args:
        limits: connection, stream and handshake bounds (the defaults are the daemon's).
        peer_cache: a file where the connected peers' addresses are kept; the peers it names are
            dialled at start (``_dial.PeerCache``: a node restarted on a new port is found again).

    Raises:
        ValueError: a listen address is not a TCP multiaddr on an IP, naming it.
        OSError: a listen address could not be bound (its port taken, say), naming it.
    """
    addrs = [_listen_addr(a) for a in listen]
    for addr in addrs:
        _check_bindable(addr)
    host = _build_host(identity, mdns, limits)
    missing: list[str] = []
    async with host.run(listen_addrs=addrs):
        # py-libp2p logs a failed listen at debug level and carries on with the rest
        missing = [str(a) for a in addrs if str(a) not in host.get_network().listeners]  # type: ignore[attr-defined]
        if not missing:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(connection_manager(host).run)
                    if peer_cache is not None:
                        nursery.start_soon(PeerCache(host, peer_cache).run)
                    try:
                        yield host
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                # even when cancelled (shutdown, an embedding program's cancel scope): close the sockets
                # so peers see the connections end now, not at process exit
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await host.close()
        else:
            await host.close()
    if missing:  # raised here, not inside host.run's nursery (which would wrap it in an exception group)
        raise OSError(errno.EADDRINUSE, f"cannot listen on {', '.join(missing)} (another process has the "
                                        "port? set [node] listen in config.toml, or pass --listen)")


def _listen_addr(text: str) -> multiaddr.Multiaddr:
    """A listen address: a TCP multiaddr on an IP (``/ip4/0.0.0.0/tcp/4001``, ``/ip6/::/tcp/0``).

    Raises:
        ValueError: not a multiaddr, or not IP and TCP, naming it.
    """
    try:
        addr = multiaddr.Multiaddr(text)
        protocols = [p.name for p in addr.protocols()]
    except Exception as exc:  # multiaddr raises several unrelated types
        raise ValueError(f"not a listen address (e.g. /ip4/0.0.0.0/tcp/4001): {text!r}") from exc
    if protocols[:1] not in (["ip4"], ["ip6"]) or protocols[1:] != ["tcp"]:
        raise ValueError(f"not a listen address (e.g. /ip4/0.0.0.0/tcp/4001; TCP on an IP only): {text!r}")
    return addr


def _check_bindable(addr: multiaddr.Multiaddr) -> None:
    """Bind ``addr``'s TCP port for a moment: py-libp2p logs a port in use and listens on the rest,
    so a node whose saved port is taken would start unreachable there.

    Raises:
        OSError: the port is taken (or the address is not this machine's), naming the address.
    """
    protocols = {p.name for p in addr.protocols()}
    if "tcp" not in protocols or not protocols & {"ip4", "ip6"}:
        return
    family = socket.AF_INET6 if "ip6" in protocols else socket.AF_INET
    ip = addr.value_for_protocol("ip6" if family == socket.AF_INET6 else "ip4")
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will (TIME_WAIT is fine)
        try:
            probe.bind((ip, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror or exc} (another process has "
                                     "the port? set [node] listen in config.toml, or pass --listen)") from None


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
