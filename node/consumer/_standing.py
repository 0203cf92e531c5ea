"""Standing sessions: one-shot calls (``Renter.run``, the gateway's requests) reuse an open
session with the provider, on a channel locked for many calls, instead of opening a channel,
a session and a cooperative close for every call — three escrow and provider round trips, and
an attestation, per call. In the steady state a call costs one request/receipt exchange.

- A standing session is keyed by everything its Accept pinned: provider, agent, model, tier,
  batch size, terms and the model commitment. A call takes an idle one of its key (or opens
  one), is its only user while it runs, and gives it back only when it ended cleanly; a call
  that failed or was cancelled retires its session (closed in the background, its channel
  settled), so a session in doubt is never reused.
- Its channel locks ``calls`` times the first call's expected cost (at most ``max_lock`` µc and a
  quarter of the balance at the agent, never less than one call), for ``CHANNEL_S``: the money at risk with the provider is still one call, since
  every call is counter-signed before the next starts; what is locked and unspent comes back
  at the cooperative close. Without the credits for that, the channel pays for one call.
- It is reused while its channel lives ``min_life_s`` more (longer than any call and the claim
  after it) and has the next call's expected cost left; it is closed (settling and refunding its channel) after ``idle_s`` without a
  call, and when the node stops. The provider claims while it runs (``claim_interval_s``), so
  no escrow round trip is on the request path.
- A pooled session holds its pacing slot for its life, like any session, so one is not kept
  idle while another caller waits for a slot with that provider; at most ``max_idle`` idle
  sessions are kept per key, ``max_sessions`` in all. A call's failure is raised again in the
  session's own task, so the session's report (attestations, market data) counts it.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, AsyncIterator, Callable

import trio

import protocol

from ._routing import Candidate
from ._session_client import ConsumerSessionHandle

__all__ = ["StandingSessions"]

_logger = logging.getLogger(__name__)

Opener = Callable[[Candidate, str, int], AbstractAsyncContextManager[tuple[ConsumerSessionHandle, protocol.ChannelGrant]]]


CHANNEL_S = 1800  # a standing channel's life
# reused only while its channel outlives the longest call (call_timeout_s, 600 s), the provider's
# claim margin (at most 100 s) and some slack: a call's receipt is always claimed before expiry
MIN_LIFE_S = 600 + 100 + 60


class _Standing:
    def __init__(self, key: tuple[Any, ...], handle: ConsumerSessionHandle, channel: protocol.ChannelGrant) -> None:
        self.key, self.handle, self.channel = key, handle, channel
        self.busy = True  # its opener's call runs first
        self.retired = False
        self.failed: BaseException | None = None  # the error a call on it ended with (its session's report counts it)
        self.idle_since = trio.current_time()
        self.wake = trio.Event()

    def poke(self) -> None:
        self.wake.set()


def _key(c: Candidate, model: str) -> tuple[Any, ...]:
    return (c.provider, c.agent, model, c.tier, c.batch_calls, c.terms,
            protocol.commitment_id(protocol.offer_commitment(c.offer)))


class StandingSessions:
    """Sessions kept open between one-shot calls (module docstring); ``serve`` owns their tasks."""

    def __init__(self, opener: Opener, clock: Callable[[], float], *, idle_s: float = 5.0, calls: int = 64,
                 max_lock: int = 5_000_000, min_life_s: int = MIN_LIFE_S, max_idle: int = 4, max_sessions: int = 64,
                 waiting: Callable[[str], int] = lambda provider: 0) -> None:
        self._opener = opener
        self._clock = clock
        self._waiting = waiting  # callers waiting for a pacing slot with a provider
        self.idle_s, self.calls, self.max_lock, self.min_life_s = idle_s, calls, max_lock, min_life_s
        self.max_idle, self.max_sessions = max_idle, max_sessions
        self._idle: dict[tuple[Any, ...], list[_Standing]] = {}
        self._all: set[_Standing] = set()
        self._nursery: trio.Nursery | None = None
        self.opened = self.reused = 0  # counters, for the benches and the tests

    @property
    def active(self) -> bool:
        """Served (``serve`` runs) and not switched off (``idle_s`` > 0)."""
        return self._nursery is not None and self.idle_s > 0

    def held(self) -> int:
        """Standing sessions open now (idle or in a call)."""
        return len(self._all)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the standing sessions' tasks until cancelled (closing them all, settling their channels)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def retire_all(self) -> None:
        """Close every idle standing session now (their channels settle in the background)."""
        for kept in self._idle.values():
            for s in kept:
                s.retired = True
                s.poke()
        self._idle.clear()

    def lock_for(self, expected_cost: int) -> int:
        """What a new standing channel locks for calls of ``expected_cost``."""
        return max(expected_cost, min(expected_cost * self.calls, self.max_lock))

    def _usable(self, s: _Standing, expected_cost: int) -> bool:
        machine = s.handle.machine
        return (not s.retired and machine.state is protocol.ConsumerState.READY
                and machine.remaining >= expected_cost
                and s.channel.expires_at - int(self._clock()) >= self.min_life_s)

    def _take(self, key: tuple[Any, ...], expected_cost: int) -> _Standing | None:
        kept = self._idle.get(key, [])
        while kept:
            s = kept.pop()  # the most recently used: the others may idle out
            if self._usable(s, expected_cost):
                s.busy = True
                return s
            s.retired = True
            s.poke()
        return None

    @asynccontextmanager
    async def session(self, c: Candidate, model: str
                      ) -> AsyncIterator[tuple[ConsumerSessionHandle, protocol.ChannelGrant, bool]]:
        """A session with ``c`` for one call: ``(handle, channel, reused)``. Given back for the next
        call when the block ends cleanly, retired when it raises (or is cancelled).

        Raises:
            Whatever opening a session raises (``Busy``, ``SessionError``, ``EscrowRefused``, …).
        """
        assert self._nursery is not None
        key = _key(c, model)
        s = self._take(key, c.expected_cost)
        reused = s is not None
        if s is None:
            s = await self._nursery.start(self._hold, c, model, key)
            self.opened += 1
        else:
            self.reused += 1
        ok = False
        try:
            yield s.handle, s.channel, reused
            ok = True
        except BaseException as exc:
            s.failed = exc
            raise
        finally:
            s.busy = False
            s.idle_since = trio.current_time()
            kept = self._idle.setdefault(key, [])
            # a caller waiting for a pacing slot with this provider gets this session's slot at once
            if ok and self._usable(s, 1) and len(kept) < self.max_idle and not self._waiting(c.provider):
                kept.append(s)
            else:
                s.retired = True
                if not kept:
                    self._idle.pop(key, None)
            s.poke()

    async def _hold(self, c: Candidate, model: str, key: tuple[Any, ...],
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """One standing session's life: open it, serve calls until retired or idle, close it."""
        s: _Standing | None = None
        if len(self._all) >= self.max_sessions:  # the oldest idle one makes room
            idle = [x for kept in self._idle.values() for x in kept]
            if idle:
                oldest = min(idle, key=lambda x: x.idle_since)
                self._idle[oldest.key].remove(oldest)
                oldest.retired = True
                oldest.poke()
        try:
            async with self._opener(c, model, self.lock_for(c.expected_cost)) as (handle, channel):
                s = _Standing(key, handle, channel)
                self._all.add(s)
                task_status.started(s)
                while not s.retired:
                    if s.busy:
                        await s.wake.wait()
                    else:
                        with trio.move_on_after(max(0.0, s.idle_since + self.idle_s - trio.current_time())):
                            await s.wake.wait()
                        if not s.busy and trio.current_time() >= s.idle_since + self.idle_s:
                            s.retired = True
                    s.wake = trio.Event()
                kept = self._idle.get(key, [])
                if s in kept:
                    kept.remove(s)
                if s.failed is not None and isinstance(s.failed, Exception):
                    raise s.failed  # through the session's block, so its report counts the failure
        except Exception as exc:
            if s is None:
                raise  # the caller's: opening failed
            _logger.info("a standing session with %s ended with an error: %s", c.provider, exc)
        finally:
            if s is not None:
                self._all.discard(s)
