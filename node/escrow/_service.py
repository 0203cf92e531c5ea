"""The escrow agent role on ``protocol.ESCROW_PROTOCOL``: the agent's side of the wire.

A stream carries signed requests, one frame each, and gets the agent's signed answer to each;
a malformed frame resets the stream. The agent's rules (``wallet.EscrowAgent``) run in a worker
thread (SQLite fsyncs must not stall the event loop), one ledger transaction at a time; expired
channels and budgets are swept every second.

Storage (issue 12, finding 7): the ledger's integrity is checked (``PRAGMA quick_check``, on a
connection of its own, so writes go on) at open and every ``check_interval_s`` (10 min); a
backup (SQLite's online backup API, verified, the newest ``backup_keep`` kept, 0600) is taken
when the newest is ``backup_interval_s`` (1 h) old, so at start when due, and at clean shutdown.
A damaged ledger stops money operations (``ledger_damaged`` answers; queries still try); a full
or read-only disk is answered ``storage_full`` / ``storage_readonly`` and logged once per
episode (``wallet.Ledger``); a sweep or backup that meets either is skipped, not fatal.

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
  event loop, without the lock or a thread. Everything else has its signatures checked in a
  worker thread (``EscrowAgent.prepare``) and queues for the next group commit (``_GroupCommit``)
  with at most one request per remote peer waiting or running, so a peer with many streams holds
  one place in the queue, not one per stream. The agent counts refusals per remote peer as well
  as per party.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, AsyncIterator, Callable

import trio
from libp2p.abc import IHost

import protocol
from protocol import ESCROW_PROTOCOL
from wallet import ESCROW_REQUESTS, EscrowAgent, LedgerError, Prepared, list_ledger_backups

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from ..net._streams import FramedStream, StreamClosed

__all__ = ["serve_escrow"]

_logger = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
IDLE_TIMEOUT_S = 30.0
FRAME_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0
CHECK_INTERVAL_S = 600.0
BACKUP_INTERVAL_S = 3600
BACKUP_KEEP = 24


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


class _GroupCommit:
    """Group commit: the requests that queued while a commit ran are applied together, in order of
    arrival, in one transaction with one fsync (``EscrowAgent.apply_many``), and each is answered
    only after that commit. At most one request per remote peer queues (``_Arrivals``), so the
    queue is bounded by the connections; a batch takes at most ``max_batch``."""

    def __init__(self, agent: EscrowAgent, lock: trio.Lock, max_batch: int = 256) -> None:
        self.agent, self.lock, self.max_batch = agent, lock, max_batch
        self._send, self._receive = trio.open_memory_channel[list[Any]](math.inf)
        self.batches = self.applied = 0  # for the benches and the tests

    async def submit(self, prepared: Prepared) -> protocol.EscrowResponse:
        slot: list[Any] = [prepared, None, trio.Event()]
        self._send.send_nowait(slot)
        await slot[2].wait()
        return slot[1]

    async def run(self) -> None:
        while True:
            batch = [await self._receive.receive()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            async with self.lock:  # not abandoned if cancelled: what committed is answered
                try:
                    answers = await trio.to_thread.run_sync(self.agent.apply_many, [s[0] for s in batch])
                except Exception:  # a bug, or SQLite failing in a way it does not name: never the node's end
                    _logger.exception("a group commit of %d escrow requests failed; none was applied", len(batch))
                    answers = [self.agent.refuse_unapplied(s[0]) for s in batch]
            self.batches += 1
            self.applied += len(batch)
            for slot, answer in zip(batch, answers):
                slot[1] = answer
                slot[2].set()


async def serve_escrow(host: IHost, agent: EscrowAgent, clock: WallClock = SYSTEM_WALL_CLOCK,
                       sweep_interval_s: float = 1.0, *, idle_timeout_s: float = IDLE_TIMEOUT_S,
                       frame_timeout_s: float = FRAME_TIMEOUT_S, send_timeout_s: float = SEND_TIMEOUT_S,
                       max_request: int = MAX_REQUEST, check_interval_s: float = CHECK_INTERVAL_S,
                       backup_interval_s: int = BACKUP_INTERVAL_S, backup_keep: int = BACKUP_KEEP,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer escrow requests on ``host`` until cancelled.

    Args:
        idle_timeout_s: how long a stream may wait between requests.
        frame_timeout_s: how long a request may take to arrive once its first bytes have.
        send_timeout_s: how long the peer may take to read an answer.
        max_request: the largest request frame, in bytes.
        check_interval_s: how often the ledger's integrity is checked (``quick_check``).
        backup_interval_s: the age of the newest backup at which the next is taken (0: never).
        backup_keep: how many backups are kept.
    """
    lock = trio.Lock()  # one ledger transaction at a time, in order of arrival
    turns = _Turns()

    commits = _GroupCommit(agent, lock)

    async def run(request: Any, peer: str | None) -> protocol.EscrowResponse:
        early = agent.screen(request, int(clock()), peer)
        if early is not None:
            return early
        async with turns.turn(peer or "?"):
            # signatures are checked in a worker thread, beside the commit in progress
            prepared = await trio.to_thread.run_sync(agent.prepare, request, int(clock()), peer)
            if isinstance(prepared, protocol.EscrowResponse):
                return prepared
            return await commits.submit(prepared)

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

    def backup() -> None:
        if agent.damaged or backup_interval_s <= 0:
            return
        try:
            taken = agent.ledger.backup(int(clock()), keep=backup_keep)
            _logger.info("escrow ledger backed up to %s", taken.path)
        except (LedgerError, OSError) as exc:
            _logger.warning("escrow ledger backup failed: %s", exc)

    async def backups() -> None:
        while True:
            newest = await trio.to_thread.run_sync(list_ledger_backups, agent.ledger.path)
            due = (newest[-1].taken_at + backup_interval_s) if newest else 0
            if int(clock()) >= due:
                await trio.to_thread.run_sync(backup)
                due = int(clock()) + backup_interval_s
            await trio.sleep(max(1.0, min(due - clock(), backup_interval_s)))

    async def checks() -> None:
        while True:
            await trio.sleep(check_interval_s)
            await trio.to_thread.run_sync(agent.verify)

    async def sweeps() -> None:
        while True:
            async with lock:
                try:
                    await trio.to_thread.run_sync(agent.sweep, int(clock()))
                except LedgerError:  # logged by the ledger, once; the next sweep tries again (if not damaged)
                    pass
            await trio.sleep(sweep_interval_s)

    host.set_stream_handler(ESCROW_PROTOCOL, handler)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commits.run)
            nursery.start_soon(sweeps)
            nursery.start_soon(checks)
            if backup_interval_s > 0:
                nursery.start_soon(backups)
            task_status.started()
    finally:
        with trio.CancelScope(shield=True):  # a clean shutdown leaves a fresh backup
            await trio.to_thread.run_sync(backup)
