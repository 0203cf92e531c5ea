"""The escrow agent role on ``protocol.ESCROW_PROTOCOL``: the agent's side of the wire.

A stream carries signed requests, one frame each, and gets the agent's signed answer to each;
a malformed frame resets the stream. The agent's rules (``wallet.EscrowAgent``) run in a worker
thread (SQLite fsyncs must not stall the event loop); expired channels and budgets are swept
every second.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import IHost

import protocol
from protocol import ESCROW_PROTOCOL
from wallet import ESCROW_REQUESTS, EscrowAgent

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from ..net._streams import FramedStream, StreamClosed

__all__ = ["serve_escrow"]

_logger = logging.getLogger(__name__)


async def serve_escrow(host: IHost, agent: EscrowAgent, clock: WallClock = SYSTEM_WALL_CLOCK,
                       sweep_interval_s: float = 1.0, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer escrow requests on ``host`` until cancelled."""
    lock = trio.Lock()  # one ledger transaction at a time, in order of arrival

    async def run(request: Any) -> protocol.EscrowResponse:
        async with lock:
            return await trio.to_thread.run_sync(agent.handle, request, int(clock()))

    async def handler(stream: Any) -> None:
        framed = FramedStream(stream)
        try:
            while True:
                try:
                    request = await framed.receive(expect=ESCROW_REQUESTS)
                except StreamClosed:
                    return
                await framed.send(await run(request))
        except protocol.ProtocolError as exc:
            _logger.info("escrow stream from %s refused: %s", stream.muxed_conn.peer_id, exc)
            await framed.reset()
            return
        finally:
            await framed.close()

    host.set_stream_handler(ESCROW_PROTOCOL, handler)
    task_status.started()
    while True:
        async with lock:
            await trio.to_thread.run_sync(agent.sweep, int(clock()))
        await trio.sleep(sweep_interval_s)
