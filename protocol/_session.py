"""Sans-IO session state machines for the consumer and the provider side.

Rules this module owns (DESIGN.md, "Sessions"):
- open -> accept | reject -> (request -> chunks -> provider-signed receipt -> counter-signature)* -> close.
- Prices are pinned by the provider's signed Accept and never change within a session.
- Every receipt continues a hash chain (``prev_hash`` = hash of the previous receipt) and a
  cumulative cost that never exceeds the session's spend cap (min of spend limit and channel cap).
- The provider starts call n+1 only after call n is counter-signed, so each side risks one call.
- A refused or failed call (``CallError``) produces no receipt and costs nothing.
- Any error raised by a machine moves it to its ERROR state; it accepts nothing afterwards.
The machines never read the clock (``now`` is a parameter) and never do I/O: messages to send
queue up and ``outgoing()`` drains them; ``node/`` moves them over a stream.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from typing import Any, Callable, TypeVar

from ._errors import (
    Expired,
    IllegalTransition,
    InvalidMessage,
    ProtocolError,
    ReceiptChainBroken,
    ReceiptHashMismatch,
    ReceiptOverCap,
    ReceiptPriceMismatch,
    ReceiptReplay,
    SpendLimitReached,
    TermsMismatch,
    UnexpectedMessage,
)
from ._identity import peer_id_from_public_key, public_key_from_peer_id
from ._messages import (
    ZERO_HASH,
    Accept,
    CallError,
    CallQueued,
    ChannelGrant,
    ChatMessage,
    Chunk,
    Close,
    CounterSign,
    EscrowClose,
    Open,
    Receipt,
    Reject,
    Request,
)
from ._pricing import Price, call_cost, discounted, max_output_tokens_within
from ._signing import Signer, body_hash, sign, verify

__all__ = [
    "ConsumerState",
    "ProviderState",
    "ConsumerSession",
    "ProviderSession",
    "Accepted",
    "Rejected",
    "ChunkReceived",
    "Queued",
    "CallFailed",
    "ReceiptSettled",
    "SessionClosed",
    "OpenReceived",
    "CallRequested",
    "Countersigned",
    "request_hash",
    "output_hash",
    "receipt_hash",
    "verify_channel",
]

F = TypeVar("F", bound=Callable[..., Any])


def request_hash(request: Request) -> bytes:
    """sha256 of the canonical request: the receipt's ``input_hash``."""
    return body_hash(request)


def output_hash(text: str) -> bytes:
    """sha256 of the completion's UTF-8 text: the receipt's ``output_hash``."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def receipt_hash(receipt: Receipt) -> bytes:
    """The receipt's id and chain link: the hash of its body without signatures."""
    return body_hash(receipt)


def verify_channel(channel: ChannelGrant) -> None:
    """Check the agent's signature on a channel grant.

    Raises:
        BadSignature: the channel was not signed by the agent it names.
    """
    verify(channel, "sig", public_key_from_peer_id(channel.agent))


# ---- events ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Accepted:
    accept: Accept


@dataclasses.dataclass(frozen=True)
class Rejected:
    reject: Reject


@dataclasses.dataclass(frozen=True)
class ChunkReceived:
    chunk: Chunk


@dataclasses.dataclass(frozen=True)
class Queued:
    """The provider queued the call; ``queued.position`` 1 is next."""

    queued: CallQueued


@dataclasses.dataclass(frozen=True)
class CallFailed:
    error: CallError


@dataclasses.dataclass(frozen=True)
class ReceiptSettled:
    """The consumer checked and counter-signed ``receipt`` (now doubly signed)."""

    receipt: Receipt
    text: str


@dataclasses.dataclass(frozen=True)
class SessionClosed:
    close: Close


@dataclasses.dataclass(frozen=True)
class OpenReceived:
    open: Open


@dataclasses.dataclass(frozen=True)
class CallRequested:
    request: Request


