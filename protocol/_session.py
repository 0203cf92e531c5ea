"""Sans-IO sessions: what both machines share (events, hashes, the guarded base class).

The machines themselves: ``_consumer`` and ``_provider``.

Rules this module owns (docs/DESIGN.md, "Sessions"):
- open -> accept | reject -> (request -> chunks -> provider-signed receipt -> counter-signature)* -> close.
- Prices are pinned by the provider's signed Accept and never change within a session.
- Every receipt continues a hash chain (``prev_hash`` = hash of the previous receipt) and a
  cumulative cost that never exceeds the session's spend cap (min of spend limit and channel cap).
- The provider starts call n+1 only after call n is counter-signed, so each side risks one call.
- The provider answers each counter-signature with a signed ``CounterSignAck`` once it holds the
  doubly-signed receipt (the node stores it before the ack leaves); the consumer's call is done
  only then, or when the provider's answer to call n+1 proves it took call n's signature. A
  receipt still unacknowledged is redelivered on ``RECEIPT_PROTOCOL`` (``check_delivered``).
- A refused or failed call (``CallError``) produces no receipt and costs nothing.
- The consumer may cancel the running call (``Cancel``, naming how many chunks it received): the
  provider stops and bills exactly that prefix (``cancelled_output_tokens``); chunks it sent after
  the consumer's cut are not billed, and a receipt for more than the cut is never counter-signed.
- Any error raised by a machine moves it to its ERROR state; it accepts nothing afterwards.
The machines never read the clock (``now`` is a parameter) and never do I/O: messages to send
queue up and ``outgoing()`` drains them; ``node/`` moves them over a stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, TypeVar

from ._agent_messages import ChunkV2, EmbedRequest, EmbedResult, RequestV2, ToolCall
from ._errors import (
    BadSignature,
    IllegalTransition,
    ProtocolError,
    ReceiptHashMismatch,
    TermsMismatch,
    UnexpectedMessage,
)
from ._identity import peer_id_from_public_key, public_key_from_peer_id
from ._messages import (
    ZERO_HASH,
    Accept,
    CallError,
    CallQueued,
    Cancel,
    ChannelGrant,
    Chunk,
    Close,
    CounterSignAck,
    Open,
    Receipt,
    Reject,
    Request,
)
from ._signing import Signer, body_hash, sign, verify

__all__ = [
    "Accepted",
    "Rejected",
    "ChunkReceived",
    "EmbeddingsReceived",
    "Queued",
    "CallFailed",
    "ReceiptSettled",
    "SessionClosed",
    "OpenReceived",
    "CallRequested",
    "CallCancelled",
    "Countersigned",
    "CountersignConfirmed",
    "acknowledge",
    "check_delivered",
    "verify_ack",
    "RECEIPT_FRAME_MAX",
    "RECEIPTS_PER_STREAM",
    "request_hash",
    "output_hash",
    "receipt_hash",
    "verify_channel",
]

F = TypeVar("F", bound=Callable[..., Any])

#: on ``RECEIPT_PROTOCOL``: the largest frame either side sends or takes (a receipt is ~700
#: bytes), and the most receipts one stream carries
RECEIPT_FRAME_MAX = 4 << 10
RECEIPTS_PER_STREAM = 32


def request_hash(request: Request | RequestV2 | EmbedRequest) -> bytes:
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


def acknowledge(receipt: Receipt, signer: Signer) -> CounterSignAck:
    """The provider's signed acknowledgement of the doubly-signed ``receipt``."""
    ack = CounterSignAck(session_id=receipt.session_id, call_seq=receipt.call_seq, receipt_hash=receipt_hash(receipt))
    return sign(ack, "sig", signer)


def verify_ack(ack: CounterSignAck, receipt: Receipt) -> None:
    """Check that ``ack`` is the provider's acknowledgement of ``receipt``.

    Raises:
        ReceiptHashMismatch: it names another receipt. BadSignature: the receipt's provider did
            not sign it.
    """
    if (ack.session_id, ack.call_seq, ack.receipt_hash) != (receipt.session_id, receipt.call_seq,
                                                             receipt_hash(receipt)):
        raise ReceiptHashMismatch("the acknowledgement names another receipt")
    verify(ack, "sig", public_key_from_peer_id(receipt.provider))


