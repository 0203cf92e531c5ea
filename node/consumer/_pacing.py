"""Pacing: how many sessions this node runs at once with each provider, and who waits for one.

A provider lists how many sessions of a model it serves at once (``ModelOffer.max_concurrent``; a
tier has its own). This node runs at most that many with it (and never more than
``max_per_provider``: the number is the provider's word), a probation probe one at a time. The rest
wait, first come first served, in a bounded queue (``queue_per_slot`` per slot, at most
``max_queue``), each at most ``wait_s``; past the bound, or the deadline, the attempt is refused
with ``Busy`` — before anything is dialled or any channel opened — so a burst is served at the pace
the provider can take, and what it cannot take is told ``capacity`` at once instead of failing
later with a timeout, a channel locked for nothing and a provider blamed for our burst.

A slot is held from before the provider is dialled until its session ends. Pure trio: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from .._errors import LocalError
from ..net._host import SESSION_STREAMS_PER_PEER
from ._routing import Candidate

__all__ = ["Busy", "Pacing", "RETRY_AFTER_S"]

RETRY_AFTER_S = 2  # what a refused caller is told to wait before trying again
#: a provider resets session streams past its per-peer cap: stay below it whatever a listing says
MAX_PER_PROVIDER = SESSION_STREAMS_PER_PEER - 4


class Busy(LocalError):
    """This node already runs as many sessions with a provider as it serves at once, and no slot
    came free in time (or the queue for one is full). Nothing was dialled, locked or paid.

    Attributes:
        retry_after_s: when trying again may find a slot.
    """

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class _Gate:
    limit: int
    running: int = 0
    queue: deque[trio.Event] = dataclasses.field(default_factory=deque)


class Pacing:
    """Per-provider bounds on this node's own concurrent sessions (the module's rules).

    Args:
        max_per_provider: the most sessions at once with one provider (model and tier), whatever it lists.
        queue_per_slot, max_queue: how many may wait for a slot: per slot, and at most.
        wait_s: the longest one waits for a slot.
    """

    def __init__(self, *, max_per_provider: int = MAX_PER_PROVIDER, queue_per_slot: int = 32, max_queue: int = 512,
                 wait_s: float = 30.0) -> None:
        self.max_per_provider, self.queue_per_slot, self.max_queue = max_per_provider, queue_per_slot, max_queue
        self.wait_s = wait_s
        self._gates: dict[tuple[str, str, str, bool], _Gate] = {}

    def limit_of(self, c: Candidate) -> int:
        """The sessions at once this node runs with ``c``'s provider for its model and tier."""
        if c.probe:
            return 1
        listed = c.offer.max_concurrent
        if c.tier:
            listed = min([listed] + [t.max_concurrent for t in c.offer.tiers if t.name == c.tier])
        return max(1, min(listed, self.max_per_provider))

    def running(self, provider: str) -> int:
        """Sessions this node runs with ``provider`` now (all models)."""
        return sum(g.running for key, g in self._gates.items() if key[0] == provider)

    def waiting(self, provider: str) -> int:
        return sum(len(g.queue) for key, g in self._gates.items() if key[0] == provider)

    @asynccontextmanager
    async def slot(self, c: Candidate) -> AsyncIterator[None]:
        """Hold one of ``c``'s slots for the block, waiting for one in the queue if need be.

        Raises:
            Busy: the queue is full (a probe: one is running), or no slot came within ``wait_s``.
        """
        key = (c.provider, c.offer.name, c.tier, c.probe)
        limit = self.limit_of(c)
        gate = self._gates.setdefault(key, _Gate(limit))
        gate.limit = limit
        while gate.queue and gate.running < limit:  # the limit grew (a new listing): let waiters in first
            gate.running += 1
            gate.queue.popleft().set()
        what = f"provider {c.provider}" + (" (on probation: one probe at a time)" if c.probe else "")
        if gate.running < limit and not gate.queue:
            gate.running += 1
        else:
            bound = 0 if c.probe else min(self.max_queue, self.queue_per_slot * limit)
            if len(gate.queue) >= bound:
                self._forget(key, gate)
                raise Busy(f"capacity: this node already runs {gate.running} sessions with {what} and "
                           f"{len(gate.queue)} more wait; try again shortly")
            ready = trio.Event()
            gate.queue.append(ready)
            got = False
            try:
                with trio.move_on_after(self.wait_s):
                    await ready.wait()
                got = ready.is_set()
            finally:
                if not ready.is_set():
                    gate.queue.remove(ready)
                    self._forget(key, gate)
                elif not got:  # handed a slot just as this waiter was cancelled: pass it on
                    self._release(key, gate)
            if not got:
                raise Busy(f"capacity: no session with {what} came free within {self.wait_s:.0f}s "
                           f"({gate.running} running)")
        try:
            yield
        finally:
            self._release(key, gate)

    def _release(self, key: tuple[str, str, str, bool], gate: _Gate) -> None:
        if gate.queue and gate.running <= gate.limit:
            gate.queue.popleft().set()  # the slot passes to the next in line
            return
        gate.running -= 1
        self._forget(key, gate)

    def _forget(self, key: tuple[str, str, str, bool], gate: _Gate) -> None:
        if gate.running <= 0 and not gate.queue and self._gates.get(key) is gate:
            del self._gates[key]
