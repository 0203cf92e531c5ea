"""The consumer side of ``/inferswarm/session/1.0.0``: moves the frames of
``protocol.ConsumerSession`` over a stream to the provider and back.

The machine checks every receipt (hashes it computes itself, pinned prices, the chain, the cap,
the provider's signature) before this side counter-signs it; a provider that lies gets no
counter-signature and so is never paid for that call. A counter-signed receipt is kept durably
(``ReceiptDelivery``) before its signature leaves, and the call is done only once the provider's
signed ``CounterSignAck`` comes (within ``ack_timeout_s``); without it the receipt is redelivered
at once on ``protocol.RECEIPT_PROTOCOL``, and if that fails too the call raises
``SettlementUnconfirmed`` (never a success in doubt) while the receipt stays queued for resending. Ending the session — normally or after a
refused or failed call — sends this consumer's half of a cooperative channel close, so the
provider can settle and the rest is refunded at once; after a ``Reject`` it sends its half of a
close of the unused channel, so a refusal locks nothing.

Agent calls: a call with options (tools, a response format, logprobs, a legacy prompt) or with
tool turns goes as a ``RequestV2`` (``_calls.request_fields``), a plain one as v1, so old providers
keep serving plain chat; its chunks' tool-call pieces and logprobs reach ``on_delta`` whole, its
text ``on_text`` as before, and its result carries the accumulated calls (``finish_reason``
``tool_calls`` when it made any and the receipt says ``stop``). ``embed`` runs one embeddings
call (at most ``protocol.MAX_EMBED_INPUTS`` inputs): its vectors, then its receipt.

Bounds: the provider is dialled (``reach``) before any channel is opened for it; its Accept must
come within ``open_timeout_s``, each message of a call within ``idle_timeout_s`` and the whole
call within ``call_timeout_s``; what it may stream is bounded by the protocol's metering rules.

Cancellation: a call cancelled by its caller (a cancelled library call, a closed HTTP stream at
the daemon's API) is not abandoned: shielded, for at most ``cancel_timeout_s``, this side sends
``Cancel`` naming the chunks its caller was given, checks and counter-signs the provider's receipt
of exactly that prefix, and waits for its acknowledgement; then the cancellation goes on. What
the call cost is a ``CancelledCall`` (``last_cancelled``, and ``_results.cancelled_calls``). A
provider that ignores the Cancel, or bills more than the prefix, is never counter-signed: when
the bound passes the session is closed and the call is unpaid. A call that runs past
``call_timeout_s`` is abandoned unpaid, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import sqlite3
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

import protocol
from protocol import (
    SESSION_PROTOCOL,
    Accepted,
    CallFailed,
    ChannelGrant,
    ChatMessage,
    ChunkReceived,
    ConsumerSession,
    ConsumerState,
    CountersignConfirmed,
    EmbeddingsReceived,
    Price,
    Queued,
    ReceiptSettled,
    Rejected,
    SessionClosed,
)
from wallet import Identity

from .._calls import CallOptions, request_fields
from .._clock import SYSTEM_WALL_CLOCK, WallClock
from .._receipts import ReceiptStore
from ..net._streams import FramedStream, StreamClosed, StreamTimeout
from ._delivery import ReceiptDelivery, SettlementUnconfirmed, delivery_for
from ._failures import CallRefused, ProviderFailed, ProviderMisbehaved, SessionError, SessionRejected, learn
from ._reach import reach
from ._results import CancelledCall, Delta, finish_reason, report_cancelled
from ._trust import TrustBook

_logger = logging.getLogger(__name__)

__all__ = ["SessionError", "SessionRejected", "CallRefused", "ProviderFailed", "ProviderMisbehaved",
           "SettlementUnconfirmed", "CallResult", "EmbedResult", "learn",
           "ConsumerSessionHandle", "open_session", "open_session_on", "reach"]


@dataclasses.dataclass(frozen=True)
class CallResult:
    """One call's answer, its doubly-signed receipt, and how fast it came (first token, total).
    ``finish_reason`` is OpenAI's (``tool_calls`` when it made calls and the receipt says ``stop``);
    ``logprobs`` is None unless the call asked for them."""

    text: str
    finish_reason: str
    receipt: protocol.Receipt
    ttft_s: float
    duration_s: float
    tool_calls: tuple[protocol.ToolCall, ...] = ()
    logprobs: tuple[protocol.TokenLogprob, ...] | None = None
    request: protocol.Request | protocol.RequestV2 | None = None  # what went on the wire


@dataclasses.dataclass(frozen=True)
class EmbedResult:
    """One embeddings call's vectors (``dims`` float32 LE values per input, row-major) and its
    doubly-signed receipt."""

    dims: int
    vectors: bytes
    receipt: protocol.Receipt
    duration_s: float


class ConsumerSessionHandle:
    """One open session with a provider: calls, one receipt each; every outcome is recorded in
    this node's trust book here, so no caller can forget to."""

    def __init__(self, machine: ConsumerSession, framed: FramedStream, receipts: ReceiptStore | None,
                 clock: Callable[[], float], idle_timeout_s: float, trust: TrustBook | None = None,
                 call_timeout_s: float = 600.0, delivery: ReceiptDelivery | None = None,
                 ack_timeout_s: float = 15.0, cancel_timeout_s: float = 5.0,
                 on_settled: Callable[[CallResult], None] | None = None) -> None:
        self.machine = machine
        self._on_settled = on_settled
        self._framed = framed
        self._receipts = receipts
        self._delivery = delivery
        self._ack_timeout = ack_timeout_s
        self._trust = trust
        self._clock = clock
        self._idle = idle_timeout_s
        self._call_timeout = call_timeout_s
        self._cancel_timeout = cancel_timeout_s
        self._deadline: trio.CancelScope | None = None  # the running call's own call_timeout_s
        self._lock = trio.Lock()
        self.last_cancelled: CancelledCall | None = None  # what the last cancelled call cost

    @property
    def provider(self) -> str:
        return self.machine.provider

    def now(self) -> int:
        return int(self._clock())

    async def _next(self, timeout_s: float | None = None) -> list[Any]:
        wait = self._idle if timeout_s is None else timeout_s
        try:
            msg = await self._framed.receive(timeout_s=wait)
        except StreamTimeout as exc:
            raise ProviderFailed(f"the provider sent nothing for {wait:.0f}s") from exc
        except StreamClosed as exc:
            raise ProviderFailed(f"the provider closed the session ({exc})") from exc
        except protocol.DecodeError as exc:
            raise ProviderMisbehaved(exc) from exc
        try:
            events = self.machine.receive(msg, self.now())
        except protocol.RemoteProtocolError as exc:
            raise ProviderMisbehaved(exc) from exc
        settled = [e.receipt for e in events if isinstance(e, ReceiptSettled)]
        for receipt in settled:  # queued before the counter-signature leaves: never only in memory
            with trio.CancelScope(shield=True):
                await self._queue(receipt)
        try:
            await self._framed.send_all(self.machine.outgoing())
        except StreamClosed as exc:
            if not settled:  # a counter-signature that did not leave is in doubt: _confirm sees to it
                raise ProviderFailed(f"the provider closed the session ({exc})") from exc
        for receipt in settled:
            if self._receipts is not None:
                await self._receipts.put(receipt, "consumer")
        return events

    async def _queue(self, receipt: protocol.Receipt) -> None:
        if self._delivery is None:
            return
        try:
            await self._delivery.add(receipt, self.machine.channel.expires_at)
        except (sqlite3.Error, OSError) as exc:  # the provider is paid all the same; only a resend is lost
            _logger.error("cannot queue a counter-signed receipt for redelivery: %s", exc)

    async def _confirm(self, receipt: protocol.Receipt, within_s: float | None = None) -> None:
        """Wait for the provider's acknowledgement of ``receipt`` (at most ``within_s``, default
        ``ack_timeout_s``); without it, redeliver it at once on the receipt protocol.

        Raises:
            SettlementUnconfirmed: neither came; the receipt stays queued for resending.
        """
        cause: SessionError | None = None
        deadline = trio.current_time() + (self._ack_timeout if within_s is None else within_s)
        try:
            while True:
                left = deadline - trio.current_time()
                if left <= 0:
                    raise ProviderFailed(f"no acknowledgement within {self._ack_timeout:g}s")
                for event in await self._next(left):
                    if isinstance(event, CountersignConfirmed) and event.receipt == receipt:
                        if self._delivery is not None:
                            with trio.CancelScope(shield=True):
                                await self._delivery.delivered(receipt)
                        return
                    if isinstance(event, SessionClosed):
                        raise ProviderFailed(f"the provider closed the session ({event.close.reason}) before "
                                             "acknowledging the counter-signature")
        except SessionError as exc:
            cause = exc
        if self._delivery is not None and await self._delivery.confirm_now(receipt):
            self.machine.confirmed(receipt)
            return
        raise SettlementUnconfirmed(receipt, cause, queued=self._delivery is not None)

    async def call(self, messages: list[dict[str, Any]], max_tokens: int, *, temperature_milli: int = 1000,
                   top_p_milli: int = 1000, stop: tuple[str, ...] = (),
                   on_text: Callable[[str], Awaitable[None]] | None = None,
                   on_queue: Callable[[int], Awaitable[None]] | None = None,
                   options: CallOptions = CallOptions(),
                   on_delta: Callable[[Delta], Awaitable[None]] | None = None) -> CallResult:
        """Run one call; return the completion and its doubly-signed receipt.

        Args:
            messages: OpenAI-shaped turns (``_calls.request_fields`` puts them on the wire).
            options: tools, response format, logprobs, …: a call with any of them goes as a ``RequestV2``.
            on_text: each piece of text as it comes. on_delta: each streamed piece whole (text,
                tool-call pieces, logprobs), as it comes; both may be given.

        Raises:
            CallRefused: the provider refused this call (reason code); nothing is charged.
            ProviderFailed, ProviderMisbehaved: the call failed; nothing was counter-signed for it.
            SettlementUnconfirmed: the answer was counter-signed but the provider has not confirmed
                it (no ack, and an immediate redelivery failed); the receipt will be resent.
            protocol.SpendLimitReached: the session's budget is spent.

        Cancellation: cancelling the call pays for the prefix ``on_text`` was given and nothing
        more (the module's docstring); ``last_cancelled`` then says what it cost.
        """
        async with self._lock:
            if self.machine.state is not ConsumerState.READY:  # not a new fault: the one that ended it was learnt
                raise ProviderFailed(f"this session takes no more calls (it is {self.machine.state.value}: a "
                                     "failed or unsettled call, or a close, ended it)")
            try:
                with trio.move_on_after(self._call_timeout) as deadline:
                    self._deadline = deadline
                    result = await self._call(messages, max_tokens, temperature_milli, top_p_milli, stop, on_text,
                                              on_queue, options, on_delta)
                if deadline.cancelled_caught:
                    late = ProviderFailed(f"the call did not finish within {self._call_timeout:.0f}s")
                    if self.machine.unacked is not None:  # its answer came: counter-signed, in doubt
                        raise SettlementUnconfirmed(self.machine.unacked, late, queued=self._delivery is not None)
                    raise late
            except SessionError as exc:
                learn(self._trust, self.provider, exc)
                raise
            if self._trust is not None:
                self._trust.completed(self.provider, result.ttft_s, result.receipt.tokens_out, result.duration_s)
            if self._on_settled is not None:
                self._on_settled(result)
            return result

    async def _call(self, messages: list[dict[str, Any]], max_tokens: int, temperature_milli: int, top_p_milli: int,
                    stop: tuple[str, ...], on_text: Callable[[str], Awaitable[None]] | None,
                    on_queue: Callable[[int], Awaitable[None]] | None, options: CallOptions,
                    on_delta: Callable[[Delta], Awaitable[None]] | None) -> CallResult:
        seq = self.machine.next_seq
        knobs = dict(temperature_milli=temperature_milli, top_p_milli=top_p_milli, stop=stop)
        if options == CallOptions() and all(set(m) <= {"role", "content"} for m in messages):  # plain chat: v1
            request = self.machine.request(tuple(ChatMessage(role=m["role"], content=m["content"]) for m in messages),
                                           max_tokens, **knobs)
        else:
            fields = request_fields(messages, options)
            request = self.machine.request(fields.pop("messages"), max_tokens, **knobs, **fields)
        start = trio.current_time()
        given = [0]  # chunks handed to the caller: a cancelled call pays for these only
        try:
            result = await self._answer(start, on_text, on_queue, given, on_delta, options.logprobs)
            return dataclasses.replace(result, request=request)
        except trio.Cancelled:
            if self._deadline is None or not self._deadline.cancel_called:  # our caller's, not our own timeout
                with trio.CancelScope(shield=True):
                    self.last_cancelled = await self._cancel(seq, given[0])
                report_cancelled(self.last_cancelled)
            raise

    async def _answer(self, start: float, on_text: Callable[[str], Awaitable[None]] | None,
                      on_queue: Callable[[int], Awaitable[None]] | None, given: list[int],
                      on_delta: Callable[[Delta], Awaitable[None]] | None = None,
                      logprobs: bool = False) -> CallResult:
        """Send the request, stream its answer to ``on_text`` and ``on_delta`` (counting in
        ``given[0]`` the chunks handed over) until its receipt is settled and acknowledged."""
        first: float | None = None
        lps: list[protocol.TokenLogprob] = []
        try:
            await self._framed.send_all(self.machine.outgoing())
        except StreamClosed as exc:
            raise ProviderFailed(f"the provider closed the session ({exc})") from exc
        while True:
            for event in await self._next():
                if isinstance(event, ChunkReceived):
                    if first is None:
                        first = trio.current_time() - start
                    chunk = event.chunk
                    calls, probs = getattr(chunk, "tool_calls", ()), getattr(chunk, "logprobs", ())
                    lps.extend(probs)
                    if on_text is not None and chunk.text:
                        await on_text(chunk.text)
                    if on_delta is not None and (chunk.text or calls or probs):
                        await on_delta(Delta(chunk.text, tuple(calls), tuple(probs)))
                    given[0] += 1
                elif isinstance(event, Queued):
                    if on_queue is not None:
                        await on_queue(event.queued.position)
                elif isinstance(event, CallFailed):
                    raise CallRefused(event.error.reason, event.error.detail)
                elif isinstance(event, ReceiptSettled):
                    await self._confirm(event.receipt)  # done only once the provider holds it
                    duration = trio.current_time() - start
                    calls = tuple(event.tool_calls)
                    return CallResult(event.text, finish_reason(event.receipt.finish_reason, calls), event.receipt,
                                      first if first is not None else duration, duration, calls,
                                      tuple(lps) if logprobs else None)
                elif isinstance(event, SessionClosed):
                    raise ProviderFailed(f"the provider closed the session ({event.close.reason})")

    async def embed(self, inputs: tuple[str, ...], dimensions: int = 0, expect_dims: int = 0) -> EmbedResult:
        """One embeddings call of at most ``protocol.MAX_EMBED_INPUTS`` inputs: their vectors and
        the call's doubly-signed receipt (the machine checks both: sizes, ``embedding_hash``, price).

        Raises:
            CallRefused, ProviderFailed, ProviderMisbehaved, SettlementUnconfirmed, protocol.SpendLimitReached:
            as ``call``.

        Cancellation: an embeddings call is one short batch and cannot be cancelled on the wire;
        a cancelled caller ends the session (its block's close), and nothing unreceived is paid.
        """
        async with self._lock:
            if self.machine.state is not ConsumerState.READY:
                raise ProviderFailed(f"this session takes no more calls (it is {self.machine.state.value})")
            try:
                with trio.move_on_after(self._call_timeout) as deadline:
                    self._deadline = deadline
                    result = await self._embed(inputs, dimensions, expect_dims)
                if deadline.cancelled_caught:
                    late = ProviderFailed(f"the embeddings call did not finish within {self._call_timeout:.0f}s")
                    if self.machine.unacked is not None:
                        raise SettlementUnconfirmed(self.machine.unacked, late, queued=self._delivery is not None)
                    raise late
            except SessionError as exc:
                learn(self._trust, self.provider, exc)
                raise
            if self._trust is not None:
                self._trust.completed(self.provider, result.duration_s, 0, result.duration_s)
            return result

    async def _embed(self, inputs: tuple[str, ...], dimensions: int, expect_dims: int) -> EmbedResult:
        self.machine.embed(tuple(inputs), dimensions, expect_dims)
        start = trio.current_time()
        try:
            await self._framed.send_all(self.machine.outgoing())
        except StreamClosed as exc:
            raise ProviderFailed(f"the provider closed the session ({exc})") from exc
        got: protocol.EmbedResult | None = None
        while True:
            for event in await self._next():
                if isinstance(event, EmbeddingsReceived):
                    got = event.result
                elif isinstance(event, Queued):
                    pass
                elif isinstance(event, CallFailed):
                    raise CallRefused(event.error.reason, event.error.detail)
                elif isinstance(event, ReceiptSettled):
                    await self._confirm(event.receipt)
                    assert got is not None  # the machine settles an embeddings receipt only after its result
                    return EmbedResult(got.dims, got.vectors, event.receipt, trio.current_time() - start)
                elif isinstance(event, SessionClosed):
                    raise ProviderFailed(f"the provider closed the session ({event.close.reason})")

    async def _cancel(self, seq: int, given: int) -> CancelledCall:
        """Cancel the running call (``seq``) after the ``given`` chunks its caller got, and settle exactly
        that prefix, within ``cancel_timeout_s`` (run shielded: the caller is being cancelled).

        Returns:
            What the call cost. When the provider sends no valid receipt of the prefix in time (it
            kept streaming, billed more, failed or went away) nothing was counter-signed: the
            session is closed and the outcome says why.
        """
        machine = self.machine
        model, provider = machine.model, self.provider
        if machine.receipts and machine.receipts[-1].call_seq == seq:
            # the whole answer was counter-signed before the cancel came: it is paid (in doubt until acked)
            return CancelledCall(provider, model, "", machine.receipts[-1], "settled before the cancel",
                                 machine.unacked is None)
        if machine.state is not ConsumerState.IN_CALL:
            return CancelledCall(provider, model, "", None, f"nothing to cancel (session {machine.state.value})")
        machine.cancel(chunks=given)
        failure: SessionError | None = None
        with trio.move_on_after(self._cancel_timeout) as wait:
            deadline = trio.current_time() + self._cancel_timeout
            try:
                await self._framed.send_all(machine.outgoing())
                while True:
                    for event in await self._next(max(0.0, deadline - trio.current_time())):
                        if isinstance(event, ReceiptSettled):
                            confirmed = True
                            try:
                                await self._confirm(event.receipt, max(0.0, deadline - trio.current_time()))
                            except SettlementUnconfirmed:
                                confirmed = False  # paid all the same: it waits in the redelivery queue
                            _logger.info("cancelled call to %s settled for %d µc (%d of its tokens)", provider,
                                         event.receipt.cost, event.receipt.tokens_out)
                            return CancelledCall(provider, model, event.text, event.receipt, "settled", confirmed)
                        if isinstance(event, CallFailed):
                            return CancelledCall(provider, model, "", None,
                                                 f"the provider failed the call first ({event.error.reason})")
                        if isinstance(event, SessionClosed):
                            failure = ProviderFailed("the provider closed the session instead of billing the "
                                                     "cancelled call")
                            break
                    if failure is not None:
                        break
            except StreamClosed as exc:
                failure = ProviderFailed(f"the provider closed the session ({exc})")
            except SessionError as exc:  # it went away, went quiet or billed more than the prefix
                failure = exc
        if machine.receipts and machine.receipts[-1].call_seq == seq:
            # counter-signed, but its acknowledgement (or the redelivery) ran past the wait: paid all
            # the same, in doubt until acknowledged (the redelivery queue holds it), not "nothing paid"
            return CancelledCall(provider, model, machine.cancelled_text, machine.receipts[-1], "settled", False)
        if wait.cancelled_caught or failure is None:
            failure = ProviderFailed(f"no receipt of the cancelled call within {self._cancel_timeout:g}s")
        learn(self._trust, provider, failure)
        _logger.warning("cancelled call to %s not settled: %s", provider, failure)
        if machine.state is ConsumerState.CANCELLING:  # nothing more on this session: end it
            with trio.move_on_after(1.0):
                await self.close(wait_s=0.5)
        return CancelledCall(provider, model, "", None, f"nothing paid: {failure}")

    async def close(self, settle_escrow: bool = True, wait_s: float = 30.0) -> None:
        """End the session; with ``settle_escrow`` the channel is settled and refunded at once.
        Waits up to ``wait_s`` for the provider to settle and end the stream."""
        if self.machine.state.name in ("CLOSED", "ERROR"):
            return
        half = self.machine.escrow_close_half(secrets.token_bytes(16), self.now()) if settle_escrow else None
        self.machine.close(self.now(), escrow_close=half)
        await self._send_and_drain(wait_s)

    async def withdraw(self, wait_s: float = 5.0) -> None:
        """After a Reject: offer the provider this consumer's half of a close of the unused channel."""
        try:
            self.machine.withdraw(secrets.token_bytes(16), self.now())
        except protocol.ProtocolError:
            return
        await self._send_and_drain(wait_s)

    async def _send_and_drain(self, wait_s: float) -> None:
        try:
            await self._framed.send_all(self.machine.outgoing())
            with trio.move_on_after(wait_s):  # the provider settles, then ends the stream
                while True:
                    await self._framed.receive(timeout_s=wait_s)
        except (StreamClosed, protocol.ProtocolError):
            pass


