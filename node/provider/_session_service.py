"""The provider side of ``/inferswarm/session/1.0.0``: moves the frames of
``protocol.ProviderSession`` over a stream, runs the model, keeps receipts, gets paid.

Per session: Open -> checks (model, price, accepted escrow agent, capacity, rate limit, the
channel as the agent reports it) -> Accept or Reject with its reason. Per call: rate limit and
max_tokens checks, prompt tokens counted by the backend, admission by the machine (context,
budget clamp, expiry), streamed chunks, provider-signed receipt, counter-signature, receipt
stored. Refused or failed calls cost nothing. Counter-signed receipts are claimed from the
escrow every ``claim_interval_s`` during long sessions and at the end — through the consumer's
half of a cooperative close when it sends one (settling the channel at once), else by a claim.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import secrets
import time
from typing import Any, Callable

import trio

import protocol
from protocol import (
    CallRequested,
    Countersigned,
    Open,
    ProviderSession,
    Reject,
    SessionClosed,
)
from wallet import Identity

from .._contracts import Contract, active_contract, reserved_slots
from .._receipts import ReceiptStore
from ..escrow._client import EscrowClient, EscrowUnreachable
from ..net._streams import FramedStream, StreamClosed
from ._offers import Offer
from ._queue import JobQueue, QueueFull, QueueTimeout
from ._sla import SlaConfig, SlaTracker
from .backends._base import Backend, BackendError

__all__ = ["ProviderService", "RateLimiter"]

_logger = logging.getLogger(__name__)


class RateLimiter:
    """Requests per minute per consumer, over a sliding 60 s window."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seen: dict[str, collections.deque[float]] = {}

    def allow(self, consumer: str, limit: int) -> float:
        """0 if a request may go now (and count it), else the seconds to wait."""
        if limit <= 0:
            return 0.0
        now = self._clock()
        q = self._seen.setdefault(consumer, collections.deque())
        while q and q[0] <= now - 60:
            q.popleft()
        if len(q) >= limit:
            return max(0.001, q[0] + 60 - now)
        q.append(now)
        return 0.0


