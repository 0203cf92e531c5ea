"""Fixes for traps in py-libp2p 0.8.1 (docs/DESIGN.md, "Streams"), applied once at import.

Each patch replaces the smallest piece that carries the bug and says why. They are checked
against the pinned version: on any other version ``apply()`` refuses to run, so an upgrade
is a deliberate act that re-checks every trap.

1. Inbound connection slots leak: ``Swarm._do_handle_inbound_connection`` parks the handler on
   ``manager.wait_finished()`` (the whole swarm's life), holding an inbound-limiter slot and a
   task per connection ever accepted; after ~250 the daemon refuses everyone. The handler now
   waits only until *its* connection shuts down.
2. One malformed frame crashes the whole host: a protobuf decode error from a 6-byte garbage
   frame on meshsub escapes the pubsub stream handler, then ``host.run()`` — a remote denial of
   service. Every inbound stream handler now runs behind a guard: an exception from a handler
   resets that one stream and is logged; the node keeps serving everyone else.
3. Yamux corrupts writes over ~64 KiB: ``YamuxStream.write`` splits a large write into frames
   and takes the stream's write lock per frame, so a concurrent write to the same stream (a
   control message, a gossip replay) lands between them and the peer reads a garbled length.
   Each stream now has one lock held across a whole ``write``.
4. The ``libp2p`` logger is noisy at WARNING (normal disconnects print blocks): ERROR by default.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from typing import Any

import trio
from libp2p.abc import IMuxedConn
from libp2p.host.basic_host import BasicHost
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.stream_muxer.yamux.yamux import YamuxStream

__all__ = ["apply", "PINNED_LIBP2P"]

PINNED_LIBP2P = "0.8.1"
_logger = logging.getLogger(__name__)
_applied = False


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


async def _do_handle_inbound_connection(self: Swarm, read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
    """Inbound connection: gate, upgrade, then hold the socket only while the connection lives.

    The connection's own tasks run in the swarm's manager; this handler exists only so the
    listener does not close the socket. When it returns, its limiter slot and task are freed.
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
    raw_conn = RawConnection(read_write_closer, False)
    try:
        muxed = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
    except Exception as exc:
        _logger.debug("inbound connection from %s failed to upgrade: %s", remote, exc)
        await _close_quietly(raw_conn)
        return
    await _wait_connection_end(muxed)


async def _close_quietly(conn: Any) -> None:
    try:
        await conn.close()
    except Exception:  # the peer is gone already; nothing to report
        pass


_original_stream_handler = BasicHost._swarm_stream_handler


async def _guarded_stream_handler(self: BasicHost, net_stream: Any) -> None:
    """Dispatch an inbound stream; a handler's failure costs only that stream."""
    try:
        await _original_stream_handler(self, net_stream)
    except Exception as exc:  # whatever a peer's bytes made a handler raise
        peer = getattr(getattr(net_stream, "muxed_conn", None), "peer_id", "?")
        protocol = getattr(net_stream, "get_protocol", lambda: "?")()
        _logger.info("stream from %s on %s failed, reset: %r", peer, protocol, exc)
        try:
            await net_stream.reset()
        except Exception:  # already gone
            pass


_original_yamux_write = YamuxStream.write


async def _whole_yamux_write(self: YamuxStream, data: bytes) -> None:
    """Write ``data`` as one uninterrupted run of frames on this stream."""
    lock = self.__dict__.get("_inferswarm_write_lock")
    if lock is None:
        lock = self.__dict__["_inferswarm_write_lock"] = trio.StrictFIFOLock()
    async with lock:
        await _original_yamux_write(self, data)


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
    Swarm._do_handle_inbound_connection = _do_handle_inbound_connection  # type: ignore[method-assign]
    BasicHost._swarm_stream_handler = _guarded_stream_handler  # type: ignore[method-assign]
    YamuxStream.write = _whole_yamux_write  # type: ignore[method-assign]
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    _applied = True