@dataclasses.dataclass(frozen=True)
class Countersigned:
    """The provider holds the doubly-signed ``receipt``: a voucher the escrow pays."""

    receipt: Receipt


# ---- shared machinery ------------------------------------------------------------------------


def _guarded(method: F) -> F:
    """Run a machine method; any protocol error moves the machine to ERROR and propagates."""

    def wrapper(self: "_Machine", *args: Any, **kwargs: Any) -> Any:
        if self.state is self._ERROR:
            raise IllegalTransition(f"session is in its error state after: {self.error}")
        try:
            return method(self, *args, **kwargs)
        except ProtocolError as exc:
            self.state = self._ERROR
            self.error = exc
            raise

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper  # type: ignore[return-value]


class _Machine:
    _ERROR: Any
    state: Any

    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        self.me = peer_id_from_public_key(signer.public_key)
        self.error: ProtocolError | None = None
        self._outbox: list[Any] = []
        self.receipts: list[Receipt] = []  # doubly-signed, in chain order
        self.cumulative = 0
        self.last_hash = ZERO_HASH
        self.next_seq = 0

    def outgoing(self) -> list[Any]:
        """Drain the messages this machine wants sent, in order."""
        out, self._outbox = self._outbox, []
        return out

    def _expect(self, *states: Any) -> None:
        if self.state not in states:
            raise IllegalTransition(f"not allowed in state {self.state.name}")

    def _unexpected(self, msg: Any) -> UnexpectedMessage:
        return UnexpectedMessage(f"{type(msg).KIND} not expected in state {self.state.name}")

    def _check_session(self, msg: Any, session_id: bytes) -> None:
        if msg.session_id != session_id:
            raise UnexpectedMessage(f"{type(msg).KIND} for another session")

    def _settle(self, receipt: Receipt) -> None:
        self.receipts.append(receipt)
        self.cumulative = receipt.cumulative
        self.last_hash = receipt_hash(receipt)
        self.next_seq = receipt.call_seq + 1


# ---- consumer ---------------------------------------------------------------------------------


class ConsumerState(enum.Enum):
    IDLE = "idle"
    OPENING = "opening"
    READY = "ready"
    IN_CALL = "in_call"
    CLOSED = "closed"
    ERROR = "error"