class ProviderService:
    def __init__(
        self,
        identity: Identity,
        offers: Callable[[], dict[str, Offer]],
        accepted_agents: Callable[[], set[str]],
        backend_for: Callable[[Offer], Any],
        escrow: EscrowClient,
        receipts: ReceiptStore,
        clock: Callable[[], float] = time.time,
        claim_interval_s: float = 30.0,
        is_available: Callable[[], bool] = lambda: True,
        on_outcome: Callable[[str, bool], None] = lambda model, ok: None,
        listed_of: Callable[[Offer], protocol.ModelOffer] | None = None,
        max_waiting: int = 32,
        job_timeout_s: float = 120.0,
        contracts: Callable[[], tuple[Contract, ...]] = lambda: (),
        sla: SlaTracker | None = None,
    ) -> None:
        self.identity = identity
        self._offers = offers
        self._accepted = accepted_agents
        self._backend_for = backend_for
        self.escrow = escrow
        self.receipts = receipts
        self.clock = clock
        self.claim_interval_s = claim_interval_s
        self.is_available = is_available
        self.on_outcome = on_outcome
        self.listed_of = listed_of or (lambda offer: offer.to_model_offer())  # the offer as listed right now
        self.active_tiers: collections.Counter[tuple[str, str]] = collections.Counter()
        self.active_by_client: collections.Counter[tuple[str, str]] = collections.Counter()
        self.max_waiting = max_waiting
        self.contracts = contracts
        self.sla = sla or SlaTracker(SlaConfig())
        self.job_timeout_s = job_timeout_s
        self.queues: dict[str, JobQueue] = {}
        self.rate = RateLimiter(clock)
        self.active: collections.Counter[str] = collections.Counter()

    def now(self) -> int:
        return int(self.clock())

    async def _send(self, framed: FramedStream, msgs: list[Any]) -> None:
        """Every message to the consumer leaves through here."""
        await framed.send_all(msgs)

    async def handle(self, stream: Any) -> None:
        """One session on one stream, start to end."""
        framed = FramedStream(stream)
        try:
            await self._session(framed)
        except (StreamClosed, protocol.ProtocolError) as exc:
            _logger.info("session from %s ended: %s", stream.muxed_conn.peer_id, exc)
        finally:
            await framed.close()

    async def _reject(self, framed: FramedStream, machine: ProviderSession, reason: str, detail: str,
                      retry_after_s: int = 0) -> None:
        machine.reject_open(reason, detail[:512], retry_after_s)
        await self._send(framed, machine.outgoing())

    async def _session(self, framed: FramedStream) -> None:
        machine = ProviderSession(self.identity)
        first = await framed.receive(expect=(Open,))
        try:
            machine.receive(first, self.now())
        except protocol.RemoteProtocolError as exc:
            reason = "escrow_invalid" if isinstance(exc, (protocol.Expired, protocol.BadSignature)) else "bad_request"
            await self._send(framed, [Reject(session_id=first.session_id, reason=reason, detail=str(exc)[:512])])
            return
        offer = self._offers().get(first.model)
        listed = self.listed_of(offer) if offer is not None else None  # priced now, before this session counts
        now_dt = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
        contract = active_contract(self.contracts(), first.consumer, first.model, now_dt)
        try:
            price = protocol.session_price(listed, first.tier, first.batch_calls) if listed is not None else None
        except protocol.InvalidMessage as exc:
            await self._reject(framed, machine, "bad_request", str(exc))
            return
        if contract is not None and listed is not None:
            price = dataclasses.replace(contract.price, min_charge=listed.price.min_charge)
        refusal = await self._check_open(first, offer, price, listed)
        if refusal is not None:
            await self._reject(framed, machine, *refusal)
            return
        assert offer is not None
        try:
            backend = await self._backend_for(offer)
        except BackendError as exc:
            await self._reject(framed, machine, "unavailable", str(exc))
            return
        self.active[offer.model] += 1
        self.active_tiers[(offer.model, first.tier)] += 1
        self.active_by_client[(first.consumer, offer.model)] += 1
        state = {"last": None, "claimed": 0, "claimed_at": time.monotonic(), "weight": next(
            (t.priority for t in listed.tiers if t.name == first.tier), 1) if listed else 1}
        close = None
        try:
            machine.accept_open(price, offer.max_context, self.now())
            await self._send(framed, machine.outgoing())
            async with trio.open_nursery() as nursery:
                close = await self._serve(framed, machine, offer, backend, state, nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.active[offer.model] -= 1
            self.active_tiers[(offer.model, first.tier)] -= 1
            self.active_by_client[(first.consumer, offer.model)] -= 1
            with trio.CancelScope(shield=True):
                await self._settle(machine, state, close)

    async def _check_open(self, msg: Open, offer: Offer | None, price: protocol.Price | None,
                          listed: protocol.ModelOffer | None) -> tuple[str, str] | tuple[str, str, int] | None:
        if offer is None:
            return "unknown_model", f"this provider does not serve {msg.model!r}"
        if not self.is_available():
            return "unavailable", "outside this provider's availability schedule"
        assert price is not None
        if msg.price != price:
            return ("price_changed", f"now {price.input_per_1k}/{price.output_per_1k} µc per 1K tokens (in/out), "
                                     f"min charge {price.min_charge}")
        if msg.channel.agent not in self._accepted():
            return "escrow_not_accepted", f"escrow agent {msg.channel.agent} is not one this provider accepts"
        assert listed is not None
        now_dt = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
        reserved = reserved_slots(self.contracts(), offer.model, now_dt, except_peer=msg.consumer)
        held_by_others = sum(1 for peer, n in self.active_by_client.items() if n and peer[1] == offer.model
                             and peer[0] != msg.consumer and active_contract(self.contracts(), peer[0], offer.model,
                                                                             now_dt) is not None)
        usable = listed.max_concurrent - max(0, reserved - held_by_others)
        if self.active[offer.model] >= usable:
            return "capacity", (f"{listed.max_concurrent} sessions of {offer.model}, "
                                f"{reserved} reserved by contract, all taken")
        tier = next((t for t in listed.tiers if t.name == msg.tier), None)
        if tier is not None and self.active_tiers[(offer.model, msg.tier)] >= tier.max_concurrent:
            return "capacity", f"{tier.max_concurrent} {msg.tier} sessions of {offer.model} already running"
        wait = self.rate.allow(msg.consumer, offer.rate_limit)
        if wait:
            return "rate_limited", f"over {offer.rate_limit} requests/min", int(wait) + 1
        try:
            state = await self.escrow.call(msg.channel.agent, self._signed(protocol.EscrowQuery,
                                                                             channel_id=msg.channel.channel_id))
        except (EscrowUnreachable, ValueError) as exc:
            return "escrow_invalid", f"could not confirm the channel with its agent: {exc}"
        if not state.ok:
            return "escrow_invalid", f"the agent says {state.error}: {state.detail}"
        ch = state.channels[0]
        spend_cap = min(msg.spend_limit, msg.channel.cap)
        if ch.status != "open" or ch.channel.expires_at <= self.now() or ch.channel.channel_id != msg.channel.channel_id:
            return "escrow_invalid", f"the channel is {ch.status} or expired"
        if ch.channel.cap - ch.claimed < spend_cap:
            return "escrow_invalid", f"the channel holds {ch.channel.cap - ch.claimed} µc, less than the spend cap {spend_cap}"
        return None

    def _signed(self, cls: type, **fields: Any) -> Any:
        msg = cls(request_id=secrets.token_bytes(16), party=self.identity.peer_id, issued_at=self.now(), **fields)
        return protocol.sign(msg, "sig", self.identity)

    async def _serve(self, framed: FramedStream, machine: ProviderSession, offer: Offer, backend: Backend,
                     state: dict[str, Any], nursery: trio.Nursery) -> Any:
        while True:
            try:
                msg = await framed.receive()
            except StreamClosed:
                return None
            for event in machine.receive(msg, self.now()):
                if isinstance(event, CallRequested):
                    started = time.monotonic()
                    await self._call(framed, machine, offer, backend, event.request, state["weight"])
                    state["latency_ms"] = int((time.monotonic() - started) * 1000)
                elif isinstance(event, Countersigned):
                    state["last"] = event.receipt
                    await self.receipts.put(event.receipt, "provider", state.pop("latency_ms", None))
                    if time.monotonic() - state["claimed_at"] >= self.claim_interval_s:
                        state["claimed_at"] = time.monotonic()
                        nursery.start_soon(self._claim, event.receipt, state)
                elif isinstance(event, SessionClosed):
                    return event.close
            await self._send(framed, machine.outgoing())

    async def _call(self, framed: FramedStream, machine: ProviderSession, offer: Offer, backend: Backend,
                    request: protocol.Request, weight: float = 1.0) -> None:
        consumer = machine.open_msg.consumer  # type: ignore[union-attr]
        if self.rate.allow(consumer, offer.rate_limit):
            machine.fail_call("rate_limited", f"over {offer.rate_limit} requests/min")
        elif request.max_tokens > offer.max_context:
            machine.fail_call("max_tokens_too_large", f"max_tokens {request.max_tokens} is over {offer.max_context}")
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                tokens_in = await backend.count_prompt_tokens(messages)
            except Exception as exc:  # a tokenizer failing on odd input
                machine.fail_call("bad_request", f"cannot tokenize the prompt: {exc}"[:512])
                tokens_in = None
            limit = machine.start_call(tokens_in, self.now()) if tokens_in is not None else None
            if limit is not None:
                await self._generate(framed, machine, backend, request, messages, limit, tokens_in, weight)
        await self._send(framed, machine.outgoing())

    def queue_for(self, offer: Offer, backend: Backend) -> JobQueue:
        q = self.queues.get(offer.model)
        if q is None:
            slots = backend.parallel or offer.max_concurrent
            q = self.queues[offer.model] = JobQueue(slots, self.max_waiting, self.job_timeout_s)
        return q

    async def _generate(self, framed: FramedStream, machine: ProviderSession, backend: Backend,
                        request: protocol.Request, messages: list[dict[str, str]], limit: int, tokens_in: int,
                        weight: float = 1.0) -> None:
        started = time.monotonic()
        first: list[int] = []

        async def on_piece(text: str, tokens: int) -> None:
            if not first:
                first.append(int((time.monotonic() - started) * 1000))
            machine.chunk(text, tokens)
            await self._send(framed, machine.outgoing())

        async def on_position(position: int) -> None:
            machine.report_queue(position)
            await self._send(framed, machine.outgoing())

        offer = self._offers()[machine.accept.model]  # type: ignore[union-attr]
        consumer = machine.open_msg.consumer  # type: ignore[union-attr]
        try:
            async with self.queue_for(offer, backend).slot(consumer, weight, on_position):
                result = await backend.generate(messages, max_tokens=limit, temperature_milli=request.temperature_milli,
                                                top_p_milli=request.top_p_milli, stop=request.stop, on_piece=on_piece)
        except QueueFull as exc:
            machine.fail_call("capacity", str(exc)[:512])
            return
        except QueueTimeout as exc:
            self.sla.record(offer.model, None, False)
            machine.fail_call("timeout", str(exc)[:512])
            return
        except BackendError as exc:
            _logger.warning("backend %s failed: %s", backend.spec, exc)
            self.on_outcome(offer.model, False)
            self.sla.record(offer.model, None, False)
            machine.fail_call("backend_error", str(exc)[:512])
            return
        self.on_outcome(offer.model, True)
        self.sla.record(offer.model, first[0] if first else None, True)
        actual_in = min(result.tokens_in, tokens_in) if result.tokens_in is not None else None
        machine.finish_call(result.finish_reason, self.now(), tokens_in=actual_in,
                            discount_permille=self.sla.discount(offer.model))

    async def _claim(self, receipt: protocol.Receipt, state: dict[str, Any]) -> None:
        try:
            r = await self.escrow.call(receipt.agent, self._signed(protocol.EscrowClaim, receipt=receipt))
        except (EscrowUnreachable, ValueError) as exc:
            _logger.warning("claim of %s failed: %s", receipt.cumulative, exc)
            return
        if r.ok or r.error in ("replayed", "already_claimed"):
            state["claimed"] = max(state["claimed"], receipt.cumulative)
            await trio.to_thread.run_sync(self.receipts.mark_claimed, receipt)
        else:
            _logger.warning("claim refused: %s %s", r.error, r.detail)

    async def _settle(self, machine: ProviderSession, state: dict[str, Any], close: Any) -> None:
        last = state["last"]
        half = getattr(close, "escrow_close", None)
        if half is not None and machine.open_msg is not None and half.channel_id == machine.open_msg.channel.channel_id \
                and half.receipt == last:
            request = protocol.sign(half, "provider_sig", self.identity)
            try:
                r = await self.escrow.call(machine.open_msg.channel.agent, request)
                if r.ok:
                    if last is not None:
                        await trio.to_thread.run_sync(self.receipts.mark_claimed, last)
                    return
                _logger.warning("cooperative close refused: %s %s", r.error, r.detail)
            except (EscrowUnreachable, ValueError) as exc:
                _logger.warning("cooperative close failed: %s", exc)
        if last is not None and last.cumulative > state["claimed"]:
            await self._claim(last, state)
