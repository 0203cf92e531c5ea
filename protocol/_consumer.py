"""The consumer side of a session: opens, requests, checks every receipt, counter-signs, closes.

A counter-signed receipt stays ``unacked`` until the provider's signed ``CounterSignAck`` for it
comes (or its answer to the next call proves it took the signature): ``CountersignConfirmed``.

``cancel`` stops the running call at the chunks received so far (or fewer: those its caller
was shown): the machine then counter-signs only a receipt of exactly that prefix. Chunks that
come after the cut are checked against the call's bounds and then dropped, unbilled; a receipt
of the whole call that crossed the ``Cancel`` is ignored (the provider replaces it); any other
receipt is refused.

A call with any agent extra (tools, a response format, a seed, logprobs, a user, a completion
prompt, or a turn with a name, tool call id or tool calls) goes out as a ``RequestV2`` and takes
only ``ChunkV2``s; a plain one stays a v1 ``Request`` taking only v1 ``Chunk``s, so old providers
keep working. Tool-call deltas come only as ``tool_call_problem`` allows (offered tools, an id and
an offered name once per call); they count as text for every metering rule (``metered_bytes``)
and the receipt's output hash covers them (``call_output_hash``). A call's logprobs never
outnumber the tokens its chunks claimed plus ``TOKEN_SLACK`` (nor ``max_tokens``). An embeddings call (``embed``) takes one
``EmbedResult`` of finite vectors and then a receipt billing its input only (``tokens_out`` 0,
``embedding_hash``, each input at most the accepted context); it cannot be cancelled.
"""

from __future__ import annotations

import enum
from typing import Any

from ._agent_messages import (
    MAX_EMBED_INPUTS,
    ChunkV2,
    EmbedRequest,
    EmbedResult,
    RequestV2,
    Tool,
    ToolCall,
    ToolCallDelta,
    Turn,
    accumulate_tool_calls,
    call_output_hash,
    embedding_hash,
    finite_vectors,
    is_plain,
    metered_bytes,
    request_problem,
    request_token_bound,
    tool_call_problem,
)
from ._commitments import ACCEPT_TYPES, AcceptV2, accepted_commitment, committed_input_hash
from ._errors import (
    Expired,
    IllegalTransition,
    InvalidMessage,
    ReceiptChainBroken,
    ReceiptHashMismatch,
    ReceiptOverCap,
    ReceiptPriceMismatch,
    ReceiptReplay,
    SpendLimitReached,
    TermsMismatch,
    UnexpectedMessage,
)
from ._identity import public_key_from_peer_id
from ._messages import (
    ZERO_HASH,
    Accept,
    CallError,
    CallQueued,
    Cancel,
    ChannelGrant,
    ChatMessage,
    Chunk,
    Close,
    CounterSign,
    CounterSignAck,
    EscrowClose,
    Open,
    Receipt,
    Reject,
    Request,
)
from ._metering import (
    MAX_BYTES_PER_TOKEN,
    TOKEN_SLACK,
    billable_output_tokens,
    cancelled_output_tokens,
    completion_byte_limit,
)
from ._pricing import Price, call_cost, discounted
from ._session import (
    Accepted,
    CallFailed,
    ChunkReceived,
    CountersignConfirmed,
    EmbeddingsReceived,
    Queued,
    ReceiptSettled,
    Rejected,
    SessionClosed,
    _guarded,
    _Machine,
    receipt_hash,
    request_hash,
    verify_ack,
)
from ._signing import Signer, sign, verify

__all__ = ["ConsumerState", "ConsumerSession"]


# ---- consumer ---------------------------------------------------------------------------------


