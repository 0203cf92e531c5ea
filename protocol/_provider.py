"""The provider side of a session: decides on an open, meters calls, signs receipts, waits for
counter-signatures and acknowledges each one (``CounterSignAck``: the node sends it only after
it has stored the doubly-signed receipt, as the outbox drains after the ``Countersigned`` event
is handled).

A call the consumer cancels (``Cancel``) stops at the chunk count it names: the machine takes
no more chunks (CANCELLING) and ``finish_call`` bills exactly that prefix; if the receipt of the
whole call had already gone out, the prefix's receipt is queued in its place (the consumer signs
only that one).

A ``RequestV2`` call streams ``ChunkV2``s (``chunk(..., tool_calls=, logprobs=)``), a v1 call
v1 ``Chunk``s and no extras; tool-call deltas only as ``tool_call_problem`` allows, metered as
text (``metered_bytes``), and logprobs no more than the claimed tokens plus ``TOKEN_SLACK``: the
machine refuses to produce what the consumer would refuse. The receipt's output hash is ``call_output_hash`` of the text and accumulated calls (of the prefix
when cancelled). An ``EmbedRequest`` call sends one ``embed_result`` of finite vectors and bills its input
only (``tokens_out`` 0, ``embedding_hash``); a ``Cancel`` of it is a protocol error. A request that
breaks its kind's shape rules (``request_problem``) is refused with a ``CallError``
``bad_request`` before any event. Every call bills at most ``request_token_bound`` input tokens
(of the accepted context)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ._agent_messages import (
    ChunkV2,
    EmbedRequest,
    EmbedResult,
    RequestV2,
    TokenLogprob,
    ToolCallDelta,
    accumulate_tool_calls,
    call_output_hash,
    embedding_hash,
    finite_vectors,
    metered_bytes,
    request_problem,
    request_token_bound,
    tool_call_problem,
)
from ._commitments import AcceptV2, committed_input_hash
from ._errors import (
    BadSignature,
    Expired,
    IllegalTransition,
    InvalidMessage,
    ReceiptHashMismatch,
    ReceiptReplay,
    RemoteProtocolError,
    SpendLimitReached,
    TermsMismatch,
    UnexpectedMessage,
)
from ._identity import public_key_from_peer_id
from ._messages import (
    CANCELLED_FINISH,
    ZERO_HASH,
    Accept,
    CallError,
    CallQueued,
    Cancel,
    Chunk,
    Close,
    CounterSign,
    CounterSignAck,
    Open,
    Receipt,
    Reject,
    Request,
)
from ._metering import TOKEN_SLACK, billable_output_tokens, cancelled_output_tokens, completion_byte_limit
from ._pricing import Price, call_cost, discounted, max_output_tokens_within
from ._session import (
    CallCancelled,
    CallRequested,
    Countersigned,
    OpenReceived,
    SessionClosed,
    _guarded,
    _Machine,
    acknowledge,
    receipt_hash,
    request_hash,
    verify_channel,
)
from ._signing import Signer, sign, verify

__all__ = ["ProviderState", "ProviderSession"]


# ---- provider ---------------------------------------------------------------------------------

_MAX_DETAIL = 512  # Reject.detail and CallError.detail are Str(512): at most 512 UTF-8 bytes


def _detail(text: str) -> str:
    """A refusal's detail cut to what the wire carries: 512 bytes, never half a character."""
    return text.encode("utf-8")[:_MAX_DETAIL].decode("utf-8", "ignore")


