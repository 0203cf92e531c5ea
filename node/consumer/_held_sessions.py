"""Sessions the daemon holds open for a client (``node chat``, multi-call API use): each lives in
a task of the daemon's nursery from open to close; closing settles its escrow channel."""

from __future__ import annotations

import logging
import secrets
from typing import Any, Awaitable, Callable

import trio

from .._calls import CallOptions
from .._errors import NotFound
from ._renter import Renter
from ._results import Completion, Delta, SessionInfo, SessionSummary
from ._routing import Preferences
from ._session_client import SessionError

__all__ = ["HeldSessions", "UnknownSession"]

_logger = logging.getLogger(__name__)


class UnknownSession(NotFound):
    """No session of that id is held open (never opened here, or closed since)."""


class _Held:
    def __init__(self, handle: Any, info: SessionInfo) -> None:
        self.handle, self.info = handle, info
        self.close_requested = trio.Event()
        self.closed = trio.Event()


class HeldSessions:
    """Sessions this node holds open for its clients, each in a task of ``serve``'s nursery."""

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
                   ttl_s: int = 3600, tier: str = "", batch_calls: int = 0, channel: str | None = None) -> SessionInfo:
        """Open a session held until ``close`` (``Renter.session``: with ``channel``, on that open
        channel of this node's, which stays open after it).

        Raises:
            RentError, EscrowRefused, EscrowUnreachable, InvalidRequest, protocol.SpendLimitReached:
            as ``Renter.session`` raises them, when nothing was opened.
        """
        assert self._nursery is not None
        return await self._nursery.start(self._hold, model, budget, prefs, escrow, ttl_s, tier, batch_calls, channel)

    async def _hold(self, model: str, budget: int, prefs: Preferences, escrow: str | None, ttl_s: int,
                    tier: str, batch_calls: int, channel_id: str | None,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        held: _Held | None = None
        try:
            async with self.renter.session(model, budget=budget, prefs=prefs, escrow=escrow, ttl_s=ttl_s, tier=tier,
                                           batch_calls=batch_calls, channel=channel_id) as (handle, listing, channel):
                sid = handle.machine.session_id.hex()
                held = _Held(handle, SessionInfo(sid, listing.provider, model, channel, tier, handle.machine.price))
                self._sessions[sid] = held
                task_status.started(held.info)
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

    async def call(self, sid: str, messages: list[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                   on_text: Callable[[str], Awaitable[None]] | None = None, options: CallOptions = CallOptions(),
                   on_delta: Callable[[Delta], Awaitable[None]] | None = None) -> Completion:
        """One call of held session ``sid`` (its outcome is recorded by the session handle);
        ``options`` as ``Renter.run`` takes them (the session's provider must list what they need).

        Raises:
            UnknownSession: no such session. SessionError: the call failed (nothing paid for it).
        """
        held = self._get(sid)
        started = trio.current_time()
        result = await held.handle.call(messages, max_tokens, temperature_milli=temperature_milli, on_text=on_text,
                                        options=options, on_delta=on_delta)
        return Completion(id=secrets.token_hex(12), provider=held.info.provider, model=held.info.model,
                          text=result.text, finish_reason=result.finish_reason, receipt=result.receipt,
                          latency_ms=int((trio.current_time() - started) * 1000), session_id=sid,
                          tool_calls=result.tool_calls, logprobs=result.logprobs)

    async def close(self, sid: str) -> SessionSummary:
        """Close held session ``sid``, settling its channel.

        Raises:
            UnknownSession: no such session.
        """
        held = self._get(sid)
        held.close_requested.set()
        await held.closed.wait()
        return SessionSummary(sid, held.handle.machine.cumulative, len(held.handle.machine.receipts))