class ConsumerSession(_Machine):
    """The consumer side: opens, requests, checks every receipt, counter-signs, closes."""

    _ERROR = ConsumerState.ERROR

    def __init__(
        self,
        signer: Signer,
        *,
        session_id: bytes,
        provider: str,
        model: str,
        listing_seq: int,
        price: Price,
        channel: ChannelGrant,
        spend_limit: int,
        tier: str = "",
        batch_calls: int = 0,
    ) -> None:
        super().__init__(signer)
        self.tier, self.batch_calls = tier, batch_calls
        if channel.consumer != self.me or channel.provider != provider:
            raise InvalidMessage("the channel is not from this consumer to this provider")
        self.state = ConsumerState.IDLE
        self.session_id = session_id
        self.provider = provider
        self._provider_key = public_key_from_peer_id(provider)
        self.model = model
        self.listing_seq = listing_seq
        self.price = price
        self.channel = channel
        self.spend_limit = spend_limit
        self.cap = min(spend_limit, channel.cap)
        self.accept: Accept | None = None
        self._request: Request | None = None
        self._text: list[str] = []
        self._tokens_out = 0
        self._next_chunk = 0

    @property
    def remaining(self) -> int:
        """µc still spendable in this session."""
        return self.cap - self.cumulative

    def escrow_close_half(self, request_id: bytes, now: int) -> EscrowClose:
        """This consumer's signature on a cooperative close of the channel, settling the last
        doubly-signed receipt (if any): the provider adds its half and submits it."""
        final = self.receipts[-1] if self.receipts else None
        msg = EscrowClose(request_id=request_id, channel_id=self.channel.channel_id, receipt=final, issued_at=now)
        return sign(msg, "consumer_sig", self._signer)

    @_guarded
    def open(self, now: int) -> Open:
        """Queue the signed ``Open``.

        Raises:
            IllegalTransition: already opened.
            Expired: the channel has expired.
        """
        self._expect(ConsumerState.IDLE)
        if now >= self.channel.expires_at:
            raise Expired("the escrow channel has expired")
        msg = Open(
            session_id=self.session_id,
            consumer=self.me,
            provider=self.provider,
            model=self.model,
            listing_seq=self.listing_seq,
            price=self.price,
            channel=self.channel,
            spend_limit=self.spend_limit,
            issued_at=now,
            tier=self.tier,
            batch_calls=self.batch_calls,
        )
        msg = sign(msg, "sig", self._signer)
        self._outbox.append(msg)
        self.state = ConsumerState.OPENING
        return msg

    @_guarded
    def request(
        self,
        messages: tuple[ChatMessage, ...],
        max_tokens: int,
        *,
        temperature_milli: int = 1000,
        top_p_milli: int = 1000,
        stop: tuple[str, ...] = (),
        stream: bool = True,
    ) -> Request:
        """Queue the next call's ``Request``.

        Raises:
            IllegalTransition: not ready (not accepted yet, a call in flight, or closed).
            SpendLimitReached: not even a one-token prompt fits under the cap.
        """
        self._expect(ConsumerState.READY)
        if call_cost(self.price, 1, 0) > self.remaining:
            raise SpendLimitReached(f"{self.remaining} µc left in this session")
        msg = Request(
            session_id=self.session_id,
            call_seq=self.next_seq,
            messages=tuple(messages),
            max_tokens=max_tokens,
            temperature_milli=temperature_milli,
            top_p_milli=top_p_milli,
            stop=tuple(stop),
            stream=stream,
        )
        self._outbox.append(msg)
        self._request = msg
        self._text, self._tokens_out, self._next_chunk = [], 0, 0
        self.state = ConsumerState.IN_CALL
        return msg

    @_guarded
    def close(self, now: int, reason: str = "done", escrow_close: EscrowClose | None = None) -> Close:
        """Queue a signed ``Close``; an unfinished call is abandoned and never paid.

        Args:
            escrow_close: optionally, this consumer's signed half of a cooperative channel close,
                for the provider to complete and submit (see ``escrow_close_half``).
        """
        self._expect(ConsumerState.IDLE, ConsumerState.OPENING, ConsumerState.READY, ConsumerState.IN_CALL)
        msg = sign(
            Close(
                session_id=self.session_id,
                by=self.me,
                reason=reason,
                last_receipt_hash=self.last_hash,
                cumulative=self.cumulative,
                issued_at=now,
                escrow_close=escrow_close,
            ),
            "sig",
            self._signer,
        )
        self._outbox.append(msg)
        self.state = ConsumerState.CLOSED
        return msg

    @_guarded
    def receive(self, msg: Any, now: int) -> list[Any]:
        """Take one message from the provider; return the events it causes.

        Raises:
            RemoteProtocolError (a specific subclass): the provider broke the protocol; the
                machine is now in ERROR and nothing it sent is counter-signed.
        """
        if self.state in (ConsumerState.CLOSED, ConsumerState.IDLE):
            raise self._unexpected(msg)
        if isinstance(msg, Close):
            return [self._on_close(msg)]
        if isinstance(msg, Accept) and self.state is ConsumerState.OPENING:
            return [self._on_accept(msg)]
        if isinstance(msg, Reject) and self.state is ConsumerState.OPENING:
            self._check_session(msg, self.session_id)
            self.state = ConsumerState.CLOSED
            return [Rejected(msg)]
        if isinstance(msg, Receipt):
            return [self._on_receipt(msg)]
        if isinstance(msg, Chunk) and self.state is ConsumerState.IN_CALL:
            return [self._on_chunk(msg)]
        if isinstance(msg, CallQueued) and self.state is ConsumerState.IN_CALL:
            self._check_session(msg, self.session_id)
            if msg.call_seq != self.next_seq or self._next_chunk:
                raise UnexpectedMessage("queue position for another call, or after the answer began")
            return [Queued(msg)]
        if isinstance(msg, CallError) and self.state is ConsumerState.IN_CALL:
            self._check_session(msg, self.session_id)
            if msg.call_seq != self.next_seq:
                raise UnexpectedMessage(f"call_error for call {msg.call_seq}, expected {self.next_seq}")
            self._request = None
            self.state = ConsumerState.READY
            return [CallFailed(msg)]
        raise self._unexpected(msg)

    def _on_accept(self, msg: Accept) -> Accepted:
        self._check_session(msg, self.session_id)
        if msg.provider != self.provider or msg.model != self.model:
            raise TermsMismatch("accept names another provider or model")
        verify(msg, "sig", self._provider_key)
        if msg.price != self.price:
            raise TermsMismatch("accepted prices differ from the prices offered")
        if msg.spend_cap != self.cap:
            raise TermsMismatch(f"accepted spend cap {msg.spend_cap}, expected {self.cap}")
        self.accept = msg
        self.state = ConsumerState.READY
        return Accepted(msg)

    def _on_chunk(self, msg: Chunk) -> ChunkReceived:
        assert self._request is not None
        self._check_session(msg, self.session_id)
        if msg.call_seq != self.next_seq or msg.index != self._next_chunk:
            raise UnexpectedMessage(f"chunk {msg.call_seq}/{msg.index} out of order")
        if self._tokens_out + msg.tokens > self._request.max_tokens:
            raise UnexpectedMessage("the provider streamed more tokens than max_tokens")
        self._next_chunk += 1
        self._tokens_out += msg.tokens
        self._text.append(msg.text)
        return ChunkReceived(msg)

    def _on_receipt(self, r: Receipt) -> ReceiptSettled:
        self._check_session(r, self.session_id)
        if r.call_seq < self.next_seq:
            raise ReceiptReplay(f"receipt for call {r.call_seq} was already settled")
        if self.state is not ConsumerState.IN_CALL or r.call_seq != self.next_seq:
            raise UnexpectedMessage(f"receipt for call {r.call_seq} with no such call in flight")
        assert self._request is not None and self.accept is not None
        verify(r, "provider_sig", self._provider_key)
        ch = self.channel
        if (r.model, r.provider, r.consumer, r.agent, r.channel_id) != (
            self.model,
            self.provider,
            self.me,
            ch.agent,
            ch.channel_id,
        ):
            raise TermsMismatch("receipt names another model, party or channel")
        text = "".join(self._text)
        if r.input_hash != request_hash(self._request):
            raise ReceiptHashMismatch("input hash is not the hash of the request sent")
        if r.output_hash != output_hash(text):
            raise ReceiptHashMismatch("output hash is not the hash of the text received")
        if r.tokens_out != self._tokens_out:
            raise ReceiptPriceMismatch(f"receipt bills {r.tokens_out} output tokens, {self._tokens_out} streamed")
        if r.tokens_in > self.accept.max_context:
            raise ReceiptPriceMismatch(f"receipt bills {r.tokens_in} input tokens, over the context")
        full = call_cost(self.accept.price, r.tokens_in, r.tokens_out)
        if r.price != self.accept.price or r.cost != discounted(full, r.discount_permille):
            raise ReceiptPriceMismatch("cost is not the pinned price of the billed tokens (less its discount)")
        if r.prev_hash != self.last_hash or r.cumulative != self.cumulative + r.cost:
            raise ReceiptChainBroken("receipt does not continue the chain")
        if r.cumulative > self.cap:
            raise ReceiptOverCap(f"cumulative {r.cumulative} over the cap {self.cap}")
        signed = sign(r, "consumer_sig", self._signer)
        self._outbox.append(
            CounterSign(
                session_id=r.session_id,
                call_seq=r.call_seq,
                receipt_hash=receipt_hash(r),
                consumer_sig=signed.consumer_sig,
            )
        )
        self._settle(signed)
        self._request = None
        self.state = ConsumerState.READY
        return ReceiptSettled(signed, text)

    def _on_close(self, msg: Close) -> SessionClosed:
        self._check_session(msg, self.session_id)
        if msg.by != self.provider:
            raise UnexpectedMessage("close signed by someone other than the provider")
        verify(msg, "sig", self._provider_key)
        self._request = None
        self.state = ConsumerState.CLOSED
        return SessionClosed(msg)


