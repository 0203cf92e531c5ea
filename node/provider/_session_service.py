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
stored. Refused or failed calls cost nothing. While a call generates, the stream is read too:
the consumer's ``Cancel`` (or any message, or the stream ending) stops the backend at once
(it ends at its next token), and a cancelled call's receipt bills only the prefix the consumer
says it received (docs/PROTOCOL.md, "Cancellation").

Getting paid (``ChannelBook``): a session is admitted only if its channel can pay it on top of
everything else this provider may be owed on that channel; counter-signed receipts are held in
the book (even when ``receipts.db`` cannot store one: then its acknowledgement is withheld and the
session closed)
and claimed by the ``SettlementWorker`` (``_settlement``) every ``claim_interval_s`` while a
session runs, ``claim_margin_s`` before its channel's expiry (no call starts inside that
margin), at its end, and after a failed claim with backoff, across restarts. At the
end, the consumer's half of a cooperative close is completed only when it settles everything
owed on the channel; a consumer that leaves a receipt unsigned is refused for a while
(``Admission.record_unpaid``). After a ``Reject`` the consumer may send its half of a close of
the unused channel, which is completed when nothing is owed on it, so the refusal locks nothing.

Agent calls (docs/PROTOCOL.md, "Agent calls"): a ``RequestV2`` is read back into OpenAI-shaped
messages and ``CallOptions`` (``node._calls.from_request``) and handed to the backend whole; its
tool-call deltas and logprobs go out in ``ChunkV2``s, each backend piece cut into chunks that fit
a frame (``_chunks.wire_pieces``). A call needing a feature the offer's listing does not name, an option
the backend cannot serve (``BackendUnsupported``), chat on an embeddings offer or embeddings on a
chat offer is a ``bad_request`` CallError. An ``EmbedRequest``: the inputs' exact token count, the
machine's budget check, a slot in the model's job queue (as chat: the concurrency limits hold),
``embed``, the ``EmbedResult``, and a receipt billing those input tokens. Closing the session
while it embeds stops the wait and bills nothing; a Cancel of an embed call breaks the protocol.

Bounds: the first frame (the Open) is at most ``OPEN_MAX_BYTES`` and must arrive within
``open_timeout_s``; an accepted session idle for ``session_idle_s`` is closed; a counter-signature
must come within ``countersign_timeout_s``; a consumer that stops reading for ``write_timeout_s``
loses the session.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import math
import secrets
from typing import Any, Awaitable, Callable

import trio

import protocol
from protocol import CallRequested, Countersigned, Open, ProviderSession, SessionClosed
from wallet import Identity

from .._calls import CallOptions, from_request
from .._clock import SYSTEM_WALL_CLOCK, WallClock
from .._contracts import active_contract
from .._receipts import ReceiptStore, ReceiptStoreError
from ..escrow import EscrowClient, EscrowUnreachable
from ..net._streams import FramedStream, StreamClosed, StreamTimeout
from ._admission import Admission, Refusal
from ._channels import ChannelBook, SessionDebt
from ._chunk_writer import ChunkWriter
from ._chunks import wire_pieces
from ._health import HealthMonitor
from ._offers import Offer
from ._queue import JobQueue, QueueFull, QueueTimeout
from ._settlement import SettlementWorker
from ._sla import SlaConfig, SlaTracker
from ._storefront import Storefront
from .backends import Backend, BackendError, Generation
from .backends._base import BackendUnsupported, Embedded

__all__ = ["ProviderService", "OPEN_MAX_BYTES"]

