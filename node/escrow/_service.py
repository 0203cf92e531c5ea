"""The escrow agent role on ``protocol.ESCROW_PROTOCOL``: the agent's side of the wire.

A stream carries signed requests, one frame each, and gets the agent's signed answer to each;
a malformed frame resets the stream. The agent's rules (``wallet.EscrowAgent``) run in a worker
thread (SQLite fsyncs must not stall the event loop), one ledger transaction at a time; expired
channels and budgets are swept every second.

Bounds (issue 11, findings 6 and 12), so that unauthenticated streams hold little and a flood
from one peer cannot starve the others:
- A request frame is at most ``MAX_REQUEST`` (64 KiB), refused at its length prefix. The
  largest legitimate request is a budget whitelisting the 1,024 consumers the wire allows
  (55,589 bytes); a cooperative close with a receipt is 1,139. 300 stalled streams hold at
  most 19 MiB, not 300 MiB. Answers (up to 1,024 channels) go out under the default limit.
- Every read has a deadline: a stream idle for ``idle_timeout_s`` (30 s) between requests, or
  whose request is not whole ``frame_timeout_s`` (10 s) after its first bytes arrive, is reset;
  so is one that does not take its answer within ``send_timeout_s`` (10 s). (Bytes a peer sent
  ahead, in the same read as its previous request, wait under the idle deadline.)
- ``EscrowAgent.screen`` answers what needs no signature check and no ledger (a stale request,
  a replay of a remembered refusal, a party or peer over its refusal rate limit) at once, in the
  event loop, without the lock or a thread. Everything else queues for the lock with at most one
  request per remote peer waiting or running, so a peer with many streams holds one place in the
  queue, not one per stream. The agent counts refusals per remote peer as well as per party.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Callable

import trio
from libp2p.abc import IHost

import protocol
from protocol import ESCROW_PROTOCOL
from wallet import ESCROW_REQUESTS, EscrowAgent

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from ..net._streams import FramedStream, StreamClosed

__all__ = ["serve_escrow"]

_logger = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
IDLE_TIMEOUT_S = 30.0
FRAME_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0


class _Stalled(Exception):
    """A peer did not send a whole request, or take its answer, in time."""


class _Arrivals:
    """The stream as ``FramedStream`` reads it, calling ``on_bytes`` (once set) when bytes arrive."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.on_bytes: Callable[[], None] | None = None

    async def read(self, n: int) -> bytes:
        data = await self.stream.read(n)
        if data and self.on_bytes is not None:
            self.on_bytes()
        return data


class _Turns:
    """At most one request per remote peer waits for or holds the ledger lock."""

    def __init__(self) -> None:
        self._turns: dict[str, tuple[trio.Lock, list[int]]] = {}  # peer -> (its lock, [users])

    @contextlib.asynccontextmanager
    async def turn(self, peer: str) -> AsyncIterator[None]:
        lock, users = self._turns.setdefault(peer, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._turns[peer]


def _remote_peer(stream: Any) -> str | None:
    peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
    return None if peer is None else peer.to_base58() if hasattr(peer, "to_base58") else str(peer)


async def _next_request(inbound: FramedStream, arrivals: _Arrivals, idle_s: float, frame_s: float) -> Any:
    """The next request: within ``idle_s``, and within ``frame_s`` of its first bytes.

    Raises:
        _Stalled: not in time. StreamClosed: the stream ended. protocol.ProtocolError: not a request.
    """
    with trio.move_on_after(idle_s) as scope:
        def first_bytes() -> None:
            scope.deadline = min(scope.deadline, trio.current_time() + frame_s)
            arrivals.on_bytes = None

        arrivals.on_bytes = first_bytes
        return await inbound.receive(expect=ESCROW_REQUESTS)
    raise _Stalled(f"no whole request within {idle_s:g}s, or {frame_s:g}s of its first bytes")


async def serve_escrow(host: IHost, agent: EscrowAgent, clock: WallClock = SYSTEM_WALL_CLOCK,
                       sweep_interval_s: float = 1.0, *, idle_timeout_s: float = IDLE_TIMEOUT_S,
                       frame_timeout_s: float = FRAME_TIMEOUT_S, send_timeout_s: float = SEND_TIMEOUT_S,
                       max_request: int = MAX_REQUEST, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer escrow requests on ``host`` until cancelled.

    Args:
        idle_timeout_s: how long a stream may wait between requests.
        frame_timeout_s: how long a request may take to arrive once its first bytes have.
        send_timeout_s: how long the peer may take to read an answer.
        max_request: the largest request frame, in bytes.
    """
    lock = trio.Lock()  # one ledger transaction at a time, in order of arrival
    turns = _Turns()

    async def run(request: Any, peer: str | None) -> protocol.EscrowResponse:
        early = agent.screen(request, int(clock()), peer)
        if early is not None:
            return early
        async with turns.turn(peer or "?"), lock:
            return await trio.to_thread.run_sync(agent.handle, request, int(clock()), peer)

    async def handler(stream: Any) -> None:
        peer = _remote_peer(stream)
        arrivals = _Arrivals(stream)
        inbound = FramedStream(arrivals, max_size=max_request)
        outbound = FramedStream(stream)  # answers may list many channels: the default frame limit
        try:
            while True:
                try:
                    request = await _next_request(inbound, arrivals, idle_timeout_s, frame_timeout_s)
                    answer = await run(request, peer)
                    with trio.move_on_after(send_timeout_s):
                        await outbound.send(answer)
                        continue
                except StreamClosed:  # the peer is gone (or reset the stream)
                    return
                raise _Stalled(f"the answer was not taken within {send_timeout_s:g}s")
        except (protocol.ProtocolError, _Stalled) as exc:
            _logger.info("escrow stream from %s refused: %s", peer, exc)
            await outbound.reset()
            return
        finally:
            await outbound.close()

    host.set_stream_handler(ESCROW_PROTOCOL, handler)
    task_status.started()
    while True:
        async with lock:
            await trio.to_thread.run_sync(agent.sweep, int(clock()))
        await trio.sleep(sweep_interval_s)