class ProviderState(enum.Enum):
    """Where a ``ProviderSession`` stands: AWAITING_OPEN, DECIDING (an Open to accept or reject),
    READY (awaiting a Request), CALL_REQUESTED (to admit or fail), IN_CALL (streaming chunks until
    the receipt), CANCELLING (the consumer cancelled the call: no more chunks, the receipt bills the
    prefix it received), AWAITING_COUNTERSIGN (the receipt is out; no next call until it comes back
    signed), CLOSED, or ERROR (a protocol error was raised; it takes nothing more)."""

    AWAITING_OPEN = "awaiting_open"
    DECIDING = "deciding"
    READY = "ready"
    CALL_REQUESTED = "call_requested"
    IN_CALL = "in_call"
    CANCELLING = "cancelling"
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
        self.commitment = ZERO_HASH  # the commitment id the Accept signed
        self._consumer_key = b""
        self._request: Request | RequestV2 | EmbedRequest | None = None
        self._embedding = False  # the current (or last billed) call is an embeddings call
        self._embedded: EmbedResult | None = None
        self._deltas: list[tuple[ToolCallDelta, ...]] = []  # each chunk's tool-call deltas and metered bytes
        self._sizes: list[int] = []
        self._named: set[int] = set()  # the tool-call indices begun (with a name)
        self._logprobs = 0
        self._limit = 0
        self._tokens_in = 0
        self._tokens_out = 0  # billed so far (what the chunks claim)
        self._generated = 0  # produced so far, billed or not
        self._text_bytes = 0
        self._text: list[str] = []  # each chunk's text, and the tokens it claimed
        self._claims: list[int] = []
        self._cut: int | None = None  # the chunks the consumer received, once it cancelled
        self._input_hash = b""
        self._pending: Receipt | None = None

    @property
    def session_id(self) -> bytes:
        if self.open_msg is None:
            raise IllegalTransition("no session opened yet")
        return self.open_msg.session_id

    @property
    def unpaid_work(self) -> bool:
        """True when the consumer holds a whole answer it has not paid for: its receipt still
        awaits the counter-signature."""
        return self._pending is not None

    @property
    def cancelled_after(self) -> int | None:
        """The chunks the consumer received before it cancelled the current call (None: not cancelled)."""
        return self._cut

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
            try:
                return [self._on_open(msg, now)]
            except RemoteProtocolError as exc:  # the consumer hears why before the session ends
                reason = "escrow_invalid" if isinstance(exc, (Expired, BadSignature)) else "bad_request"
                self._outbox.append(Reject(session_id=msg.session_id, reason=reason, detail=_detail(str(exc))))
                raise
        if self.state in (ProviderState.AWAITING_OPEN, ProviderState.CLOSED):
            raise self._unexpected(msg)
        if isinstance(msg, Close):
            self._check_session(msg, self.session_id)
            if msg.by != self.open_msg.consumer:  # type: ignore[union-attr]
                raise UnexpectedMessage("close signed by someone other than the consumer")
            verify(msg, "sig", self._consumer_key)
            self.state = ProviderState.CLOSED
            return [SessionClosed(msg)]
        if isinstance(msg, (Request, RequestV2, EmbedRequest)):
            return self._on_request(msg)
        if isinstance(msg, CounterSign):
            return [self._on_countersign(msg)]
        if isinstance(msg, Cancel):
            return self._on_cancel(msg, now)
        raise self._unexpected(msg)

    def _on_cancel(self, msg: Cancel, now: int) -> list[Any]:
        self._check_session(msg, self.session_id)
        if self._embedding and self.state in (ProviderState.IN_CALL, ProviderState.AWAITING_COUNTERSIGN):
            raise UnexpectedMessage("an embeddings call cannot be cancelled")
        if self.state is ProviderState.READY and msg.call_seq == self.next_seq:
            return []  # the call failed already: its CallError crossed the Cancel; nothing is owed
        racing = self.state is ProviderState.AWAITING_COUNTERSIGN and self._pending is not None \
            and msg.call_seq == self._pending.call_seq and self._cut is None  # one Cancel a call, never a second
        if not racing and (self.state is not ProviderState.IN_CALL or msg.call_seq != self.next_seq):
            raise self._unexpected(msg)
        if msg.chunks > len(self._text):
            raise UnexpectedMessage(f"cancel after {msg.chunks} chunks, {len(self._text)} were sent")
        self._cut = msg.chunks
        if not racing:
            self.state = ProviderState.CANCELLING
            return [CallCancelled(msg)]
        # the whole call's receipt went out before the Cancel came: the prefix's replaces it
        assert self._pending is not None
        prefix = self._bill(self._pending.tokens_in, now, self._pending.discount_permille)
        if (prefix.output_hash, prefix.tokens_out) != (self._pending.output_hash, self._pending.tokens_out):
            self._pending = prefix
            self._outbox.append(prefix)
        return [CallCancelled(msg)]

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
    def accept_open(self, price: Price, max_context: int, now: int, commitment: bytes = ZERO_HASH) -> Accept:
        """Pin ``price`` for the session and queue the signed ``Accept`` (``AcceptV2`` naming
        ``commitment``, the ``commitment_id`` of the model serving it, unless that is ``ZERO_HASH``).

        Raises:
            IllegalTransition: no open to decide on, or ``price`` is not the price the
                consumer offered (reject with ``price_changed`` instead).
        """
        self._expect(ProviderState.DECIDING)
        assert self.open_msg is not None
        if price != self.open_msg.price:
            raise IllegalTransition("the consumer did not offer this price: reject with price_changed")
        terms = dict(session_id=self.open_msg.session_id, provider=self.me, model=self.open_msg.model,
                     price=price, max_context=max_context,
                     spend_cap=min(self.open_msg.spend_limit, self.open_msg.channel.cap), accepted_at=now)
        accept = Accept(**terms) if commitment == ZERO_HASH else AcceptV2(**terms, commitment=commitment)
        msg = sign(accept, "sig", self._signer)
        self.commitment = commitment
        self.accept = msg
        self._outbox.append(msg)
        self.state = ProviderState.READY
        return msg

    @_guarded
    def reject_open(self, reason: str, detail: str = "", retry_after_s: int = 0) -> Reject:
        """Queue a ``Reject`` with a reason code; the session ends."""
        self._expect(ProviderState.DECIDING)
        msg = Reject(session_id=self.session_id, reason=reason, detail=_detail(detail), retry_after_s=retry_after_s)
        self._outbox.append(msg)
        self.state = ProviderState.CLOSED
        return msg

    def _on_request(self, msg: Request | RequestV2 | EmbedRequest) -> list[Any]:
        self._check_session(msg, self.session_id)
        if self.state is ProviderState.AWAITING_COUNTERSIGN:
            raise UnexpectedMessage("request for the next call before this one was counter-signed")
        if self.state is not ProviderState.READY:
            raise self._unexpected(msg)
        if msg.call_seq != self.next_seq:
            raise UnexpectedMessage(f"request for call {msg.call_seq}, expected {self.next_seq}")
        problem = request_problem(msg)
        if problem:  # refused before it starts: nothing to decide, nothing charged
            self._outbox.append(CallError(session_id=self.session_id, call_seq=self.next_seq, reason="bad_request",
                                          detail=_detail(problem)))
            return []
        self._request = msg
        self.state = ProviderState.CALL_REQUESTED
        return [CallRequested(msg)]

    @_guarded
    def start_call(self, tokens_in: int, now: int) -> int | None:
        """Admit the requested call, whose prompt is ``tokens_in`` tokens by the backend's count.

        The context is checked against that count (not for an embeddings call, whose inputs are
        each their own context); the call bills at most ``protocol.request_token_bound`` of the
        request (what the consumer will sign).

        Returns:
            The most completion tokens the call may produce (``max_tokens`` clamped to what
            the remaining budget pays for; 0 for an embeddings call), or ``None`` when the call is refused: a
            ``CallError`` (expired, context_too_long or over_budget) is then queued and the
            session is ready for another request. Nothing is charged for a refused call.
        """
        self._expect(ProviderState.CALL_REQUESTED)
        assert self._request is not None and self.accept is not None and self.open_msg is not None
        req = self._request
        embed = isinstance(req, EmbedRequest)
        if now >= self.open_msg.channel.expires_at:
            return self._refuse("expired", "the escrow channel has expired")
        if not embed and tokens_in > self.accept.max_context:
            return self._refuse("context_too_long", f"{tokens_in} prompt tokens, limit {self.accept.max_context}")
        ceiling = 0 if embed else min(req.max_tokens, max(0, self.accept.max_context - tokens_in))
        billed_in = min(tokens_in, request_token_bound(req, self.accept.max_context))
        limit = max_output_tokens_within(self.accept.price, billed_in, self.cap - self.cumulative, ceiling)
        if limit < 0:
            return self._refuse("over_budget", f"{self.cap - self.cumulative} µc left in this session")
        self._limit, self._tokens_in, self._text, self._claims, self._cut = limit, billed_in, [], [], None
        self._embedding, self._embedded, self._deltas, self._sizes, self._logprobs = embed, None, [], [], 0
        self._named = set()
        self._input_hash = committed_input_hash(request_hash(req), self.commitment)
        self._tokens_out = self._generated = self._text_bytes = 0
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
        if self._text or self._embedded is not None:
            raise IllegalTransition("the answer has begun: no queue position any more")
        msg = CallQueued(session_id=self.session_id, call_seq=self.next_seq, position=position)
        self._outbox.append(msg)
        return msg

    @_guarded
    def fail_call(self, reason: str, detail: str = "") -> CallError:
        """Give up on the requested, running or cancelled call: queue a ``CallError``; nothing is charged."""
        self._expect(ProviderState.CALL_REQUESTED, ProviderState.IN_CALL, ProviderState.CANCELLING)
        self._refuse(reason, _detail(detail))
        return self._outbox[-1]

    @_guarded
    def chunk(self, text: str, tokens: int, *, tool_calls: tuple[ToolCallDelta, ...] = (),
              logprobs: tuple[TokenLogprob, ...] = ()) -> Chunk | ChunkV2:
        """Queue a streamed piece of the completion: ``text``, its tool-call deltas and token
        logprobs, and the ``tokens`` generated for it. The chunk claims only the tokens the
        consumer will pay for (``billable_output_tokens`` of the text and deltas' bytes). A
        ``ChunkV2`` iff the call's request was a ``RequestV2``.

        Raises:
            SpendLimitReached: more tokens than ``start_call`` admitted, or more text (deltas
                included) than the admitted limit (or ``max_tokens``, the smaller) allows.
            IllegalTransition: no call running, the consumer cancelled it (CANCELLING), an
                embeddings call, extras on a v1 call, tool-call deltas ``tool_call_problem``
                refuses, logprobs the call did not ask for (or more alternatives than
                ``top_logprobs``, or in all more than ``max_tokens`` or the claimed tokens plus
                ``TOKEN_SLACK``).
        """
        self._expect(ProviderState.IN_CALL)
        req = self._request
        assert req is not None
        if isinstance(req, EmbedRequest):
            raise IllegalTransition("an embeddings call streams no chunks: send its embed_result")
        v2 = isinstance(req, RequestV2)
        if not v2 and (tool_calls or logprobs):
            raise IllegalTransition("tool calls and logprobs travel only on a call_request v2 call")
        if logprobs:
            assert isinstance(req, RequestV2)
            if not req.logprobs:
                raise IllegalTransition("logprobs on a call that did not ask for them")
            if any(len(lp.top) > req.top_logprobs for lp in logprobs):
                raise IllegalTransition(f"more than the {req.top_logprobs} top logprobs asked for")
        named = set(self._named)
        if tool_calls:
            assert isinstance(req, RequestV2)
            problem = tool_call_problem(req, named, tool_calls)
            if problem:
                raise IllegalTransition(problem)
        if self._generated + tokens > self._limit:
            raise SpendLimitReached(f"completion would pass its {self._limit}-token limit")
        size = metered_bytes(text, tool_calls)
        # the text's bound is the admitted limit's, not only max_tokens': a cancelled call's bill is
        # at least one token per MAX_BYTES_PER_TOKEN of its text and must stay within the limit too
        byte_limit = completion_byte_limit(min(req.max_tokens, self._limit))
        if self._text_bytes + size > byte_limit:
            raise SpendLimitReached(f"completion would pass {byte_limit} bytes")
        claimed = billable_output_tokens(self._generated + tokens, self._text_bytes + size) - self._tokens_out
        most = min(req.max_tokens, self._tokens_out + claimed + TOKEN_SLACK)
        if self._logprobs + len(logprobs) > most:
            raise IllegalTransition(f"logprobs of {self._logprobs + len(logprobs)} tokens, over the {most} the "
                                    "call's claimed tokens (plus slack) and max_tokens allow")
        self._named = named
        self._generated += tokens
        self._text_bytes += size
        self._logprobs += len(logprobs)
        common = dict(session_id=self.session_id, call_seq=self.next_seq, index=len(self._text), text=text,
                      tokens=claimed)
        msg: Chunk | ChunkV2 = (ChunkV2(**common, tool_calls=tuple(tool_calls), logprobs=tuple(logprobs)) if v2
                                else Chunk(**common))
        self._text.append(text)
        self._deltas.append(tuple(tool_calls))
        self._sizes.append(size)
        self._claims.append(claimed)
        self._tokens_out += claimed
        self._outbox.append(msg)
        return msg

    @_guarded
    def embed_result(self, dims: int, vectors: bytes) -> EmbedResult:
        """Queue the vectors of the running embeddings call (float32 little-endian, row-major).

        Raises:
            IllegalTransition: no embeddings call running, or its result was sent already.
            InvalidMessage: ``dims`` is 0 or not the dimensions asked, ``vectors`` is not
                ``len(inputs) * dims * 4`` bytes, or holds a NaN or an infinity.
        """
        self._expect(ProviderState.IN_CALL)
        req = self._request
        if not isinstance(req, EmbedRequest):
            raise IllegalTransition("embed_result answers an embeddings call only")
        if self._embedded is not None:
            raise IllegalTransition("the embed_result of this call was sent already")
        if dims < 1 or (req.dimensions and dims != req.dimensions):
            raise InvalidMessage(f"{dims} dimensions, the call asked {req.dimensions or 'any (>= 1)'}")
        if len(vectors) != len(req.inputs) * dims * 4:
            raise InvalidMessage(f"{len(vectors)} bytes of vectors, expected {len(req.inputs) * dims * 4}")
        if not finite_vectors(vectors):
            raise InvalidMessage("the vectors hold a NaN or an infinity")
        msg = EmbedResult(session_id=self.session_id, call_seq=self.next_seq, dims=dims, vectors=vectors)
        self._embedded = msg
        self._outbox.append(msg)
        return msg

    @_guarded
    def finish_call(self, finish_reason: str, now: int, tokens_in: int | None = None,
                    discount_permille: int = 0) -> Receipt:
        """Queue the provider-signed receipt of the running call. A cancelled call (CANCELLING)
        bills only the prefix the consumer received, with ``CANCELLED_FINISH`` as its finish reason.
        A v2 call's output hash is ``call_output_hash`` of its text and accumulated tool calls; an
        embeddings call (after its ``embed_result``) bills ``tokens_out`` 0 and ``embedding_hash``.

        Args:
            tokens_in: the prompt's actual token count when the admitted one was an upper bound
                (an upstream server's usage). A count over what ``start_call`` admitted bills
                the admitted one (``request_token_bound``, of the context), as ``start_call``
                bills a tokenizer that counts more than the bound.
        """
        self._expect(ProviderState.IN_CALL, ProviderState.CANCELLING)
        assert self._request is not None
        if self._embedding and self._embedded is None:
            raise IllegalTransition("an embeddings call is billed after its embed_result")
        if tokens_in is not None:  # never past what start_call admitted: the bound the consumer signs
            self._tokens_in = min(tokens_in, self._tokens_in)
        receipt = self._bill(self._tokens_in, now, discount_permille, finish_reason)
        if receipt.cumulative > self.cap:  # start_call's clamp makes this unreachable
            raise SpendLimitReached("receipt would pass the spend cap")
        self._pending = receipt
        self._outbox.append(receipt)
        self._request = None
        self.state = ProviderState.AWAITING_COUNTERSIGN
        return receipt

    def _bill(self, tokens_in: int, now: int, discount_permille: int, finish_reason: str = CANCELLED_FINISH
              ) -> Receipt:
        """The signed receipt of the current call: all its chunks, or (once cancelled) the first
        ``_cut`` of them, billed by ``cancelled_output_tokens``."""
        assert self.accept is not None and self.open_msg is not None
        if self._embedded is not None:
            out_hash, tokens_out = embedding_hash(self._embedded.dims, self._embedded.vectors), 0
        elif self._cut is None:
            tokens_out = self._tokens_out
            out_hash = call_output_hash("".join(self._text), accumulate_tool_calls(d for ds in self._deltas for d in ds))
        else:
            text = "".join(self._text[: self._cut])
            calls = accumulate_tool_calls(d for ds in self._deltas[: self._cut] for d in ds)
            tokens_out = cancelled_output_tokens(sum(self._claims[: self._cut]), sum(self._sizes[: self._cut]))
            out_hash = call_output_hash(text, calls)
            finish_reason = CANCELLED_FINISH
        cost = discounted(call_cost(self.accept.price, tokens_in, tokens_out), discount_permille)
        receipt = Receipt(
            session_id=self.session_id,
            call_seq=self.next_seq,
            model=self.accept.model,
            provider=self.me,
            consumer=self.open_msg.consumer,
            agent=self.open_msg.channel.agent,
            channel_id=self.open_msg.channel.channel_id,
            input_hash=self._input_hash,
            output_hash=out_hash,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            finish_reason=finish_reason,
            price=self.accept.price,
            cost=cost,
            cumulative=self.cumulative + cost,
            prev_hash=self.last_hash,
            issued_at=now,
            discount_permille=discount_permille,
        )
        return sign(receipt, "provider_sig", self._signer)

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
        # queued now, sent when the node drains the outbox: after it has handled (stored) the event
        self._outbox.append(acknowledge(signed, self._signer))
        self.state = ProviderState.READY
        return Countersigned(signed)

    def withhold_ack(self) -> bool:
        """Take back the queued ``CounterSignAck`` (not sent yet): the node could not store the
        receipt, so the consumer must keep it in doubt and redeliver it. True if one was queued."""
        kept = [m for m in self._outbox if not isinstance(m, CounterSignAck)]
        withheld, self._outbox = len(kept) != len(self._outbox), kept
        return withheld

    @_guarded
    def close(self, now: int, reason: str = "done") -> Close:
        """Queue a signed ``Close``; an un-counter-signed receipt stays unpaid."""
        self._expect(
            ProviderState.READY,
            ProviderState.CALL_REQUESTED,
            ProviderState.IN_CALL,
            ProviderState.CANCELLING,
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
