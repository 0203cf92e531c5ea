"""The provider's job queue: bounded, weighted fair share across consumers, per-job timeout.

A call waits here for one of the model's ``slots`` (concurrent generations). When a slot frees,
the waiting job of the consumer with the least service so far — calls served divided by its
weight — goes next (ties: the earliest arrival), so a consumer with a burst of calls cannot
starve the others, and a heavier weight (a better tier) gets a proportionally larger share.
A full queue refuses at once ("capacity"); a job that waits longer than ``timeout_s`` gives up
("timeout"). Waiting jobs learn their position whenever it changes.
"""

from __future__ import annotations

import itertools
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import trio

from .._errors import LocalError

__all__ = ["JobQueue", "QueueFull", "QueueTimeout"]


class QueueFull(LocalError):
    """The model's wait queue is full: the call is refused with ``capacity``."""


class QueueTimeout(LocalError):
    """A job waited or ran past its timeout: the call fails with ``timeout``, unpaid."""


class _Job:
    def __init__(self, consumer: str, weight: float, seq: int) -> None:
        self.consumer, self.weight, self.seq = consumer, weight, seq
        self.granted = trio.Event()
        self.moved = trio.Event()


class JobQueue:
    """One model's generation slots: a bounded wait, weighted fair share across consumers, a per-job timeout."""

    def __init__(self, slots: int, max_waiting: int, timeout_s: float) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.running = 0
        self._waiting: list[_Job] = []
        self._served: dict[str, float] = {}
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _order(self) -> list[_Job]:
        return sorted(self._waiting, key=lambda j: (self._served.get(j.consumer, 0.0) / j.weight, j.seq))

    def position(self, job: _Job) -> int:
        """1-based place in line (1: next)."""
        return self._order().index(job) + 1

    def _dispatch(self) -> None:
        while self.running < self.slots and self._waiting:
            job = self._order()[0]
            self._waiting.remove(job)
            self._start(job)
        for job in self._waiting:
            job.moved.set()

    def _start(self, job: _Job) -> None:
        self.running += 1
        self._served[job.consumer] = self._served.get(job.consumer, 0.0) + 1.0
        job.granted.set()

    @asynccontextmanager
    async def slot(self, consumer: str, weight: float = 1.0,
                   on_position: Callable[[int], Awaitable[None]] | None = None) -> AsyncIterator[None]:
        """Hold a generation slot for the block.

        Raises:
            QueueFull: no slot and the queue is full. QueueTimeout: waited over ``timeout_s``.
        """
        job = _Job(consumer, weight, next(self._seq))
        if self.running < self.slots and not self._waiting:
            self._start(job)
        else:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{self.running} running and {len(self._waiting)} waiting: the queue is full")
            self._waiting.append(job)
            reported = None
            try:
                with trio.fail_after(self.timeout_s):
                    while not job.granted.is_set():
                        here = self.position(job)
                        if on_position is not None and here != reported:
                            reported = here
                            await on_position(here)
                        job.moved = trio.Event()
                        async with trio.open_nursery() as nursery:
                            async def wake(event: trio.Event) -> None:
                                await event.wait()
                                nursery.cancel_scope.cancel()

                            nursery.start_soon(wake, job.granted)
                            nursery.start_soon(wake, job.moved)
            except trio.TooSlowError as exc:
                if job in self._waiting:
                    self._waiting.remove(job)
                    self._dispatch()
                    raise QueueTimeout(f"waited {self.timeout_s:.0f}s for a slot") from exc
            except BaseException:
                if job in self._waiting:
                    self._waiting.remove(job)
                    self._dispatch()
                raise
            if not job.granted.is_set():  # pragma: no cover - fail_after either granted or raised
                raise QueueTimeout("not granted")
        try:
            yield
        finally:
            self.running -= 1
            self._dispatch()
