"""Fixes for traps in py-libp2p 0.8.1 (docs/DESIGN.md, "Streams", "Resource bounds"), applied once at import.

Each patch replaces the smallest piece that carries the bug and says why. They are checked
against the pinned version: on any other version ``apply()`` refuses to run, so an upgrade
is a deliberate act that re-checks every trap.

1. Inbound connection slots leak, and half-open sockets starve them: ``Swarm._handle_inbound_connection``
   holds an inbound-limiter slot for the whole swarm's life (``manager.wait_finished()``), so after
   ~250 connections the daemon refuses everyone; and a socket that never finishes its handshake holds
   one of the same slots for the whole upgrade timeout, so 300 half-open sockets lock honest peers
   out. Now a handshake in progress holds a slot of a small pool of its own (``HANDSHAKE_SLOTS``); when
   the pool is full the *oldest* pending handshake is dropped (an honest handshake takes ~10 ms, a
   half-open socket waits to be dropped). An upgraded inbound connection counts against the inbound
   cap (``max_connections - min_connections``) only while it lives, and the handler returns when
   *its* connection ends. At the cap, the longest-idle inbound connection nothing keeps is closed
   for the newcomer (``make_room``, the host's connection manager) before a newcomer is refused.
2. One malformed frame crashes the whole host: a protobuf decode error from a 6-byte garbage
   frame on meshsub escapes the pubsub stream handler, then ``host.run()`` — a remote denial of
   service. Every inbound stream handler now runs behind a guard: an exception from a handler
   resets that one stream and is logged; the node keeps serving everyone else.
3. Yamux corrupts writes over ~64 KiB: ``YamuxStream.write`` splits a large write into frames
   and takes the stream's write lock per frame, so a concurrent write to the same stream (a
   control message, a gossip replay) lands between them and the peer reads a garbled length.
   Each stream now has one lock held across a whole ``write``.
4. The ``libp2p`` logger is noisy at WARNING (normal disconnects print blocks): ERROR by default.
5. Yamux receive windows are not enforced: a DATA frame past a stream's receive window is only
   logged (``recv_window`` is clamped to 0) and buffered anyway — 300 MiB on one idle stream. The
   window is now a property whose setter sees the overrun: the frame's bytes are dropped and the
   connection is closed with GO_AWAY protocol error, as go-yamux does (``ErrRecvWindowExceeded``).
   Autotuning grows a window up to 16 MiB (the first read of a stream already doubles it);
   ``MAX_RECV_WINDOW`` caps it at 512 KiB, so one stream can make us buffer at most 512 KiB (such
   windows still carry ~50 MB/s at 10 ms RTT, 5 MB/s at 100 ms: tokens and prompts, not bulk).
6. Nothing limits inbound streams: 600 streams each holding a partial frame grew a provider by
   610 MB; 3,000 empty streams stayed open. Inbound streams are now counted per remote peer, per
   (peer, protocol) and in total (``StreamLimits``; ``set_stream_limits`` per host); a stream over a
   cap is reset at once. A stream whose handler returned stays counted until the remote closes its
   side, at most ``linger_s``, then is reset: a peer cannot keep zombie streams (each able to hold a
   window of buffered bytes) beyond the caps.
7. The DHT handler has no read timeout (12 concurrent handlers in all: 12 idle streams lock every
   peer out of our DHT) and accepts 4 MiB requests. Each read of an inbound DHT stream now has a
   deadline (``KAD_READ_TIMEOUT_S``), the stream a whole life (``KAD_STREAM_LIFETIME_S``: a byte
   every few seconds must not hold a handler for ever), and a request is at most ``KAD_MAX_REQUEST``.
8. The DHT stores hold anything: 50,000 values of up to 1 MiB, unlimited provider keys with any
   number of addresses, and a full provider key (20) *ignores* every newcomer, so 20 Sybil records
   lock the honest provider out. The value store is now bounded in entries and bytes (oldest
   others' records evicted first); the provider store in keys and addresses per record, and a full
   key evicts its oldest record instead of refusing the new one.
9. The per-peer connection limit is enforced only past ``grace_period`` (``Swarm._trim_connections``),
   so one identity may hold any number of connections opened within it; yet the same grace period
   is all that keeps py-libp2p's own pruner (``_schedule_prune``) from closing connections we
   need, by its own rules. Our ``ConnectionManager`` decides what to prune, so py-libp2p's pruner
   is switched off here, and ``HostLimits`` sets no grace period: an identity's extra connections
   are trimmed as they arrive.
10. A peer all of whose addresses failed once is refused for 60 s without a dial
   (``_NegativePeerCache``): an escrow agent or provider restarted on its own port stayed
   unreachable for a minute through every libp2p dial (``new_stream``, the DHT, bootstrap).
   The cache now holds a failure ``NEGATIVE_CACHE_TTL_S``; our own dialler (``_dial``) lifts it
   outright before it dials.
11. Listeners share their port: every TCP listen socket gets ``SO_REUSEPORT`` (``_set_reuse_flags``,
   for hole punching we do not use), so a second node started on a taken port listens beside the
   first and the kernel splits inbound connections between them (handshake failures, a node left
   with no peers). Listen sockets (and sourced dials) now get ``SO_REUSEADDR`` only: a port in use
   fails the bind, and ``open_host`` reports it.
12. A cancelled read loses bytes: ``YamuxStream.read`` takes the data out of the stream's buffer,
   then awaits the window update it sends; a reader cancelled there (a consumer whose caller hit
   Ctrl-C while a chunk arrived) drops what it took, and the next frame it reads is out of order
   ("chunk 0/41 out of order": a cancelled call then went unpaid instead of paying its prefix).
   The window update now runs shielded, bounded by ``WINDOW_UPDATE_TIMEOUT_S``: once bytes are
   taken, the read returns them.
13. A direct connection that appears beside a relayed one is closed at once: ``Swarm._trim_connections``
   keeps ``max_connections_per_peer`` (1) connections of a peer, trimming the one with the fewest
   streams first, so the fresh direct connection DCUtR just made (no streams yet) was closed and the
   session stayed on the relay. Direct and relayed connections are now trimmed apart: a peer keeps up
   to ``max_connections_per_peer`` direct ones and one relayed one (``_relay`` closes the relayed one
   once idle; new streams already prefer the direct one, ``Swarm._best_connection``).
14. ``BasicHost.get_addrs`` mangles circuit addresses: it strips the *first* ``/p2p/`` of each address
   and appends our id, so ``/ip4/R/tcp/4001/p2p/RELAY/p2p-circuit`` became ``/ip4/R/tcp/4001/p2p/US``:
   the relay's IP under our id, in our signed listing, our peer record and the DHT's provider records
   (a dial reaches the relay and fails the peer-id check; a NATed provider was unreachable). Now only
   a *trailing* ``/p2p/<id>`` is replaced; a circuit address keeps its relay part.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections import Counter, OrderedDict
from importlib.metadata import version
from typing import Any, Awaitable, Callable

import trio
from libp2p.abc import IMuxedConn
from libp2p.host.basic_host import BasicHost
from libp2p.kad_dht import kad_dht as _kad_module
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm, _NegativePeerCache
from libp2p.peer.peerinfo import PeerInfo
from libp2p.stream_muxer.yamux import yamux as _yamux_module
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, GO_AWAY_PROTOCOL_ERROR, YamuxStream
from libp2p.transport.tcp import tcp as _tcp_module

__all__ = [
    "apply",
    "PINNED_LIBP2P",
    "StreamLimits",
    "set_stream_limits",
    "stream_limiter",
    "handshake_gate",
    "DHT_MAX_VALUES",
    "DHT_MAX_VALUE_BYTES",
    "DHT_MAX_PROVIDER_KEYS",
    "DHT_MAX_PROVIDER_ADDRS",
    "HANDSHAKE_SLOTS",
    "KAD_MAX_REQUEST",
    "KAD_READ_TIMEOUT_S",
    "MAX_RECV_WINDOW",
    "NEGATIVE_CACHE_TTL_S",
]

PINNED_LIBP2P = "0.8.1"
_logger = logging.getLogger(__name__)
_applied = False

#: the most a Yamux receive window may autotune to (py-libp2p: 16 MiB), so the most one stream buffers
MAX_RECV_WINDOW = 512 * 1024
#: handshakes (Noise + Yamux upgrade) in progress at once; when full the oldest is dropped
HANDSHAKE_SLOTS = 64
#: seconds one read of an inbound DHT stream may wait (go-libp2p resets idle DHT streams after 60 s;
#: a request is written at once, so 10 s only ever cuts off a peer that holds a handler idle)
KAD_READ_TIMEOUT_S = 10.0
KAD_STREAM_LIFETIME_S = 30.0  # an inbound DHT stream's whole life (honest ones carry a request or a few)
#: the largest inbound DHT request (py-libp2p: 4 MiB); a PUT_VALUE of our largest listing is ~65 KiB
KAD_MAX_REQUEST = 256 * 1024
#: value records this node stores for others, and their bytes (our listings are <= 64 KiB, ~2 KiB typical)
DHT_MAX_VALUES = 2_000
DHT_MAX_VALUE_BYTES = 32 << 20
#: provider-record keys (models) stored, and addresses kept per provider record
DHT_MAX_PROVIDER_KEYS = 4_096
DHT_MAX_PROVIDER_ADDRS = 8
#: how long libp2p refuses to redial a peer all of whose addresses just failed (py-libp2p: 60 s);
#: enough to stop a tight loop of dials to a dead peer, short against a restart
NEGATIVE_CACHE_TTL_S = 5.0


# ---- 1. inbound connections: a pool of handshake slots, an inbound cap, slots end with their connection


class _HandshakeGate:
    """Handshakes in progress, oldest first; admitting one into a full pool cancels the oldest."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._pending: OrderedDict[int, trio.CancelScope] = OrderedDict()
        self.evicted = 0
        self.inbound = 0  # upgraded inbound connections alive
        # at the inbound cap: close an idle inbound connection for the newcomer (the host's
        # connection manager sets it); True when one was closed
        self.make_room: Callable[[], Awaitable[bool]] | None = None

    def admit(self, scope: trio.CancelScope) -> None:
        while len(self._pending) >= self.slots:
            _, oldest = self._pending.popitem(last=False)
            oldest.cancel()
            self.evicted += 1
        self._pending[id(scope)] = scope

    def done(self, scope: trio.CancelScope) -> None:
        self._pending.pop(id(scope), None)

    @property
    def pending(self) -> int:
        return len(self._pending)