# ---- provider ---------------------------------------------------------------------------------


class ProviderState(enum.Enum):
    AWAITING_OPEN = "awaiting_open"
    DECIDING = "deciding"
    READY = "ready"
    CALL_REQUESTED = "call_requested"
    IN_CALL = "in_call"
    AWAITING_COUNTERSIGN = "awaiting_countersign"
    CLOSED = "closed"
    ERROR = "error"


class ProviderSession(_Machine):
    """The provider side: decides on an open, meters calls, signs receipts, waits for counter-signatures."""

    _ERROR = ProviderState.ERROR

    def __init__(self, signer: Signer) -> None:
        super().__init__(signer)
        self.state = ProviderState.AWAITING_OPEN
        self.open_msg: Open | None = None
        self.accept: Accept | None = None
        self._consumer_key = b""
        self._request: Request | None = None
        self._limit = 0
        self._tokens_in = 0
        self._tokens_out = 0
        self._text: list[str] = []
        self._pending: Receipt | None = None

    @property
    def session_id(self) -> bytes:
        if self.open_msg is None:
            raise IllegalTransition("no session opened yet")
        return self.open_msg.session_id

    @property
    def cap(self) -> int:
        assert self.accept is not None
        return self.accept.spend_cap

    @_guarded
    def receive(self, msg: Any, now: int) -> list[Any]:
        """Take one message from the consumer; return the events it causes.

        Raises:
            RemoteProtocolError (a specific subclass): the consumer broke the protocol.
        """
        if isinstance(msg, Open) and self.state is ProviderState.AWAITING_OPEN:
            return [self._on_open(msg, now)]
        if self.state in (ProviderState.AWAITING_OPEN, ProviderState.CLOSED):
            raise self._unexpected(msg)
        if isinstance(msg, Close):
            self._check_session(msg, self.session_id)
            if msg.by != self.open_msg.consumer:  # type: ignore[union-attr]
                raise UnexpectedMessage("close signed by someone other than the consumer")
            verify(msg, "sig", self._consumer_key)
            self.state = ProviderState.CLOSED
            return [SessionClosed(msg)]
        if isinstance(msg, Request):
            return [self._on_request(msg)]
        if isinstance(msg, CounterSign):
            return [self._on_countersign(msg)]
        raise self._unexpected(msg)

    def _on_open(self, msg: Open, now: int) -> OpenReceived:
        if msg.provider != self.me:
            raise TermsMismatch("open addressed to another provider")
        key = public_key_from_peer_id(msg.consumer)
        verify(msg, "sig", key)
        ch = msg.channel
        if ch.consumer != msg.consumer or ch.provider != self.me:
            raise TermsMismatch("the channel is not from this consumer to this provider")
        verify_channel(ch)
        if now >= ch.expires_at:
            raise Expired("the escrow channel has expired")
        self.open_msg, self._consumer_key = msg, key
        self.state = ProviderState.DECIDING
        return OpenReceived(msg)

    @_guarded
    def accept_open(self, price: Price, max_context: int, now: int) -> Accept:
        """Pin ``price`` for the session and queue the signed ``Accept``.

        Raises:
            IllegalTransition: no open to decide on, or ``price`` is not the price the
                consumer offered (reject with ``price_changed`` instead).
        """
        self._expect(ProviderState.DECIDING)
        assert self.open_msg is not None
        if price != self.open_msg.price:
            raise IllegalTransition("the consumer did not offer this price: reject with price_changed")
        msg = sign(
            Accept(
                session_id=self.open_msg.session_id,
                provider=self.me,
                model=self.open_msg.model,
                price=price,
                max_context=max_context,
                spend_cap=min(self.open_msg.spend_limit, self.open_msg.channel.cap),
                accepted_at=now,
            ),
            "sig",
            self._signer,
        )
        self.accept = msg
        self._outbox.append(msg)
        self.state = ProviderState.READY
        return msg

    @_guarded
    def reject_open(self, reason: str, detail: str = "", retry_after_s: int = 0) -> Reject:
        """Queue a ``Reject`` with a reason code; the session ends."""
        self._expect(ProviderState.DECIDING)
        msg = Reject(session_id=self.session_id, reason=reason, detail=detail, retry_after_s=retry_after_s)
        self._outbox.append(msg)
        self.state = ProviderState.CLOSED
        return msg

    def _on_request(self, msg: Request) -> CallRequested:
        self._check_session(msg, self.session_id)
        if self.state is ProviderState.AWAITING_COUNTERSIGN:
            raise UnexpectedMessage("request for the next call before this one was counter-signed")
        if self.state is not ProviderState.READY:
            raise self._unexpected(msg)
        if msg.call_seq != self.next_seq:
            raise UnexpectedMessage(f"request for call {msg.call_seq}, expected {self.next_seq}")
        self._request = msg
        self.state = ProviderState.CALL_REQUESTED
        return CallRequested(msg)

    @_guarded
    def start_call(self, tokens_in: int, now: int) -> int | None:
        """Admit the requested call, whose prompt is ``tokens_in`` tokens.

        Returns:
            The most completion tokens the call may produce (``max_tokens`` clamped to what
            the remaining budget pays for), or ``None`` when the call is refused: a
            ``CallError`` (expired, context_too_long or over_budget) is then queued and the
            session is ready for another request. Nothing is charged for a refused call.
        """
        self._expect(ProviderState.CALL_REQUESTED)
        assert self._request is not None and self.accept is not None and self.open_msg is not None
        if now >= self.open_msg.channel.expires_at:
            return self._refuse("expired", "the escrow channel has expired")
        if tokens_in > self.accept.max_context:
            return self._refuse("context_too_long", f"{tokens_in} prompt tokens, limit {self.accept.max_context}")
        ceiling = min(self._request.max_tokens, max(0, self.accept.max_context - tokens_in))
        limit = max_output_tokens_within(self.accept.price, tokens_in, self.cap - self.cumulative, ceiling)
        if limit < 0:
            return self._refuse("over_budget", f"{self.cap - self.cumulative} µc left in this session")
        self._limit, self._tokens_in, self._tokens_out, self._text = limit, tokens_in, 0, []
        self.state = ProviderState.IN_CALL
        return limit

    def _refuse(self, reason: str, detail: str) -> None:
        self._outbox.append(CallError(session_id=self.session_id, call_seq=self.next_seq, reason=reason, detail=detail))
        self._request = None
        self.state = ProviderState.READY
        return None

    @_guarded
    def report_queue(self, position: int) -> CallQueued:
        """Tell the consumer where its admitted call waits (before any chunk)."""
        self._expect(ProviderState.IN_CALL)
        if self._text:
            raise IllegalTransition("the answer has begun: no queue position any more")
        msg = CallQueued(session_id=self.session_id, call_seq=self.next_seq, position=position)
        self._outbox.append(msg)
        return msg

    @_guarded
    def fail_call(self, reason: str, detail: str = "") -> CallError:
        """Give up on the requested or running call: queue a ``CallError``; nothing is charged."""
        self._expect(ProviderState.CALL_REQUESTED, ProviderState.IN_CALL)
        self._refuse(reason, detail)
        return self._outbox[-1]

    @_guarded
    def chunk(self, text: str, tokens: int) -> Chunk:
        """Queue a streamed piece of the completion.

        Raises:
            SpendLimitReached: more tokens than ``start_call`` admitted.
        """
        self._expect(ProviderState.IN_CALL)
        if self._tokens_out + tokens > self._limit:
            raise SpendLimitReached(f"completion would pass its {self._limit}-token limit")
        msg = Chunk(
            session_id=self.session_id, call_seq=self.next_seq, index=len(self._text), text=text, tokens=tokens
        )
        self._text.append(text)
        self._tokens_out += tokens
        self._outbox.append(msg)
        return msg

    @_guarded
    def finish_call(self, finish_reason: str, now: int, tokens_in: int | None = None,
                    discount_permille: int = 0) -> Receipt:
        """Queue the provider-signed receipt of the running call.

        Args:
            tokens_in: the prompt's actual token count when the admitted one was an upper bound
                (an upstream server's usage); never more than what ``start_call`` admitted.
        """
        self._expect(ProviderState.IN_CALL)
        assert self._request is not None and self.accept is not None and self.open_msg is not None
        if tokens_in is not None:
            if tokens_in > self._tokens_in:
                raise SpendLimitReached(f"billing {tokens_in} prompt tokens, {self._tokens_in} were admitted")
            self._tokens_in = tokens_in
        cost = discounted(call_cost(self.accept.price, self._tokens_in, self._tokens_out), discount_permille)
        receipt = Receipt(
            session_id=self.session_id,
            call_seq=self.next_seq,
            model=self.accept.model,
            provider=self.me,
            consumer=self.open_msg.consumer,
            agent=self.open_msg.channel.agent,
            channel_id=self.open_msg.channel.channel_id,
            input_hash=request_hash(self._request),
            output_hash=output_hash("".join(self._text)),
            tokens_in=self._tokens_in,
            tokens_out=self._tokens_out,
            finish_reason=finish_reason,
            price=self.accept.price,
            cost=cost,
            cumulative=self.cumulative + cost,
            prev_hash=self.last_hash,
            issued_at=now,
            discount_permille=discount_permille,
        )
        if receipt.cumulative > self.cap:  # start_call's clamp makes this unreachable
            raise SpendLimitReached("receipt would pass the spend cap")
        receipt = sign(receipt, "provider_sig", self._signer)
        self._pending = receipt
        self._outbox.append(receipt)
        self._request = None
        self.state = ProviderState.AWAITING_COUNTERSIGN
        return receipt

    def _on_countersign(self, msg: CounterSign) -> Countersigned:
        self._check_session(msg, self.session_id)
        if msg.call_seq < self.next_seq:
            raise ReceiptReplay(f"counter-signature for call {msg.call_seq} was already received")
        if self.state is not ProviderState.AWAITING_COUNTERSIGN or self._pending is None:
            raise self._unexpected(msg)
        pending = self._pending
        if msg.call_seq != pending.call_seq or msg.receipt_hash != receipt_hash(pending):
            raise ReceiptHashMismatch("counter-signature names another receipt")
        signed = dataclasses.replace(pending, consumer_sig=msg.consumer_sig)
        verify(signed, "consumer_sig", self._consumer_key)
        self._pending = None
        self._settle(signed)
        self.state = ProviderState.READY
        return Countersigned(signed)

    @_guarded
    def close(self, now: int, reason: str = "done") -> Close:
        """Queue a signed ``Close``; an un-counter-signed receipt stays unpaid."""
        self._expect(
            ProviderState.READY,
            ProviderState.CALL_REQUESTED,
            ProviderState.IN_CALL,
            ProviderState.AWAITING_COUNTERSIGN,
        )
        msg = sign(
            Close(
                session_id=self.session_id,
                by=self.me,
                reason=reason,
                last_receipt_hash=self.last_hash,
                cumulative=self.cumulative,
                issued_at=now,
            ),
            "sig",
            self._signer,
        )
        self._outbox.append(msg)
        self.state = ProviderState.CLOSED
        return msg
