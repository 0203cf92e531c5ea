"""Sessions the daemon holds open for a client (``node chat``, multi-call API use): each lives in
a task of the daemon's nursery from open to close; closing settles its escrow channel."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import trio

from .._errors import NotFound
from ._renter import Renter, completion_json
from ._routing import Preferences
from ._session_client import SessionError

__all__ = ["HeldSessions", "UnknownSession"]

_logger = logging.getLogger(__name__)


class UnknownSession(NotFound):
    pass


class _Held:
    def __init__(self, handle: Any, listing: Any, channel: Any) -> None:
        self.handle, self.listing, self.channel = handle, listing, channel
        self.close_requested = trio.Event()
        self.closed = trio.Event()


class HeldSessions:
    def __init__(self, renter: Renter) -> None:
        self.renter = renter
        self._sessions: dict[str, _Held] = {}
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the sessions' tasks until cancelled (closing them all)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def open(self, model: str, *, budget: int, prefs: Preferences, escrow: str | None,
                   ttl_s: int = 3600, tier: str = "", batch_calls: int = 0) -> dict[str, Any]:
        assert self._nursery is not None
        return await self._nursery.start(self._hold, model, budget, prefs, escrow, ttl_s, tier, batch_calls)

    async def _hold(self, model: str, budget: int, prefs: Preferences, escrow: str | None, ttl_s: int,
                    tier: str, batch_calls: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        held: _Held | None = None
        try:
            async with self.renter.session(model, budget=budget, prefs=prefs, escrow=escrow, ttl_s=ttl_s, tier=tier,
                                           batch_calls=batch_calls) as (handle, listing, channel):
                held = _Held(handle, listing, channel)
                sid = handle.machine.session_id.hex()
                self._sessions[sid] = held
                task_status.started({"session_id": sid, "provider": listing.provider, "model": model,
                                     "channel_id": channel.channel_id.hex(), "cap": channel.cap,
                                     "agent": channel.agent, "tier": tier,
                                     "price": {"input": handle.machine.price.input_per_1k,
                                               "output": handle.machine.price.output_per_1k}})
                await held.close_requested.wait()
        except SessionError as exc:
            if held is None:
                raise
            _logger.info("held session ended with an error: %s", exc)
        finally:
            if held is not None:
                self._sessions.pop(held.handle.machine.session_id.hex(), None)
                held.closed.set()

    def _get(self, sid: str) -> _Held:
        try:
            return self._sessions[sid]
        except KeyError:
            raise UnknownSession(f"no open session {sid}") from None

    async def call(self, sid: str, messages: list[dict[str, str]], *, max_tokens: int, temperature_milli: int,
                   on_text: Callable[[str], Awaitable[None]] | None = None) -> dict[str, Any]:
        held = self._get(sid)
        started = trio.current_time()
        provider = held.listing.provider
        try:
            result = await held.handle.call(messages, max_tokens, temperature_milli=temperature_milli, on_text=on_text)
        except SessionError as exc:
            self.renter.learn_failure(provider, exc)
            raise
        self.renter.learn_success(provider, result)
        return completion_json(result, held.listing.provider, held.handle.machine.model, started) | {"session_id": sid}

    async def close(self, sid: str) -> dict[str, Any]:
        held = self._get(sid)
        held.close_requested.set()
        await held.closed.wait()
        return {"session_id": sid, "cumulative": held.handle.machine.cumulative,
                "calls": len(held.handle.machine.receipts)}