def handshake_gate(swarm: Swarm) -> _HandshakeGate:
    """The swarm's handshake pool and inbound count (created on first use)."""
    gate = swarm.__dict__.get("_isw_handshakes")
    if gate is None:
        gate = swarm.__dict__["_isw_handshakes"] = _HandshakeGate(HANDSHAKE_SLOTS)
    return gate


async def _wait_connection_end(muxed: Any) -> None:
    """Return once ``muxed`` (a Yamux connection) has shut down, however that happened."""
    event = getattr(muxed, "event_shutting_down", None)
    if event is None:
        event = getattr(muxed, "event_closed", None)
    if event is not None:
        await event.wait()
        return
    while not muxed.is_closed:  # pragma: no cover - muxers without events (not used by us)
        await trio.sleep(0.5)


async def _handle_inbound_connection(self: Swarm, read_write_closer: Any, maddr: Any) -> None:
    """Inbound connection: gate, upgrade in a handshake slot, then hold the socket while it lives.

    The connection's own tasks run in the swarm's manager; this handler exists only so the
    listener does not close the socket. When it returns, its task is freed.
    """
    remote = self._build_remote_multiaddr(read_write_closer)
    if remote is not None and not await self.connection_gate.is_allowed(remote):
        await _close_quietly(read_write_closer)
        return
    if isinstance(read_write_closer, IMuxedConn):  # pre-multiplexed transports (QUIC); not used by us
        try:
            await self.add_conn(read_write_closer, direction="inbound")
        except Exception:
            await _close_quietly(read_write_closer)
            return
        await _wait_connection_end(read_write_closer)
        return
    gate = handshake_gate(self)
    raw_conn = RawConnection(read_write_closer, False)
    muxed = None
    with trio.CancelScope() as scope:
        gate.admit(scope)
        try:
            muxed = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        except Exception as exc:
            _logger.debug("inbound connection from %s failed to upgrade: %s", remote, exc)
        finally:
            gate.done(scope)
    if muxed is None:  # failed, timed out, or dropped as the oldest pending handshake
        with trio.CancelScope(shield=True):
            await _close_quietly(raw_conn)
        return
    cap = max(1, self.connection_config.max_connections - self.connection_config.min_connections)
    if gate.inbound >= cap and (gate.make_room is None or not await gate.make_room()):
        _logger.debug("inbound cap %d reached; closing the connection from %s", cap, remote)
        await _close_quietly(muxed)  # outbound dials keep min_connections of room
        return
    gate.inbound += 1
    try:
        await _wait_connection_end(muxed)
    finally:
        gate.inbound -= 1