_logger = logging.getLogger(__name__)
OPEN_MAX_BYTES = 16 << 10  # an Open is ~700 bytes; nobody unadmitted makes us hold a 1 MiB frame
# A Cancel names the chunks the consumer received; chunks sent after it can only be the ones still
# on their way. One that drops a chunk this node handed to the stream longer ago than this says it
# never got what it had (the whole answer for the prompt's price): it pays the prefix it named, the
# session ends, and its sessions are refused for a while, as for an answer left unsigned.
CANCEL_GRACE_S = 5.0
STOP_SETTLE_S = 5.0  # how long a session cut by the node's stop may spend settling
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
        claim_margin_s: int = 30,
        claim_retry_s: int = 5,
        claim_retry_max_s: int = 300,
        max_waiting: int = 32,
        job_timeout_s: float = 120.0,
        open_timeout_s: float = 10.0,
        session_idle_s: float = 300.0,
        countersign_timeout_s: float = 30.0,
        write_timeout_s: float = 30.0,
    ) -> None:
        """
        Args:
            wall_clock: seconds since the epoch (expiries, receipts' times, contracts).
            claim_interval_s: how often a long session's receipts are claimed while it runs.
            claim_margin_s: everything is claimed this long before a channel expires, and no
                call starts after that point.
            claim_retry_s, claim_retry_max_s: a failed claim is retried after ``claim_retry_s``,
                doubling after each further failure up to ``claim_retry_max_s``.
            max_waiting, job_timeout_s: each model's job queue bounds.
            open_timeout_s, session_idle_s, countersign_timeout_s, write_timeout_s: how long a
                consumer may keep us waiting for its Open, its next request, its counter-signature,
                and for it to read what we send.
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
        self.book = ChannelBook(interval_s=int(claim_interval_s), margin_s=claim_margin_s, retry_s=claim_retry_s,
                                retry_max_s=claim_retry_max_s)
        self.settlement = SettlementWorker(identity, escrow, receipts, self.book, wall_clock)
        self.max_waiting = max_waiting
        self.job_timeout_s = job_timeout_s
        self.open_timeout_s = open_timeout_s
        self.session_idle_s = session_idle_s
        self.stopping = False  # the node is stopping (``stop_settling``)
        self.settling: set[trio.CancelScope] = set()  # sessions settling now
        self.countersign_timeout_s = countersign_timeout_s
        self.write_timeout_s = write_timeout_s
        self.queues: dict[str, JobQueue] = {}
        # calls of admitted sessions (their channel confirmed) refused for capacity: a full queue or a
        # queue timeout, per model, since start (market observations and advice read it); refusals at
        # open are not counted: a stranger without money could inflate them
        self.turned_away: collections.Counter[str] = collections.Counter()

    @property
    def active(self) -> Any:
        """Sessions running now, per model."""
        return self.admission.active

    def now(self) -> int:
        return int(self.wall_clock())

    def stop_settling(self) -> None:
        """The node stops: sessions still open (a consumer's standing session) settle for at most
        ``STOP_SETTLE_S`` more; what they could not claim is claimed from receipts.db at the next start."""
        self.stopping = True
        for scope in self.settling:
            scope.deadline = min(scope.deadline, trio.current_time() + STOP_SETTLE_S)

    async def send(self, framed: FramedStream, msgs: list[Any]) -> None:
        """Every message to a consumer leaves through here.

        Raises:
            StreamClosed: the consumer is gone, or read nothing for ``write_timeout_s``.
        """
        with trio.move_on_after(self.write_timeout_s) as scope:
            await framed.send_all(msgs)
        if scope.cancelled_caught:
            raise StreamTimeout(f"the consumer read nothing for {self.write_timeout_s:g}s")

    async def handle(self, stream: Any) -> None:
        """One session on one stream, start to end (the libp2p stream handler)."""
        framed = FramedStream(stream, max_size=OPEN_MAX_BYTES, read_timeout_s=self.open_timeout_s)
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

    async def claim_debt(self, debt: SessionDebt) -> bool:
        """Claim ``debt``'s latest receipt now (``SettlementWorker.claim_debt``); True once paid."""
        return await self.settlement.claim_debt(debt)

    def wake_settlement(self) -> None:
        """Have the settlement worker look at what is due now (a counter-signature near expiry,
        a session's end, a receipt delivered late)."""
        self.settlement.wake()

    async def serve_settlement(self, tick_s: float = 1.0, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the settlement worker until cancelled (``SettlementWorker.serve``)."""
        await self.settlement.serve(tick_s, task_status=task_status)


class _StreamSession:
    """One session on one stream: its machine, the offer it serves, its seat and its settlement."""

    def __init__(self, service: ProviderService, framed: FramedStream) -> None:
        self.service = service
        self.framed = framed
        self.machine = ProviderSession(service.identity)
        self.offer: Offer | None = None
        self.backend: Backend | None = None
        self.weight = 1  # the tier's queue priority
        self.last_latency_ms: int | None = None
        self.walked_away = False  # the consumer stopped taking an answer while it streamed
        self.stale_cut = False  # its Cancel disowned chunks it had long had (CANCEL_GRACE_S)
        self._flushed_at: list[float] = []  # when each chunk of the running call went to the stream
        self.storage_error: str | None = None  # receipts.db could not store a receipt of this session
        self.consumer_close: protocol.Close | None = None  # its Close, when it came in the middle of a call
        self._inbox: trio.MemoryReceiveChannel[Any]  # the session's messages, read by ``_read_frames``

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
            await self._release_unused(first)
            return
        assert self.offer is not None and self.backend is not None
        self.framed.set_max_size(protocol.DEFAULT_MAX_MESSAGE)  # admitted: a prompt may fill a frame
        close = None
        with self.service.admission.seat(first.consumer, self.offer.model, first.tier):
            try:
                self.machine.accept_open(first.price, self.offer.max_context, self.service.now(),
                                         commitment=protocol.commitment_id(self.backend.commitment()))
                await self._flush()
                close = await self._serve()
            finally:
                with trio.CancelScope(shield=True) as settling:
                    self.service.settling.add(settling)
                    if self.service.stopping:  # see ``ProviderService.stop_settling``
                        settling.deadline = trio.current_time() + STOP_SETTLE_S
                    try:
                        await self._settle(close)
                    finally:
                        self.service.settling.discard(settling)

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
        if await self._session_id_used(msg.session_id):
            return Refusal("bad_request", "this session id was used before: choose a new one")
        try:
            self.backend = await store.backend_for(offer)
        except BackendError as exc:
            return Refusal("unavailable", str(exc))
        state = answer.channels[0]
        refused = service.book.admit(msg.session_id, msg.channel, min(msg.spend_limit, msg.channel.cap),
                                     agent_cap=state.channel.cap, agent_claimed=state.claimed, now=service.now())
        if refused is not None:
            return Refusal("escrow_invalid", refused)
        self.offer = offer
        self.weight = next((t.priority for t in listed.tiers if t.name == msg.tier), 1)
        return None

    async def _session_id_used(self, session_id: bytes) -> bool:
        """A session id seen before (live, owed, or in the receipts) would mix two receipt chains
        under one id at the agent, which pays per (channel, session)."""
        if self.service.book.session(session_id) is not None:
            return True
        return await trio.to_thread.run_sync(self.service.receipts.has_session, session_id)

    async def _serve(self) -> protocol.Close | None:
        """Calls until the consumer closes (its Close), goes away or idles too long (None).

        One task reads the stream for the whole session and hands each message over (``_receive``),
        so the reading that goes on while a call generates (``_while_listening``) can stop at any
        point without losing a byte."""
        send, self._inbox = trio.open_memory_channel[Any](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_frames, send)
            try:
                return await self._serve_calls()
            finally:
                nursery.cancel_scope.cancel()

    async def _read_frames(self, send: trio.MemorySendChannel[Any]) -> None:
        """Read the session's messages one at a time into ``send``; the stream's end or a frame
        that is not a message goes the same way (as the exception), and then reading stops."""
        async with send:
            while True:
                try:
                    msg = await self.framed.receive(timeout_s=math.inf)
                except (StreamClosed, protocol.ProtocolError) as exc:
                    await send.send(exc)
                    return
                await send.send(msg)

    async def _receive(self, timeout_s: float) -> Any:
        """The consumer's next message.

        Raises:
            StreamTimeout: none within ``timeout_s``. StreamClosed: the stream ended.
            protocol.DecodeError: the bytes were not a message.
        """
        with trio.move_on_after(timeout_s):
            try:
                item = await self._inbox.receive()
            except trio.EndOfChannel:
                raise StreamClosed("end of stream") from None
            if isinstance(item, BaseException):
                raise item
            return item
        raise StreamTimeout(f"no message within {timeout_s:g}s")

    async def _serve_calls(self) -> protocol.Close | None:
        service = self.service
        while True:
            waiting_signature = self.machine.state is protocol.ProviderState.AWAITING_COUNTERSIGN
            try:
                msg = await self._receive(
                    service.countersign_timeout_s if waiting_signature else service.session_idle_s)
            except StreamTimeout as exc:
                _logger.info("closing an idle session: %s", exc)
                self.machine.close(service.now(), "expired")
                try:
                    await self._flush()
                except StreamClosed:
                    pass
                return None
            except StreamClosed:
                return None
            events = self.machine.receive(msg, self.service.now())
            self._judge_cut(msg)  # a Cancel racing the whole call's receipt
            for event in events:
                if isinstance(event, CallRequested):
                    started = trio.current_time()
                    await self._call(event.request)
                    self.last_latency_ms = int((trio.current_time() - started) * 1000)
                    if self.consumer_close is not None:  # it closed the session while the call ran
                        return self.consumer_close
                elif isinstance(event, Countersigned):
                    await self._countersigned(event.receipt)
                elif isinstance(event, SessionClosed):
                    return event.close
            if self.storage_error is not None:  # its receipt is claimed from memory; nothing more is served
                self.machine.close(service.now(), "error")
                await self._flush()
                return None
            if self.stale_cut and self.machine.state is protocol.ProviderState.READY:  # the prefix is settled
                self.machine.close(service.now(), "protocol_error")
                await self._flush()
                return None
            await self._flush()

    async def _countersigned(self, receipt: protocol.Receipt) -> None:
        latency, self.last_latency_ms = self.last_latency_ms, None
        self.service.book.countersigned(receipt)  # claimed from memory even if the store cannot keep it
        try:
            await self.service.receipts.put(receipt, "provider", latency)
        except ReceiptStoreError as exc:  # logged by the store; the session ends after this message
            self.storage_error = str(exc)
            self.machine.withhold_ack()  # not held durably: the consumer keeps it in doubt and redelivers it
        if self.service.book.closing(self.machine.open_msg.channel, self.service.now()):  # type: ignore[union-attr]
            self.service.wake_settlement()

    async def _call(self, request: protocol.Request | protocol.RequestV2 | protocol.EmbedRequest) -> None:
        assert self.offer is not None and self.backend is not None and self.machine.open_msg is not None
        consumer = self.machine.open_msg.consumer
        refusal = self.service.admission.check_call(consumer, self.offer, request, trio.current_time())
        if refusal is None and self.service.book.closing(self.machine.open_msg.channel, self.service.now()):
            refusal = Refusal("expired", "the escrow channel expires too soon to pay for another call")
        messages: list[dict[str, Any]] = []
        options = CallOptions()
        if refusal is None and not isinstance(request, protocol.EmbedRequest):
            try:
                messages, options = from_request(request)
            except ValueError as exc:
                refusal = Refusal("bad_request", str(exc))
        if refusal is None:
            refusal = self._unserved(request, options)
        if refusal is not None:
            self.machine.fail_call(refusal.reason, refusal.detail)
        elif isinstance(request, protocol.EmbedRequest):
            await self._embed(request)
        else:
            try:
                tokens_in: int | None = await self.backend.count_prompt_tokens(messages, options)
            except Exception as exc:  # a tokenizer failing on odd input
                self.machine.fail_call("bad_request", f"cannot tokenize the prompt: {exc}")
                tokens_in = None
            limit = self.machine.start_call(tokens_in, self.service.now()) if tokens_in is not None else None
            if limit is not None and tokens_in is not None:
                await self._generate(request, messages, options, limit, tokens_in)
        await self._flush()

    def _unserved(self, request: Any, options: CallOptions) -> Refusal | None:
        """Why this offer does not serve ``request`` (a call of the other kind, or one needing a
        feature its listing does not name), or None."""
        assert self.offer is not None and self.backend is not None
        embeddings = self.offer.kind == "embeddings" or self.backend.kind == "embeddings"
        if isinstance(request, protocol.EmbedRequest):
            return None if embeddings else Refusal("bad_request", "this offer serves chat, not embeddings")
        if embeddings:
            return Refusal("bad_request", "this offer serves embeddings, not chat")
        missing = sorted(options.needs() - set(self.service.storefront.features(self.offer)))
        return Refusal("bad_request", f"this offer does not support {missing[0]}") if missing else None

    async def _on_position(self, position: int) -> None:
        """The call waits in the job queue at ``position``: the consumer hears it."""
        if self.machine.state is protocol.ProviderState.IN_CALL:
            self.machine.report_queue(position)
            await self._flush()

    async def _attempt(self, run: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """``run()`` (a backend's work in a queue slot) while the session is listened to: ``(True,
        its result)``; a full queue, a queue timeout or a backend failure fails the call instead
        (its CallError queued, nothing charged): ``(False, None)``. An option the backend cannot
        serve is the caller's to change (``bad_request``), not a failure of the model."""
        assert self.offer is not None and self.backend is not None
        service, offer, machine = self.service, self.offer, self.machine
        try:
            return True, await self._while_listening(run)
        except QueueFull as exc:
            service.turned_away[offer.model] += 1
            machine.fail_call("capacity", str(exc))
        except QueueTimeout as exc:
            service.turned_away[offer.model] += 1
            service.sla.record(offer.model, None, False)
            machine.fail_call("timeout", str(exc))
        except BackendUnsupported as exc:
            machine.fail_call("bad_request", str(exc))
        except BackendError as exc:
            _logger.warning("backend %s failed: %s", self.backend.spec, exc)
            service.record_outcome(offer.model, False, None)
            machine.fail_call("backend_error", str(exc))
        return False, None

    async def _embed(self, request: protocol.EmbedRequest) -> None:
        """An embeddings call: count, admit, embed in a queue slot, send the vectors, bill the input."""
        assert self.offer is not None and self.backend is not None and self.machine.open_msg is not None
        service, offer, backend, machine = self.service, self.offer, self.backend, self.machine
        try:
            tokens_in = await backend.count_input_tokens(request.inputs)  # type: ignore[attr-defined]
        except Exception as exc:  # a tokenizer failing on odd input
            machine.fail_call("bad_request", f"cannot tokenize the inputs: {exc}")
            return
        if machine.start_call(tokens_in, service.now()) is None:
            return  # over budget: the machine queued its CallError
        started = trio.current_time()

        async def run() -> Embedded:
            async with service.queue_for(offer, backend).slot(machine.open_msg.consumer, self.weight,  # type: ignore[union-attr]
                                                              self._on_position):
                return await backend.embed(request.inputs, request.dimensions)  # type: ignore[attr-defined]

        ok, result = await self._attempt(run)
        if not ok:
            return
        if machine.state is not protocol.ProviderState.IN_CALL:  # the consumer closed the session: nothing billed
            return
        n = len(request.inputs)
        if not 1 <= result.dims <= protocol.MAX_EMBED_DIMS or len(result.vectors) != n * result.dims * 4 \
                or (request.dimensions and result.dims != request.dimensions) \
                or not protocol.finite_vectors(result.vectors):  # the consumer refuses NaN and inf
            service.record_outcome(offer.model, False, None)
            machine.fail_call("backend_error", f"the model answered {len(result.vectors)} bytes of {result.dims} "
                                               f"dimensions for {n} inputs (or values that are not finite)")
            return
        machine.embed_result(result.dims, result.vectors)
        service.record_outcome(offer.model, True, int((trio.current_time() - started) * 1000))
        machine.finish_call("stop", service.now(), tokens_in=min(result.tokens_in, tokens_in),
                            discount_permille=service.sla.discount(offer.model))

    async def _generate(self, request: protocol.Request | protocol.RequestV2, messages: list[dict[str, Any]],
                        options: CallOptions, limit: int, tokens_in: int) -> None:
        assert self.offer is not None and self.backend is not None and self.machine.open_msg is not None
        service, offer, backend, machine = self.service, self.offer, self.backend, self.machine
        started = trio.current_time()
        first: list[int] = []
        running = False  # the backend has the call (a slot was granted)
        v2 = isinstance(request, protocol.RequestV2)  # a v1 call's chunks carry text only
        self._flushed_at = []

        async def send(piece: tuple[str, int, tuple[Any, ...], tuple[Any, ...]]) -> None:
            """One merged piece (``ChunkWriter``) to the stream, as the chunks that fit a frame."""
            if machine.state is not protocol.ProviderState.IN_CALL:
                return  # cancelled: the backend stops at its next checkpoint; nothing more is sent
            text, tokens, tool_calls, logprobs = piece
            pieces = wire_pieces(text, tokens, tool_calls if v2 else (), logprobs if v2 else ())
            for piece_text, piece_tokens, deltas, lps in pieces:
                if v2:
                    machine.chunk(piece_text, piece_tokens, tool_calls=deltas, logprobs=lps)
                else:
                    machine.chunk(piece_text, piece_tokens)
            try:
                await self._flush()
                self._flushed_at.extend([trio.current_time()] * len(pieces))
            except StreamClosed:
                self.walked_away = True  # it has part of an answer and will not sign for it
                raise

        writer = ChunkWriter(send)

        async def on_piece(text: str, tokens: int, *, tool_calls: Any = (), logprobs: Any = ()) -> None:
            if machine.state is not protocol.ProviderState.IN_CALL:
                return  # cancelled: the backend stops at its next checkpoint; nothing more is sent
            if not first:
                first.append(int((trio.current_time() - started) * 1000))
            await writer.put(text, tokens, tuple(tool_calls), tuple(logprobs))

        async def run() -> Generation:
            nonlocal running
            async with service.queue_for(offer, backend).slot(machine.open_msg.consumer, self.weight,  # type: ignore[union-attr]
                                                              self._on_position):
                running = True
                return await self._generate_while_writing(writer, lambda: backend.generate(
                    messages, max_tokens=limit, temperature_milli=request.temperature_milli,
                    top_p_milli=request.top_p_milli, stop=request.stop, on_piece=on_piece, options=options))

        try:
            ok, result = await self._attempt(run)
        except StreamClosed:
            self.walked_away = self.walked_away or bool(first)  # part of an answer, and gone
            raise
        if not ok:
            return
        if machine.state is protocol.ProviderState.CANCELLING:  # bill the prefix the consumer received
            _logger.info("call %d cancelled by the consumer after %s chunks", request.call_seq, machine.cancelled_after)
            # not begun yet (still queued): nothing was done, nothing is billed (a full discount)
            machine.finish_call(protocol.CANCELLED_FINISH, service.now(), tokens_in=None if running else 0,
                                discount_permille=service.sla.discount(offer.model) if running else 1000)
            return
        if machine.state is not protocol.ProviderState.IN_CALL:  # the consumer closed the session mid-call
            self.walked_away = self.walked_away or bool(first)
            return
        assert result is not None
        service.record_outcome(offer.model, True, first[0] if first else None)
        actual_in = min(result.tokens_in, tokens_in) if result.tokens_in is not None else None
        machine.finish_call(result.finish_reason, service.now(), tokens_in=actual_in,
                            discount_permille=service.sla.discount(offer.model))

    @staticmethod
    async def _generate_while_writing(writer: ChunkWriter, generate: Callable[[], Awaitable[Generation]]) -> Generation:
        """``generate()`` while ``writer`` streams its pieces; returns once every piece is written.

        Raises:
            StreamClosed: the consumer went away (the generation is stopped). Whatever ``generate`` raises.
        """
        failed: list[BaseException] = []
        result: list[Generation] = []

        async def write(generation: trio.CancelScope) -> None:
            try:
                await writer.run()
            except StreamClosed as exc:
                failed.append(exc)
                generation.cancel()

        async with trio.open_nursery() as nursery:
            generation = trio.CancelScope()
            nursery.start_soon(write, generation)
            try:
                with generation:
                    result.append(await generate())
            except Exception as exc:  # raised as itself below, not inside the nursery's group
                failed.append(exc)
                nursery.cancel_scope.cancel()
            finally:
                writer.close()
        if failed:
            raise failed[0]
        if not result:  # the writer stopped it: the consumer is gone
            raise StreamClosed("the consumer stopped reading")
        return result[0]

    def _judge_cut(self, msg: Any) -> None:
        """After ``msg`` reached the machine: a Cancel that disowns a chunk handed to the stream more
        than ``CANCEL_GRACE_S`` ago marks the session (``stale_cut``): the prefix it named is billed,
        then the session ends and the consumer is refused for a while (``Admission.record_unpaid``)."""
        cut = self.machine.cancelled_after
        if not isinstance(msg, protocol.Cancel) or cut is None or cut >= len(self._flushed_at):
            return
        if trio.current_time() - self._flushed_at[cut] > CANCEL_GRACE_S:
            _logger.warning("a Cancel disowned chunk %d, sent %.1f s before it: the session ends", cut,
                            trio.current_time() - self._flushed_at[cut])
            self.stale_cut = self.walked_away = True

    async def _while_listening(self, run: Any) -> Any:
        """``await run()`` (the generation) while reading the stream: whatever the consumer sends
        mid-call (its ``Cancel``, a ``Close``) goes to the machine and stops the generation at
        once, and so does the stream's end (the consumer went away). Returns ``run()``'s result,
        or None when it was stopped.

        Raises:
            StreamClosed: the consumer's stream ended mid-call (raised once the backend stopped).
            protocol.ProtocolError: what it sent broke the protocol. Whatever ``run`` raises.
        """
        outcome: dict[str, Any] = {}

        async def listen(generation: trio.CancelScope) -> None:
            try:
                msg = await self._receive(math.inf)
                for event in self.machine.receive(msg, self.service.now()):  # Cancel: CANCELLING; Close: CLOSED
                    if isinstance(event, SessionClosed):
                        self.consumer_close = event.close
                self._judge_cut(msg)
            except (StreamClosed, protocol.ProtocolError) as exc:
                outcome["error"] = exc
            generation.cancel()

        async with trio.open_nursery() as nursery:
            generation = trio.CancelScope()
            nursery.start_soon(listen, generation)
            with generation:
                try:
                    outcome["result"] = await run()
                except Exception as exc:  # raised as itself below, not inside the nursery's group
                    outcome.setdefault("error", exc)
            nursery.cancel_scope.cancel()  # the call is over: stop listening (a message is never half-taken)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    async def _settle(self, close: protocol.Close | None) -> None:
        """At the session's end: remember an unpaid call; complete the consumer's cooperative close
        when it settles everything owed on the channel, else claim this session's receipts."""
        service, machine, open_msg = self.service, self.machine, self.machine.open_msg
        assert open_msg is not None
        if machine.unpaid_work or self.walked_away:
            _logger.info("consumer %s left a call unpaid: its sessions are refused for a while", open_msg.consumer)
            service.admission.record_unpaid(open_msg.consumer, trio.current_time())
        book, sid, channel_id = service.book, open_msg.session_id, open_msg.channel.channel_id
        last = machine.receipts[-1] if machine.receipts else None
        half = close.escrow_close if close is not None else None
        if half is not None and half.channel_id == channel_id and half.receipt == last:
            # still live in the book while the close is tried: the settlement task leaves it alone
            with book.closing_channel(channel_id) as mine:
                settled = None
                if mine and await self._clear_channel_for_close(sid, channel_id):
                    settled = await self._complete_close(open_msg.channel.agent, half)
            if settled is not None:
                await service.settlement.closed(last, settled)
                book.channel_settled(channel_id)
                return
        book.end(sid)
        debt = book.session(sid)
        if debt is not None and debt.owed > 0 and not any(d.claiming for d in book.on_channel(channel_id)):
            await service.claim_debt(book.start_claim(debt, service.now()))
        else:
            service.wake_settlement()  # the worker claims it after the claim in flight on its channel

    async def _clear_channel_for_close(self, session_id: bytes, channel_id: bytes) -> bool:
        """True when a close of ``channel_id`` settling this session's receipt loses nothing: no
        other session runs on it, and every other one owed on it has been paid (claimed now)."""
        book = self.service.book
        with trio.move_on_after(10):  # a claim in flight on the channel (a periodic one) ends first
            while any(d.claiming for d in book.on_channel(channel_id)):
                await trio.sleep(0.05)
        if any(d.claiming for d in book.on_channel(channel_id)):
            _logger.info("cooperative close declined: a claim on the channel is still in flight")
            return False
        others = book.others(session_id, channel_id)
        if any(d.live for d in others):
            _logger.info("cooperative close declined: %d other sessions still run on the channel",
                         sum(d.live for d in others))
            return False
        for debt in others:
            if not await self.service.claim_debt(book.start_claim(debt, self.service.now())):
                _logger.info("cooperative close declined: another session's receipts are not paid yet")
                return False
        return True

    async def _complete_close(self, agent: str, half: protocol.EscrowClose) -> protocol.EscrowResponse | None:
        """Add this provider's signature to the consumer's half of a cooperative close and submit it.

        Returns:
            The agent's answer once the close is done, else None (logged).
        """
        request = protocol.sign(half, "provider_sig", self.service.identity)
        try:
            r = await self.service.escrow.call(agent, request)
        except (EscrowUnreachable, ValueError) as exc:
            _logger.warning("cooperative close failed: %s", exc)
            return None
        if not r.ok:
            _logger.warning("cooperative close refused: %s %s", r.error, r.detail)
            return None
        return r

    async def _release_unused(self, open_msg: Open) -> None:
        """After a Reject: if the consumer sends its half of a close of the channel it offered and
        nothing is owed on that channel here, complete it, so the refusal locks none of its money."""
        service = self.service
        if open_msg.channel.agent not in service.storefront.accepted_agents():
            return  # never talk to an agent we do not accept on a stranger's word
        try:
            msg = await self.framed.receive(expect=(protocol.Close,), timeout_s=5.0)
            protocol.verify(msg, "sig", protocol.public_key_from_peer_id(open_msg.consumer))
        except (StreamClosed, protocol.ProtocolError):
            return
        half = msg.escrow_close
        if msg.session_id != open_msg.session_id or msg.by != open_msg.consumer or half is None \
                or half.channel_id != open_msg.channel.channel_id or half.receipt is not None:
            return
        with service.book.closing_channel(half.channel_id) as mine:
            if not mine or service.book.on_channel(half.channel_id):
                _logger.info("not releasing a channel this provider has sessions on")
                return
            if await self._complete_close(open_msg.channel.agent, half) is not None:
                _logger.info("released the unused channel of a refused session")