class ConsumerState(enum.Enum):
    """Where a ``ConsumerSession`` stands: IDLE (not opened), OPENING (Open sent, awaiting Accept or
    Reject), READY (may request), IN_CALL (streaming, awaiting the receipt or a CallError),
    CANCELLING (``Cancel`` sent: awaiting the receipt of the prefix received, or a CallError),
    CLOSED, or ERROR (a protocol error was raised; it takes nothing more)."""

    IDLE = "idle"
    OPENING = "opening"
    READY = "ready"
    IN_CALL = "in_call"
    CANCELLING = "cancelling"
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
        max_context: int,
        tier: str = "",
        batch_calls: int = 0,
        commitment: bytes = ZERO_HASH,
    ) -> None:
        """
        Args:
            price, max_context: the terms of the signed listing (``session_terms`` of its model
                offer) this session answers: the Accept must not name a larger context.
            commitment: the ``commitment_id`` of the model that listing names (``ZERO_HASH``:
                none): the Accept must sign the same (any, when it names none), and every
                receipt's input hash binds the one accepted.
        """
        super().__init__(signer)
        self.tier, self.batch_calls, self.commitment = tier, batch_calls, commitment
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
        self.max_context = max_context
        self.cap = min(spend_limit, channel.cap)
        self.accept: Accept | None = None
        self.rejected = False
        self.unacked: Receipt | None = None  # counter-signed, not yet acknowledged by the provider
        self._expect_dims = 0  # the running embeddings call's vector size, when it is known
        self._request: Request | RequestV2 | EmbedRequest | None = None
        self._cut = 0  # once cancelled: the chunks the receipt may bill
        self._new_call(None)

    def _new_call(self, request: Request | RequestV2 | EmbedRequest | None) -> None:
        self._request = request
        self._text: list[str] = []  # each chunk's text, tool-call deltas, metered bytes and claim
        self._deltas: list[tuple[ToolCallDelta, ...]] = []
        self._named: set[int] = set()  # the tool-call indices begun (with a name)
        self._sizes: list[int] = []
        self._claims: list[int] = []
        self._tokens_out = self._text_bytes = self._next_chunk = self._logprobs = 0
        self._embedded: EmbedResult | None = None

    @property
    def embedding(self) -> bool:
        """True while the call in flight is an embeddings call (which cannot be cancelled)."""
        return isinstance(self._request, EmbedRequest)

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

    def request(
        self,
        messages: tuple[ChatMessage | Turn, ...],
        max_tokens: int,
        *,
        temperature_milli: int = 1000,
        top_p_milli: int = 1000,
        stop: tuple[str, ...] = (),
        stream: bool = True,
        tools: tuple[Tool, ...] = (),
        tool_choice: str = "",
        response_format: str = "",
        json_schema: str = "",
        seed: int | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        user: str = "",
        prompt: str | None = None,
    ) -> Request | RequestV2:
        """Queue the next call's request: a v1 ``Request`` when every extra is at its default and
        every turn is plain, else a ``RequestV2`` (every message as a ``Turn``).

        Raises:
            IllegalTransition: not ready (not accepted yet, a call in flight, or closed).
            SpendLimitReached: not even a one-token prompt fits under the cap.
            InvalidMessage: the request breaks its shape rules (``request_problem``); refused
                before anything changed, the session stays as it was.
        """
        common = dict(session_id=self.session_id, call_seq=self.next_seq, max_tokens=max_tokens,
                      temperature_milli=temperature_milli, top_p_milli=top_p_milli, stop=tuple(stop), stream=stream)
        extras = dict(tools=tuple(tools), tool_choice=tool_choice, response_format=response_format,
                      json_schema=json_schema, seed=seed, logprobs=logprobs, top_logprobs=top_logprobs, user=user,
                      prompt=prompt)
        plain = extras == dict(tools=(), tool_choice="", response_format="", json_schema="", seed=None,
                               logprobs=False, top_logprobs=0, user="", prompt=None)
        msg: Request | RequestV2
        if plain and all(is_plain(m) for m in messages):
            msg = Request(messages=tuple(ChatMessage(role=m.role, content=m.content) for m in messages), **common)
        else:
            turns = tuple(Turn(role=m.role, content=m.content) if isinstance(m, ChatMessage) else m for m in messages)
            msg = RequestV2(messages=turns, **common, **extras)
        self._send_call(msg)
        return msg

    def embed(self, inputs: tuple[str, ...], dimensions: int = 0, expect_dims: int = 0) -> EmbedRequest:
        """Queue an embeddings call of ``inputs`` (``dimensions`` 0: the model's own size).

        ``expect_dims`` (not sent): the size its vectors must have though the model's own was asked
        — a later batch of one request must match the first, or it is refused, not paid.

        Raises:
            IllegalTransition: not ready. SpendLimitReached: not even one input token fits.
            InvalidMessage: no input, or too many; refused before anything changed.
        """
        if len(inputs) > MAX_EMBED_INPUTS:
            raise InvalidMessage(f"{len(inputs)} inputs in one embeddings call, at most {MAX_EMBED_INPUTS}")
        msg = EmbedRequest(session_id=self.session_id, call_seq=self.next_seq, inputs=tuple(inputs),
                           dimensions=dimensions)
        self._send_call(msg)
        self._expect_dims = dimensions or expect_dims
        return msg

    def _send_call(self, msg: Request | RequestV2 | EmbedRequest) -> None:
        problem = request_problem(msg)
        if problem:  # the caller's mistake, caught before any change: not the session's error
            raise InvalidMessage(problem)
        self._queue_call(msg)

    @_guarded
    def _queue_call(self, msg: Request | RequestV2 | EmbedRequest) -> None:
        self._expect(ConsumerState.READY)
        if call_cost(self.price, 1, 0) > self.remaining:
            raise SpendLimitReached(f"{self.remaining} µc left in this session")
        self._outbox.append(msg)
        self._new_call(msg)
        self.state = ConsumerState.IN_CALL

    @_guarded
    def cancel(self, chunks: int | None = None) -> Cancel:
        """Queue a ``Cancel`` of the running call after its first ``chunks`` chunks (default: every
        chunk received so far). Only a receipt of exactly that prefix will be counter-signed.

        Raises:
            IllegalTransition: no call in flight (or it is cancelled already), or ``chunks`` is
                more than were received.
        """
        self._expect(ConsumerState.IN_CALL)
        if isinstance(self._request, EmbedRequest):
            raise IllegalTransition("an embeddings call cannot be cancelled: close the session instead")
        cut = self._next_chunk if chunks is None else chunks
        if not 0 <= cut <= self._next_chunk:
            raise IllegalTransition(f"cannot cut after {cut} chunks: {self._next_chunk} were received")
        msg = Cancel(session_id=self.session_id, call_seq=self.next_seq, chunks=cut)
        self._outbox.append(msg)
        self._cut = cut
        self.state = ConsumerState.CANCELLING
        return msg

    @property
    def cancelled_text(self) -> str:
        """The prefix a cancelled call pays for (the text of its first ``chunks`` chunks)."""
        return "".join(self._text[: self._cut])

    @_guarded
    def close(self, now: int, reason: str = "done", escrow_close: EscrowClose | None = None) -> Close:
        """Queue a signed ``Close``; an unfinished call is abandoned and never paid.

        Args:
            escrow_close: optionally, this consumer's signed half of a cooperative channel close,
                for the provider to complete and submit (see ``escrow_close_half``).
        """
        self._expect(ConsumerState.IDLE, ConsumerState.OPENING, ConsumerState.READY, ConsumerState.IN_CALL,
                     ConsumerState.CANCELLING)
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
    def withdraw(self, request_id: bytes, now: int) -> Close:
        """After a ``Reject``: queue a signed ``Close`` carrying this consumer's half of a cooperative
        close of the unused channel (no receipt), so the provider can release the channel at once.

        Raises:
            IllegalTransition: the session was not refused.
        """
        if self.state is not ConsumerState.CLOSED or not self.rejected:
            raise IllegalTransition("only a refused session withdraws its channel")
        half = sign(EscrowClose(request_id=request_id, channel_id=self.channel.channel_id, receipt=None, issued_at=now),
                    "consumer_sig", self._signer)
        msg = sign(Close(session_id=self.session_id, by=self.me, reason="done", last_receipt_hash=self.last_hash,
                         cumulative=0, issued_at=now, escrow_close=half), "sig", self._signer)
        self._outbox.append(msg)
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
        if isinstance(msg, ACCEPT_TYPES) and self.state is ConsumerState.OPENING:
            return [self._on_accept(msg)]
        if isinstance(msg, Reject) and self.state is ConsumerState.OPENING:
            self._check_session(msg, self.session_id)
            self.state = ConsumerState.CLOSED
            self.rejected = True
            return [Rejected(msg)]
        calling = self.state in (ConsumerState.IN_CALL, ConsumerState.CANCELLING)
        if isinstance(msg, CounterSignAck) and (calling or self.state is ConsumerState.READY):
            return [self._on_ack(msg)]
        # the provider answers call n+1 only after it took call n's counter-signature: proof of delivery
        prior = self.unacked if calling else None
        if isinstance(msg, Receipt):
            return self._proven(prior, self._on_receipt(msg))
        if isinstance(msg, (Chunk, ChunkV2)) and calling:
            return self._proven(prior, self._on_chunk(msg))
        if isinstance(msg, EmbedResult) and calling:
            return self._proven(prior, self._on_embed_result(msg))
        if isinstance(msg, CallQueued) and calling:
            self._check_session(msg, self.session_id)
            if msg.call_seq != self.next_seq or self._next_chunk or self._embedded is not None:
                raise UnexpectedMessage("queue position for another call, or after the answer began")
            return self._proven(prior, Queued(msg))
        if isinstance(msg, CallError) and calling:
            self._check_session(msg, self.session_id)
            if msg.call_seq != self.next_seq:
                raise UnexpectedMessage(f"call_error for call {msg.call_seq}, expected {self.next_seq}")
            self._request = None
            self.state = ConsumerState.READY
            return self._proven(prior, CallFailed(msg))
        raise self._unexpected(msg)

    def confirmed(self, receipt: Receipt) -> None:
        """The provider acknowledged ``receipt`` out of the session (a redelivery): no longer in doubt."""
        if self.unacked == receipt:
            self.unacked = None

    def _on_ack(self, msg: CounterSignAck) -> CountersignConfirmed:
        self._check_session(msg, self.session_id)
        if self.unacked is None:
            raise UnexpectedMessage("an acknowledgement with no counter-signature awaiting one")
        verify_ack(msg, self.unacked)
        receipt, self.unacked = self.unacked, None
        return CountersignConfirmed(receipt, msg)

    def _proven(self, prior: Receipt | None, event: Any | None) -> list[Any]:
        """``event`` (if any), after the proof that ``prior`` (counter-signed, unacknowledged when
        call n+1's answer came) was delivered."""
        events = [] if event is None else [event]
        if prior is None:
            return events
        if self.unacked is prior:
            self.unacked = None
        return [CountersignConfirmed(prior, None), *events]

    def _on_accept(self, msg: Accept | AcceptV2) -> Accepted:
        self._check_session(msg, self.session_id)
        if msg.provider != self.provider or msg.model != self.model:
            raise TermsMismatch("accept names another provider or model")
        verify(msg, "sig", self._provider_key)
        if msg.price != self.price:
            raise TermsMismatch("accepted prices differ from the prices offered")
        if msg.spend_cap != self.cap:
            raise TermsMismatch(f"accepted spend cap {msg.spend_cap}, expected {self.cap}")
        if msg.max_context > self.max_context:
            raise TermsMismatch(f"accepted a context of {msg.max_context} tokens, the listing says {self.max_context}")
        named = accepted_commitment(msg)
        if self.commitment != ZERO_HASH and named != self.commitment:
            raise TermsMismatch("accepted under another model commitment than the listing names")
        self.commitment = named  # a listing that named none promised nothing: the Accept's binds
        self.accept = msg
        self.state = ConsumerState.READY
        return Accepted(msg)

    def _on_chunk(self, msg: Chunk | ChunkV2) -> ChunkReceived:
        req = self._request
        assert req is not None
        self._check_session(msg, self.session_id)
        if isinstance(req, EmbedRequest):
            raise UnexpectedMessage("call_chunk on an embeddings call")
        if isinstance(req, RequestV2) != isinstance(msg, ChunkV2):
            raise UnexpectedMessage(f"call_chunk v{type(msg).VERSION} on a call_request v{type(req).VERSION} call")
        if msg.call_seq != self.next_seq or msg.index != self._next_chunk:
            raise UnexpectedMessage(f"chunk {msg.call_seq}/{msg.index} out of order")
        if self._tokens_out + msg.tokens > req.max_tokens:
            raise UnexpectedMessage("the provider streamed more tokens than max_tokens")
        deltas = msg.tool_calls if isinstance(msg, ChunkV2) else ()
        if deltas:
            assert isinstance(req, RequestV2)
            problem = tool_call_problem(req, self._named, deltas)
            if problem:
                raise UnexpectedMessage(problem)
        size = metered_bytes(msg.text, deltas)
        if self._text_bytes + size > completion_byte_limit(req.max_tokens):
            raise UnexpectedMessage(f"the provider streamed more than {completion_byte_limit(req.max_tokens)} "
                                    f"bytes of text and tool calls for max_tokens {req.max_tokens}")
        if isinstance(msg, ChunkV2) and msg.logprobs:
            assert isinstance(req, RequestV2)
            if not req.logprobs:
                raise UnexpectedMessage("logprobs on a call that did not ask for them")
            most = min(req.max_tokens, self._tokens_out + msg.tokens + TOKEN_SLACK)
            if self._logprobs + len(msg.logprobs) > most:
                raise UnexpectedMessage(f"logprobs of {self._logprobs + len(msg.logprobs)} tokens, over the {most} "
                                        "the call's claimed tokens (plus slack) and max_tokens allow")
            if any(len(lp.top) > req.top_logprobs for lp in msg.logprobs):
                raise UnexpectedMessage(f"more than the {req.top_logprobs} top logprobs asked for")
            self._logprobs += len(msg.logprobs)
        self._next_chunk += 1
        self._tokens_out += msg.tokens
        self._text_bytes += size
        self._text.append(msg.text)
        self._deltas.append(deltas)
        self._sizes.append(size)
        self._claims.append(msg.tokens)
        return ChunkReceived(msg)

    def _on_embed_result(self, msg: EmbedResult) -> EmbeddingsReceived:
        req = self._request
        self._check_session(msg, self.session_id)
        if not isinstance(req, EmbedRequest):
            raise UnexpectedMessage("embed_result on a chat call")
        if msg.call_seq != self.next_seq:
            raise UnexpectedMessage(f"embed_result for call {msg.call_seq}, expected {self.next_seq}")
        if self._embedded is not None:
            raise UnexpectedMessage("embed_result sent twice for one call")
        expected = self._expect_dims
        if msg.dims < 1 or (expected and msg.dims != expected):
            raise UnexpectedMessage(f"embed_result of {msg.dims} dimensions, expected {expected or 'any (>= 1)'}")
        want = len(req.inputs) * msg.dims * 4
        if len(msg.vectors) != want:
            raise UnexpectedMessage(f"embed_result of {len(msg.vectors)} bytes, expected {want} "
                                    f"({len(req.inputs)} vectors of {msg.dims} float32)")
        if not finite_vectors(msg.vectors):
            raise UnexpectedMessage("embed_result holds a NaN or an infinity")
        self._embedded = msg
        return EmbeddingsReceived(msg)

    def _on_receipt(self, r: Receipt) -> ReceiptSettled | None:
        self._check_session(r, self.session_id)
        if r.call_seq < self.next_seq:
            raise ReceiptReplay(f"receipt for call {r.call_seq} was already settled")
        cancelled = self.state is ConsumerState.CANCELLING
        if self.state not in (ConsumerState.IN_CALL, ConsumerState.CANCELLING) or r.call_seq != self.next_seq:
            raise UnexpectedMessage(f"receipt for call {r.call_seq} with no such call in flight")
        req = self._request
        assert req is not None and self.accept is not None
        embed = isinstance(req, EmbedRequest)
        calls: tuple[ToolCall, ...] = ()
        if embed:
            if self._embedded is None:
                raise UnexpectedMessage("receipt of an embeddings call before its embed_result")
            text, text_bytes, tokens_out = "", 0, 0
            out_hash = embedding_hash(self._embedded.dims, self._embedded.vectors)
        elif cancelled:  # bill the prefix received before the cut, and nothing after it
            text = self.cancelled_text
            calls = accumulate_tool_calls(d for ds in self._deltas[: self._cut] for d in ds)
            text_bytes = sum(self._sizes[: self._cut])
            tokens_out = cancelled_output_tokens(sum(self._claims[: self._cut]), text_bytes)
            out_hash = call_output_hash(text, calls)
            whole = (self._whole_hash(), self._tokens_out)
            if (r.output_hash, r.tokens_out) != (out_hash, tokens_out) and (r.output_hash, r.tokens_out) == whole:
                return None  # the whole call's receipt crossed our Cancel: the prefix's comes next
        else:
            text, text_bytes, tokens_out = "".join(self._text), self._text_bytes, self._tokens_out
            calls = accumulate_tool_calls(d for ds in self._deltas for d in ds)
            out_hash = call_output_hash(text, calls)
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
        if r.input_hash != committed_input_hash(request_hash(req), self.commitment):
            raise ReceiptHashMismatch("input hash is not the hash of the request sent")
        if r.output_hash != out_hash:
            raise ReceiptHashMismatch("output hash is not the hash of the " + (
                "vectors received" if embed else "text and tool calls received" if calls else "text received"))
        if embed and r.tokens_out:
            raise ReceiptPriceMismatch(f"an embeddings receipt bills {r.tokens_out} output tokens, not 0")
        if r.tokens_out != tokens_out:
            raise ReceiptPriceMismatch(f"receipt bills {r.tokens_out} output tokens, {tokens_out} "
                                       + ("received before the cancel" if cancelled else "streamed"))
        if r.tokens_out > billable_output_tokens(r.tokens_out, text_bytes):
            raise ReceiptPriceMismatch(f"receipt bills {r.tokens_out} output tokens for {text_bytes} bytes of text")
        if text_bytes > r.tokens_out * MAX_BYTES_PER_TOKEN:
            raise ReceiptPriceMismatch(f"{text_bytes} bytes of text for {r.tokens_out} tokens: over "
                                       f"{MAX_BYTES_PER_TOKEN} bytes per token")
        if not embed and r.tokens_in > self.accept.max_context:  # embedded inputs are each their own context
            raise ReceiptPriceMismatch(f"receipt bills {r.tokens_in} input tokens, over the context")
        bound = request_token_bound(req, self.accept.max_context)
        if r.tokens_in > bound:
            raise ReceiptPriceMismatch(f"receipt bills {r.tokens_in} input tokens, over the {bound} this prompt "
                                       "can take")
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
        self.unacked = signed
        self._request = None
        self.state = ConsumerState.READY
        return ReceiptSettled(signed, text, cancelled, calls)

    def _whole_hash(self) -> bytes:
        return call_output_hash("".join(self._text), accumulate_tool_calls(d for ds in self._deltas for d in ds))

    def _on_close(self, msg: Close) -> SessionClosed:
        self._check_session(msg, self.session_id)
        if msg.by != self.provider:
            raise UnexpectedMessage("close signed by someone other than the provider")
        verify(msg, "sig", self._provider_key)
        self._request = None
        self.state = ConsumerState.CLOSED
        return SessionClosed(msg)