async def _close_quietly(conn: Any) -> None:
    try:
        await conn.close()
    except Exception:  # the peer is gone already; nothing to report
        pass


async def _reset_quietly(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # already gone
        pass


# ---- 2 and 6. inbound streams: guarded, counted, capped, not left open after their handler


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """Caps on concurrent inbound streams. ``per_protocol`` maps a protocol id, or a prefix ending
    in "/", to the most streams one peer may hold on it (protocols not named: ``per_peer``)."""

    total: int = 1024
    per_peer: int = 64
    per_protocol: tuple[tuple[str, int], ...] = ()
    linger_s: float = 2.0


class _StreamLimiter:
    """Counts of live inbound streams and of refusals (by reason) on one host."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_peer: Counter[Any] = Counter()
        self.by_protocol: Counter[tuple[Any, str]] = Counter()
        self.refused: Counter[str] = Counter()

    def admit(self, peer: Any) -> bool:
        if self.total >= self.limits.total:
            self.refused["total"] += 1
            return False
        if self.by_peer[peer] >= self.limits.per_peer:
            self.refused["per_peer"] += 1
            return False
        self.total += 1
        self.by_peer[peer] += 1
        return True

    def release(self, peer: Any) -> None:
        self.total -= 1
        self.by_peer[peer] -= 1
        if self.by_peer[peer] <= 0:
            del self.by_peer[peer]

    def _cap(self, protocol: str) -> tuple[str, int]:
        for key, cap in self.limits.per_protocol:
            if protocol == key or (key.endswith("/") and protocol.startswith(key)):
                return key, cap
        return protocol, self.limits.per_peer

    def admit_protocol(self, peer: Any, protocol: str) -> str | None:
        key, cap = self._cap(protocol)
        if self.by_protocol[(peer, key)] >= cap:
            self.refused[key] += 1
            return None
        self.by_protocol[(peer, key)] += 1
        return key

    def release_protocol(self, peer: Any, key: str) -> None:
        self.by_protocol[(peer, key)] -= 1
        if self.by_protocol[(peer, key)] <= 0:
            del self.by_protocol[(peer, key)]


def stream_limiter(host: BasicHost) -> _StreamLimiter:
    """The host's inbound stream counts (default ``StreamLimits`` until ``set_stream_limits``)."""
    limiter = host.__dict__.get("_isw_stream_limiter")
    if limiter is None:
        limiter = host.__dict__["_isw_stream_limiter"] = _StreamLimiter(StreamLimits())
    return limiter


def set_stream_limits(host: BasicHost, limits: StreamLimits) -> None:
    """Set the host's inbound stream caps; call before it accepts streams."""
    host.__dict__["_isw_stream_limiter"] = _StreamLimiter(limits)


def _peer_of(net_stream: Any) -> Any:
    return getattr(getattr(net_stream, "muxed_conn", None), "peer_id", None)


async def _linger(net_stream: Any, seconds: float) -> None:
    """After its handler returned: wait (discarding data) for the remote to close, then reset."""
    muxed = getattr(net_stream, "muxed_stream", None)
    if muxed is None or getattr(muxed, "closed", True):
        return
    with trio.move_on_after(seconds):
        try:
            while await muxed.read(MAX_RECV_WINDOW):
                pass
        except Exception:  # EOF or reset: the remote is done
            pass
    if not getattr(muxed, "closed", True):
        await _reset_quietly(net_stream)


_original_stream_handler = BasicHost._swarm_stream_handler


async def _guarded_stream_handler(self: BasicHost, net_stream: Any) -> None:
    """Dispatch an inbound stream within the caps; a handler's failure costs only that stream."""
    limiter = stream_limiter(self)
    peer = _peer_of(net_stream)
    if not limiter.admit(peer):
        await _reset_quietly(net_stream)
        return
    try:
        try:
            await _original_stream_handler(self, net_stream)
        except Exception as exc:  # whatever a peer's bytes made a handler raise
            protocol = getattr(net_stream, "get_protocol", lambda: "?")()
            _logger.info("stream from %s on %s failed, reset: %r", peer, protocol, exc)
            await _reset_quietly(net_stream)
        await _linger(net_stream, limiter.limits.linger_s)
    finally:
        limiter.release(peer)


_original_set_stream_handler = BasicHost.set_stream_handler


def _limited_set_stream_handler(self: BasicHost, protocol_id: Any, stream_handler: Any) -> None:
    """Register ``stream_handler`` behind the per-(peer, protocol) cap."""

    async def limited(net_stream: Any) -> None:
        limiter = stream_limiter(self)
        peer = _peer_of(net_stream)
        key = limiter.admit_protocol(peer, str(protocol_id))
        if key is None:
            await _reset_quietly(net_stream)
            return
        try:
            await stream_handler(net_stream)
        finally:
            limiter.release_protocol(peer, key)

    limited.__wrapped__ = stream_handler  # type: ignore[attr-defined]
    _original_set_stream_handler(self, protocol_id, limited)


# ---- 3. Yamux: one lock across a whole write

_original_yamux_write = YamuxStream.write


async def _whole_yamux_write(self: YamuxStream, data: bytes) -> None:
    """Write ``data`` as one uninterrupted run of frames on this stream."""
    lock = self.__dict__.get("_inferswarm_write_lock")
    if lock is None:
        lock = self.__dict__["_inferswarm_write_lock"] = trio.StrictFIFOLock()
    async with lock:
        await _original_yamux_write(self, data)


# ---- 5. Yamux: the receive window is enforced


def _get_recv_window(self: YamuxStream) -> int:
    return self.__dict__.get("_isw_recv_window", DEFAULT_WINDOW_SIZE)


def _set_recv_window(self: YamuxStream, value: int) -> None:
    if value < 0:  # only a DATA frame past the window drives it below zero
        _window_exceeded(self, -value)
        value = 0
    self.__dict__["_isw_recv_window"] = value


def _window_exceeded(stream: YamuxStream, excess: int) -> None:
    """Drop what the peer buffered on ``stream`` and close its connection (a protocol error)."""
    conn = stream.conn
    buffer = conn.stream_buffers.get(stream.stream_id)
    if buffer is not None:
        buffer.clear()
    stream.recv_closed = stream.closed = stream.reset_received = True
    if conn.__dict__.get("_isw_window_violation"):
        return
    conn.__dict__["_isw_window_violation"] = True
    _logger.info("peer %s wrote %d bytes past stream %d's receive window: closing the connection",
                 conn.peer_id, excess, stream.stream_id)

    async def close() -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await conn.close(GO_AWAY_PROTOCOL_ERROR)

    if conn._nursery is not None:
        conn._nursery.start_soon(close)
    else:  # pragma: no cover - frames are only read once the muxer runs in its nursery
        conn.event_shutting_down.set()


# ---- 7. DHT: inbound reads with a deadline


class _ReadDeadlineStream:
    """A stream whose every ``read`` must finish within ``timeout`` seconds (else TooSlowError)."""

    def __init__(self, stream: Any, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout

    async def read(self, n: int | None = None) -> bytes:
        with trio.fail_after(self._timeout):
            return await self._stream.read(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_original_kad_handle = KadDHT._do_handle_stream


async def _kad_handle_with_deadline(self: KadDHT, stream: Any) -> None:
    """The DHT handler, reading through a deadline (a timed-out read resets the stream), on a
    stream that lives at most ``KAD_STREAM_LIFETIME_S`` (a byte every few seconds keeps no read
    waiting long, but must not keep a handler for ever)."""
    with trio.move_on_after(KAD_STREAM_LIFETIME_S) as scope:
        await _original_kad_handle(self, _ReadDeadlineStream(stream, KAD_READ_TIMEOUT_S))
    if scope.cancelled_caught:
        try:
            await stream.reset()
        except Exception:  # already gone
            pass


# ---- 8. DHT stores: bounded


def _value_store_evict(self: ValueStore) -> None:
    """Before a put: if at a cap (entries or bytes), evict the oldest records of others down to 90%
    of both caps at once (one sort per ~200 puts under a flood, not one scan per put)."""
    size = sum(len(record.value) for record, _ in self.store.values())
    if len(self.store) < DHT_MAX_VALUES and size < DHT_MAX_VALUE_BYTES:
        return
    others = sorted((k for k in self.store if k not in self.local_keys),
                    key=lambda k: self.store[k][0].timeReceived or "")
    for key in others:
        if len(self.store) < 0.9 * DHT_MAX_VALUES and size < 0.9 * DHT_MAX_VALUE_BYTES:
            break
        size -= len(self.store.pop(key)[0].value)


def _bounded_add_provider(self: ProviderStore, key: bytes, provider: PeerInfo) -> None:
    """Add a provider record: a full key drops its oldest record, a full store its oldest key."""
    if not provider or not provider.peer_id:
        return
    records = self.providers.get(key)
    if records is None:
        while len(self.providers) >= DHT_MAX_PROVIDER_KEYS:
            victim = next((k for k in self.providers if k not in self.providing_keys), None)
            if victim is None:
                return
            del self.providers[victim]
        records = self.providers[key] = {}
    peer = str(provider.peer_id)
    if peer not in records and len(records) >= BUCKET_SIZE:
        del records[min(records, key=lambda p: records[p].timestamp)]
    records.pop(peer, None)  # re-inserted last: dict order is age order
    addrs = list(provider.addrs)[:DHT_MAX_PROVIDER_ADDRS]
    records[peer] = ProviderRecord(provider_info=PeerInfo(provider.peer_id, addrs))
    self._save()


_original_negative_cache_init = _NegativePeerCache.__init__


def _short_negative_cache_init(self: _NegativePeerCache, ttl: float = NEGATIVE_CACHE_TTL_S,
                               max_size: int = 10000) -> None:
    """py-libp2p's negative cache, holding a failure at most ``NEGATIVE_CACHE_TTL_S``."""
    _original_negative_cache_init(self, min(ttl, NEGATIVE_CACHE_TTL_S), max_size)


def _no_global_prune(self: Swarm) -> None:
    """py-libp2p's pruner stays off: ``ConnectionManager`` (``_host``) closes idle connections."""


# ---- 12. Yamux: a cancelled read never drops the bytes it took

WINDOW_UPDATE_TIMEOUT_S = 5.0  # a window update is one small frame; past this it is skipped, the data kept
_original_window_update = YamuxStream._auto_tune_and_send_window_update


async def _window_update_uncancelled(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """The window update a read sends after taking its bytes, shielded from the reader's cancel."""
    with trio.CancelScope(shield=True), trio.move_on_after(WINDOW_UPDATE_TIMEOUT_S):
        await _original_window_update(self, bytes_read=bytes_read)


# ---- 13. per-peer trim: direct and relayed connections apart

_original_trim = Swarm._trim_connections


def _trim_by_kind(self: Swarm, peer_id: Any) -> None:
    """Trim ``peer_id``'s direct connections to ``max_connections_per_peer`` and its relayed ones to
    one, each by py-libp2p's own rules (grace, protection, fewest streams then oldest)."""
    from libp2p.connection_types import ConnectionType

    conns = list(self.connections.get(peer_id, []))

    def relayed(conn: Any) -> bool:
        try:
            return conn.get_connection_type() == ConnectionType.RELAYED
        except Exception:
            return False

    groups = ([c for c in conns if not relayed(c)], [c for c in conns if relayed(c)])
    kept: list[Any] = []
    saved = self.connection_config.max_connections_per_peer
    for group, cap in zip(groups, (saved, 1)):
        if not group:
            continue
        self.connections[peer_id] = group
        self.connection_config.max_connections_per_peer = cap
        try:
            _original_trim(self, peer_id)
        finally:
            self.connection_config.max_connections_per_peer = saved
        kept.extend(self.connections[peer_id])
    self.connections[peer_id] = [c for c in conns if any(c is k for k in kept)]


# ---- 14. get_addrs keeps circuit addresses whole

_PY_LIBP2P_GET_ADDRS = BasicHost.get_addrs  # the original, for the test that shows the trap


def _get_addrs_keeping_circuits(self: BasicHost) -> list[Any]:
    """py-libp2p's ``get_addrs`` (candidates, then the address factory), ending each address with
    ``/p2p/<our id>`` by replacing only a trailing ``/p2p/`` component."""
    import multiaddr

    candidates = list(self.get_transport_addrs())
    if self._observed_addr_manager is not None:
        seen = {str(a) for a in candidates}
        for observed in self._observed_addr_manager.addrs():
            if str(observed) not in seen:
                seen.add(str(observed))
                candidates.append(observed)
    addrs = list(self._addrs_factory(candidates)) if self._addrs_factory is not None else candidates
    suffix = f"/p2p/{self.get_id()!s}"
    out = []
    for addr in addrs:
        text = str(addr)
        last = text.rfind("/p2p/")
        if last != -1 and "/" not in text[last + len("/p2p/"):]:  # a trailing /p2p/<id>
            text = text[:last]
        out.append(multiaddr.Multiaddr(text + suffix))
    return out


# ---- 11. TCP listeners: no SO_REUSEPORT


def _reuse_address_only(sock: Any) -> None:
    """``SO_REUSEADDR`` (a restart may bind over its own TIME_WAIT connections), never
    ``SO_REUSEPORT``: a port another process listens on must fail the bind."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError:
        pass


def apply() -> None:
    """Apply every fix (idempotent).

    Raises:
        RuntimeError: the installed libp2p is not the version these fixes were checked against.
    """
    global _applied
    if _applied:
        return
    installed = version("libp2p")
    if installed != PINNED_LIBP2P:
        raise RuntimeError(f"libp2p {installed} installed; node/ is checked against {PINNED_LIBP2P} only")
    Swarm._handle_inbound_connection = _handle_inbound_connection  # type: ignore[method-assign]
    BasicHost._swarm_stream_handler = _guarded_stream_handler  # type: ignore[method-assign]
    BasicHost.set_stream_handler = _limited_set_stream_handler  # type: ignore[method-assign]
    YamuxStream.write = _whole_yamux_write  # type: ignore[method-assign]
    YamuxStream.recv_window = property(_get_recv_window, _set_recv_window)  # type: ignore[assignment]
    _yamux_module.MAX_WINDOW_SIZE = MAX_RECV_WINDOW
    KadDHT._do_handle_stream = _kad_handle_with_deadline  # type: ignore[method-assign]
    _kad_module.MAX_DHT_MESSAGE_SIZE = KAD_MAX_REQUEST
    ValueStore._evict_if_full = _value_store_evict  # type: ignore[method-assign]
    ProviderStore.add_provider = _bounded_add_provider  # type: ignore[method-assign]
    Swarm._schedule_prune = _no_global_prune  # type: ignore[method-assign]
    _NegativePeerCache.__init__ = _short_negative_cache_init  # type: ignore[method-assign]
    _tcp_module._set_reuse_flags = _reuse_address_only  # type: ignore[attr-defined]
    YamuxStream._auto_tune_and_send_window_update = _window_update_uncancelled  # type: ignore[method-assign]
    Swarm._trim_connections = _trim_by_kind  # type: ignore[method-assign]
    BasicHost.get_addrs = _get_addrs_keeping_circuits  # type: ignore[method-assign]
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    # libp2p's logging setup (utils/logging.py, LIBP2P_DEBUG unset) clears the "libp2p" logger's
    # handlers and stops its propagation to silence it; with no handler anywhere Python prints its
    # records through logging.lastResort, past the application's handlers and their filters (bare
    # error lines in node demo and node start). Let them reach the root's handlers: the application
    # decides (the CLI drops them unless -v).
    logging.getLogger("libp2p").propagate = True
    # a failed TCP dial is logged at error level there; ours (the dialler) names each cause where it
    # matters, and a restart's rejoin of remembered peers at old ports would print a line per address
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)
    _applied = True