@asynccontextmanager
async def open_session(
    host: IHost,
    identity: Identity,
    *,
    provider: str,
    addrs: tuple[str, ...],
    model: str,
    price: Price,
    listing_seq: int,
    channel: ChannelGrant,
    spend_limit: int,
    max_context: int,
    receipts: ReceiptStore | None = None,
    clock: WallClock = SYSTEM_WALL_CLOCK,
    tier: str = "",
    batch_calls: int = 0,
    commitment: bytes = protocol.ZERO_HASH,
    connect_timeout_s: float = 5.0,
    open_timeout_s: float = 15.0,
    idle_timeout_s: float = 60.0,
    call_timeout_s: float = 600.0,
    trust: TrustBook | None = None,
    withdraw_on_reject: bool = False,
    delivery: ReceiptDelivery | None = None,
    ack_timeout_s: float = 15.0,
    cancel_timeout_s: float = 5.0,
    on_settled: Callable[[CallResult], None] | None = None,
) -> AsyncIterator[ConsumerSessionHandle]:
    """Open a session with ``provider``; it is closed (and the channel settled) when the block ends.

    Dials ``provider`` (``reach``), opens a stream, then runs ``open_session_on``.

    Raises:
        SessionRejected: the provider said no (reason code). ProviderFailed: unreachable.
    """
    await reach(host, provider, addrs, timeout_s=connect_timeout_s, trust=trust)
    try:
        with trio.fail_after(connect_timeout_s):
            stream = await host.new_stream(ID.from_base58(provider), [SESSION_PROTOCOL])
    except Exception as exc:  # libp2p's stream errors, and the timeout
        failed = ProviderFailed(f"cannot open a session with provider {provider}: {exc or type(exc).__name__}")
        learn(trust, provider, failed)
        raise failed from exc
    async with open_session_on(stream, identity, provider=provider, model=model, price=price,
                               listing_seq=listing_seq, channel=channel, spend_limit=spend_limit,
                               max_context=max_context, receipts=receipts, clock=clock, tier=tier,
                               batch_calls=batch_calls, commitment=commitment, open_timeout_s=open_timeout_s,
                               idle_timeout_s=idle_timeout_s, call_timeout_s=call_timeout_s, trust=trust,
                               withdraw_on_reject=withdraw_on_reject, delivery=delivery,
                               ack_timeout_s=ack_timeout_s, cancel_timeout_s=cancel_timeout_s,
                               on_settled=on_settled) as handle:
        yield handle