def verify_doubly_signed(receipt: Receipt) -> None:
    """Check that ``receipt`` carries its provider's signature and its consumer's counter-signature.

    Raises:
        BadSignature: either signature is missing or does not verify.
    """
    verify(receipt, "provider_sig", public_key_from_peer_id(receipt.provider))
    if len(receipt.consumer_sig) != 64:
        raise BadSignature("the receipt is not counter-signed")
    verify(receipt, "consumer_sig", public_key_from_peer_id(receipt.consumer))


def check_delivered(receipt: Receipt, me: str, sender: str | None = None) -> None:
    """The provider's check of a receipt redelivered to it: its own signature, and the consumer's.

    Args:
        me: this provider's peer id. sender: who delivered it (None: not known).

    Raises:
        TermsMismatch: the receipt names another provider, or ``sender`` is not its consumer.
        BadSignature: the provider's or the consumer's signature does not verify.
    """
    if receipt.provider != me:
        raise TermsMismatch("the receipt names another provider")
    verify(receipt, "provider_sig", public_key_from_peer_id(me))
    if sender is not None and sender != receipt.consumer:
        raise TermsMismatch("only the receipt's consumer may deliver it")
    verify(receipt, "consumer_sig", public_key_from_peer_id(receipt.consumer))


# ---- events ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Accepted:
    """Consumer event: the provider accepted the ``Open`` with the terms offered; the prices are
    pinned and the session is READY for requests."""

    accept: Accept


@dataclasses.dataclass(frozen=True)
class Rejected:
    """Consumer event: the provider refused the ``Open`` (``reject.reason``); the session is CLOSED."""

    reject: Reject


@dataclasses.dataclass(frozen=True)
class ChunkReceived:
    """Consumer event: the next piece of the running call's completion, in order and within
    ``max_tokens`` (a ``ChunkV2`` when the call's request was a ``RequestV2``)."""

    chunk: Chunk | ChunkV2


@dataclasses.dataclass(frozen=True)
class EmbeddingsReceived:
    """Consumer event: the vectors of the running embeddings call, checked against its request;
    its receipt comes next."""

    result: EmbedResult


@dataclasses.dataclass(frozen=True)
class Queued:
    """The provider queued the call; ``queued.position`` 1 is next."""

    queued: CallQueued


@dataclasses.dataclass(frozen=True)
class CallFailed:
    """Consumer event: the provider refused or abandoned the call (``CallError``); nothing is
    charged and the session is READY for another request."""

    error: CallError


@dataclasses.dataclass(frozen=True)
class ReceiptSettled:
    """The consumer checked and counter-signed ``receipt`` (now doubly signed) for ``text`` and
    ``tool_calls`` (accumulated from the billed chunks' deltas); with ``cancelled``, the receipt of
    a cancelled call, covering only the prefix the consumer received. An embeddings call settles
    with ``text`` "" after its ``EmbeddingsReceived``."""

    receipt: Receipt
    text: str
    cancelled: bool = False
    tool_calls: tuple[ToolCall, ...] = ()


@dataclasses.dataclass(frozen=True)
class CountersignConfirmed:
    """Consumer event: the provider holds the doubly-signed ``receipt``: its ``ack`` came, or
    (``ack`` None) its answer to the next call proves it took the counter-signature."""

    receipt: Receipt
    ack: CounterSignAck | None


@dataclasses.dataclass(frozen=True)
class SessionClosed:
    """Either side's event: the peer ended the session with a verified ``Close``; the machine is CLOSED."""

    close: Close


@dataclasses.dataclass(frozen=True)
class OpenReceived:
    """Provider event: a consumer's ``Open`` passed the checks (addressed here, signed, on a valid
    unexpired channel of its own); decide with ``accept_open`` or ``reject_open``."""

    open: Open


@dataclasses.dataclass(frozen=True)
class CallRequested:
    """Provider event: the consumer asked for the next call (chat v1 or v2, or embeddings); admit
    it with ``start_call`` (or give up with ``fail_call``)."""

    request: Request | RequestV2 | EmbedRequest


@dataclasses.dataclass(frozen=True)
class CallCancelled:
    """Provider event: the consumer cancelled the running call after ``cancel.chunks`` chunks: stop
    generating and ``finish_call`` (it bills that prefix). When the call's receipt had already
    gone out, the machine has queued the prefix's receipt in its place."""

    cancel: Cancel


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
