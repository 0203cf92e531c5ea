"""The provider side of ``protocol.SESSION_PROTOCOL``: moves the frames of
``protocol.ProviderSession`` over a stream, runs the model, keeps receipts, gets paid.

``ProviderService`` holds what every session shares (the storefront, admission, the escrow
client, receipts, the job queues); ``handle`` gives each stream its own ``_StreamSession``, whose
typed state lives and dies with the stream.

Per session: Open -> the machine checks the signatures and the channel -> ``Admission`` checks
model, schedule, terms, agent, capacity, rate limit -> the agent is asked about the channel ->
Accept or Reject (always built by the machine). Per call: admission's rate limit and
``max_tokens`` check, prompt tokens counted by the backend, the machine's clamp (context, budget,
expiry), the job queue, streamed chunks, provider-signed receipt, counter-signature, receipt
stored. Refused or failed calls cost nothing. Counter-signed receipts are claimed from the
escrow every ``claim_interval_s`` during long sessions and at the end — through the consumer's
half of a cooperative close when it sends one (settling the channel at once), else by a claim.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
from typing import Any

import trio

import protocol
from protocol import CallRequested, Countersigned, Open, ProviderSession, SessionClosed
from wallet import Identity

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from .._contracts import active_contract
from .._receipts import ReceiptStore
from ..escrow import EscrowClient, EscrowUnreachable
from ..net import FramedStream, StreamClosed
from ._admission import Admission, Refusal
from ._health import HealthMonitor
from ._offers import Offer
from ._queue import JobQueue, QueueFull, QueueTimeout
from ._sla import SlaConfig, SlaTracker
from ._storefront import Storefront
from .backends import Backend, BackendError

__all__ = ["ProviderService"]

_logger = logging.getLogger(__name__)


class ProviderService:
    """What every provider session shares; ``handle`` serves one session per stream."""

    def __init__(
        self,
        identity: Identity,
        storefront: Storefront,
        escrow: EscrowClient,
        receipts: ReceiptStore,
        *,
        health: HealthMonitor | None = None,
        sla: SlaTracker | None = None,
        wall_clock: WallClock = SYSTEM_WALL_CLOCK,
        claim_interval_s: float = 30.0,
        max_waiting: int = 32,
        job_timeout_s: float = 120.0,
    ) -> None:
        """
        Args:
            wall_clock: seconds since the epoch (expiries, receipts' times, contracts).
            claim_interval_s: how often a long session's receipts are claimed while it runs.
            max_waiting, job_timeout_s: each model's job queue bounds.
        """
        self.identity = identity
        self.storefront = storefront
        self.admission: Admission = storefront.admission
        self.escrow = escrow
        self.receipts = receipts
        self.health = health
        self.sla = sla or SlaTracker(SlaConfig())
        self.wall_clock = wall_clock
        self.claim_interval_s = claim_interval_s
        self.max_waiting = max_waiting
        self.job_timeout_s = job_timeout_s
        self.queues: dict[str, JobQueue] = {}

    @property
    def active(self) -> Any:
        """Sessions running now, per model."""
        return self.admission.active

    def now(self) -> int:
        return int(self.wall_clock())

    async def send(self, framed: FramedStream, msgs: list[Any]) -> None:
        """Every message to a consumer leaves through here."""
        await framed.send_all(msgs)

    async def handle(self, stream: Any) -> None:
        """One session on one stream, start to end (the libp2p stream handler)."""
        framed = FramedStream(stream)
        try:
            await _StreamSession(self, framed).run()
        except* (StreamClosed, protocol.ProtocolError) as group:  # mid-session, inside the session's nursery
            peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", "?")
            _logger.info("session from %s ended: %s", peer, group.exceptions[0])
        finally:
            await framed.close()

    def signed(self, cls: type, **fields: Any) -> Any:
        """An escrow request of ``cls`` from this node, signed."""
        msg = cls(request_id=secrets.token_bytes(16), party=self.identity.peer_id, issued_at=self.now(), **fields)
        return protocol.sign(msg, "sig", self.identity)

    def queue_for(self, offer: Offer, backend: Backend) -> JobQueue:
        q = self.queues.get(offer.model)
        if q is None:
            slots = backend.parallel or offer.max_concurrent
            q = self.queues[offer.model] = JobQueue(slots, self.max_waiting, self.job_timeout_s)
        return q

    def record_outcome(self, model: str, ok: bool, ttft_ms: int | None) -> None:
        if self.health is not None:
            self.health.record(model, ok)
        self.sla.record(model, ttft_ms, ok)

    async def claim(self, receipt: protocol.Receipt) -> bool:
        """Claim what ``receipt`` (doubly signed) is owed; True once the agent has paid it."""
        try:
            r = await self.escrow.call(receipt.agent, self.signed(protocol.EscrowClaim, receipt=receipt))
        except (EscrowUnreachable, ValueError) as exc:
            _logger.warning("claim of %s failed: %s", receipt.cumulative, exc)
            return False
        if r.ok or r.error in ("replayed", "already_claimed"):
            await trio.to_thread.run_sync(self.receipts.mark_claimed, receipt)
            return True
        _logger.warning("claim refused: %s %s", r.error, r.detail)
        return False


@dataclasses.dataclass
class _Settlement:
    """What one session is owed and has been paid."""

    last: protocol.Receipt | None = None  # the latest doubly-signed receipt
    claimed: int = 0  # cumulative µc the agent has paid for this session
    claimed_at: float = 0.0  # trio time of the last periodic claim


class _StreamSession:
    """One session on one stream: its machine, the offer it serves, its seat and its settlement."""

    def __init__(self, service: ProviderService, framed: FramedStream) -> None:
        self.service = service
        self.framed = framed
        self.machine = ProviderSession(service.identity)
        self.settlement = _Settlement(claimed_at=trio.current_time())
        self.offer: Offer | None = None
        self.backend: Backend | None = None
        self.weight = 1  # the tier's queue priority
        self.last_latency_ms: int | None = None

    async def _flush(self) -> None:
        await self.service.send(self.framed, self.machine.outgoing())

    async def run(self) -> None:
        first = await self.framed.receive(expect=(Open,))
        try:
            self.machine.receive(first, self.service.now())
        except protocol.RemoteProtocolError:
            await self._flush()  # the machine's Reject says why
            raise
        refusal = await self._decide(first)
        if refusal is not None:
            self.machine.reject_open(refusal.reason, refusal.detail, refusal.retry_after_s)
            await self._flush()
            return
        assert self.offer is not None and self.backend is not None
        close = None
        with self.service.admission.seat(first.consumer, self.offer.model, first.tier):
            try:
                self.machine.accept_open(first.price, self.offer.max_context, self.service.now())
                await self._flush()
                async with trio.open_nursery() as nursery:
                    close = await self._serve(nursery)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self._settle(close)

    async def _decide(self, msg: Open) -> Refusal | None:
        """Admission, then the agent's word on the channel, then the backend; None: accept."""
        service, store = self.service, self.service.storefront
        offer = store.offer(msg.model)
        listed = store.listed(offer) if offer is not None else None  # priced now, before this session counts
        when = dt.datetime.fromtimestamp(service.wall_clock(), dt.timezone.utc)
        contract = active_contract(store.contracts, msg.consumer, msg.model, when)
        terms = None
        if listed is not None:
            try:
                terms = protocol.session_terms(listed, tier=msg.tier, batch_calls=msg.batch_calls,
                                               contract_price=contract.price if contract is not None else None)
            except protocol.InvalidMessage as exc:
                return Refusal("bad_request", str(exc))
        refusal = service.admission.check_open(msg, offer, listed, terms, available=store.available(),
                                               accepted_agents=store.accepted_agents(), contracts=store.contracts,
                                               when=when, now=trio.current_time())
        if refusal is not None:
            return refusal
        assert offer is not None and listed is not None
        try:
            answer = await service.escrow.call(msg.channel.agent,
                                               service.signed(protocol.EscrowQuery, channel_id=msg.channel.channel_id))
        except (EscrowUnreachable, ValueError) as exc:
            return Refusal("escrow_invalid", f"could not confirm the channel with its agent: {exc}")
        refusal = Admission.check_channel(msg, answer, service.now())
        if refusal is not None:
            return refusal
        try:
            self.backend = await store.backend_for(offer)
        except BackendError as exc:
            return Refusal("unavailable", str(exc))
        self.offer = offer
        self.weight = next((t.priority for t in listed.tiers if t.name == msg.tier), 1)
        return None

    async def _serve(self, nursery: trio.Nursery) -> protocol.Close | None:
        """Calls until the consumer closes (its Close) or goes away (None)."""
        while True:
            try:
                msg = await self.framed.receive()
            except StreamClosed:
                return None
            for event in self.machine.receive(msg, self.service.now()):
                if isinstance(event, CallRequested):
                    started = trio.current_time()
                    await self._call(event.request)
                    self.last_latency_ms = int((trio.current_time() - started) * 1000)
                elif isinstance(event, Countersigned):
                    await self._countersigned(event.receipt, nursery)
                elif isinstance(event, SessionClosed):
                    return event.close
            await self._flush()

    async def _countersigned(self, receipt: protocol.Receipt, nursery: trio.Nursery) -> None:
        s = self.settlement
        s.last = receipt
        latency, self.last_latency_ms = self.last_latency_ms, None
        await self.service.receipts.put(receipt, "provider", latency)
        if trio.current_time() - s.claimed_at >= self.service.claim_interval_s:
            s.claimed_at = trio.current_time()
            nursery.start_soon(self._claim, receipt)

    async def _call(self, request: protocol.Request) -> None:
        assert self.offer is not None and self.backend is not None and self.machine.open_msg is not None
        consumer = self.machine.open_msg.consumer
        refusal = self.service.admission.check_call(consumer, self.offer, request, trio.current_time())
        if refusal is not None:
            self.machine.fail_call(refusal.reason, refusal.detail)
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                tokens_in: int | None = await self.backend.count_prompt_tokens(messages)
            except Exception as exc:  # a tokenizer failing on odd input
                self.machine.fail_call("bad_request", f"cannot tokenize the prompt: {exc}")
                tokens_in = None
            limit = self.machine.start_call(tokens_in, self.service.now()) if tokens_in is not None else None
            if limit is not None and tokens_in is not None:
                await self._generate(request, messages, limit, tokens_in)
        await self._flush()

    async def _generate(self, request: protocol.Request, messages: list[dict[str, str]], limit: int,
                        tokens_in: int) -> None:
        assert self.offer is not None and self.backend is not None and self.machine.open_msg is not None
        service, offer, backend, machine = self.service, self.offer, self.backend, self.machine
        started = trio.current_time()
        first: list[int] = []

        async def on_piece(text: str, tokens: int) -> None:
            if not first:
                first.append(int((trio.current_time() - started) * 1000))
            machine.chunk(text, tokens)
            await self._flush()

        async def on_position(position: int) -> None:
            machine.report_queue(position)
            await self._flush()

        try:
            async with service.queue_for(offer, backend).slot(machine.open_msg.consumer, self.weight, on_position):
                result = await backend.generate(messages, max_tokens=limit, temperature_milli=request.temperature_milli,
                                                top_p_milli=request.top_p_milli, stop=request.stop, on_piece=on_piece)
        except QueueFull as exc:
            machine.fail_call("capacity", str(exc))
            return
        except QueueTimeout as exc:
            service.sla.record(offer.model, None, False)
            machine.fail_call("timeout", str(exc))
            return
        except BackendError as exc:
            _logger.warning("backend %s failed: %s", backend.spec, exc)
            service.record_outcome(offer.model, False, None)
            machine.fail_call("backend_error", str(exc))
            return
        service.record_outcome(offer.model, True, first[0] if first else None)
        actual_in = min(result.tokens_in, tokens_in) if result.tokens_in is not None else None
        machine.finish_call(result.finish_reason, service.now(), tokens_in=actual_in,
                            discount_permille=service.sla.discount(offer.model))

    async def _claim(self, receipt: protocol.Receipt) -> None:
        if await self.service.claim(receipt):
            self.settlement.claimed = max(self.settlement.claimed, receipt.cumulative)

    async def _settle(self, close: protocol.Close | None) -> None:
        """At the session's end: the cooperative close when the consumer sent its half, else a claim."""
        last, open_msg = self.settlement.last, self.machine.open_msg
        half = close.escrow_close if close is not None else None
        if half is not None and open_msg is not None and half.channel_id == open_msg.channel.channel_id \
                and half.receipt == last:
            request = protocol.sign(half, "provider_sig", self.service.identity)
            try:
                r = await self.service.escrow.call(open_msg.channel.agent, request)
                if r.ok:
                    if last is not None:
                        await trio.to_thread.run_sync(self.service.receipts.mark_claimed, last)
                    return
                _logger.warning("cooperative close refused: %s %s", r.error, r.detail)
            except (EscrowUnreachable, ValueError) as exc:
                _logger.warning("cooperative close failed: %s", exc)
        if last is not None and last.cumulative > self.settlement.claimed:
            await self._claim(last)