@asynccontextmanager
async def open_session_on(
    stream: Any,
    identity: Identity,
    *,
    provider: str,
    model: str,
    price: Price,
    listing_seq: int,
    channel: ChannelGrant,
    spend_limit: int,
    max_context: int,
    receipts: ReceiptStore | None = None,
    clock: WallClock = SYSTEM_WALL_CLOCK,
    tier: str = "",
    batch_calls: int = 0,
    commitment: bytes = protocol.ZERO_HASH,
    open_timeout_s: float = 15.0,
    idle_timeout_s: float = 60.0,
    call_timeout_s: float = 600.0,
    trust: TrustBook | None = None,
    withdraw_on_reject: bool = False,
    delivery: ReceiptDelivery | None = None,
    ack_timeout_s: float = 15.0,
    cancel_timeout_s: float = 5.0,
    on_settled: Callable[[CallResult], None] | None = None,
) -> AsyncIterator[ConsumerSessionHandle]:
    """``open_session`` on a stream already open to ``provider`` (anything with libp2p's
    ``read``/``write``/``close``/``reset``); the stream is closed when the block ends.

    Args:
        price, max_context: the terms of the listed offer the session answers. commitment: the
            ``commitment_id`` of the model it names (the Accept must sign the same).
        on_settled: given each settled call's result, at once (it must not block: a spot check queues it).
        withdraw_on_reject: after a Reject, offer the provider a close of the channel (when the
            channel was opened for this session only): the refusal then locks nothing.
        delivery: where counter-signed receipts wait for the provider's acknowledgement (default:
            the queue attached to ``receipts``, ``_delivery.attach``). ack_timeout_s: how long a
            call waits for that acknowledgement before redelivering at once. cancel_timeout_s: how
            long a cancelled call waits (shielded) for the receipt of its prefix.

    Raises:
        SessionRejected: the provider said no (reason code). ProviderFailed: it went away or
        stayed silent (``open_timeout_s`` for its Accept, ``idle_timeout_s`` between the messages
        of a call). ProviderMisbehaved: it broke the protocol.

    Cancellation: the block's end — however it ends — settles the channel (shielded, briefly).
    """
    framed = FramedStream(stream)
    machine = ConsumerSession(identity, session_id=secrets.token_bytes(16), provider=provider, model=model,
                              listing_seq=listing_seq, price=price, channel=channel, spend_limit=spend_limit,
                              max_context=max_context, tier=tier, batch_calls=batch_calls, commitment=commitment)
    delivery = delivery if delivery is not None else delivery_for(receipts)
    handle = ConsumerSessionHandle(machine, framed, receipts, clock, idle_timeout_s, trust, call_timeout_s,
                                   delivery, ack_timeout_s, cancel_timeout_s, on_settled)
    if delivery is not None:
        delivery.wake(provider)  # we reach it again: what it has not acknowledged goes now
    try:
        try:
            machine.open(handle.now())
            try:
                await framed.send_all(machine.outgoing())
            except StreamClosed as exc:
                raise ProviderFailed(f"the provider closed the session ({exc})") from exc
            for event in await handle._next(open_timeout_s):
                if isinstance(event, Rejected):
                    if withdraw_on_reject:
                        await handle.withdraw()
                    raise SessionRejected(event.reject.reason, event.reject.detail, event.reject.retry_after_s)
                assert isinstance(event, Accepted)
        except SessionError as exc:  # the open failed: what it teaches about the provider is recorded here
            learn(trust, provider, exc)
            raise
        ok = False
        try:
            yield handle
            ok = True
        finally:
            with trio.CancelScope(shield=True):  # a failed or cancelled block still settles what it can, briefly
                await handle.close(wait_s=30.0 if ok else 5.0)
    finally:
        await framed.close()
