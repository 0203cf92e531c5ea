"""Every message kind on the wire, as frozen dataclasses with explicit, versioned field maps.

The field order below is the wire order; changing a field map means registering a new
version, never editing one in place. Amounts are integer micro-credits, times are integer
unix seconds, sampling knobs are integer thousandths: no floats anywhere.
"""

from __future__ import annotations

import dataclasses

from ._codec import (
    DEFAULT_MAX_MESSAGE,
    Bool,
    Bytes,
    ListOf,
    Nested,
    Optional,
    PeerId,
    Str,
    UInt,
    message,
    record,
    wire,
)
from ._pricing import Price

__all__ = [
    "PROVIDER_TYPES",
    "REJECT_REASONS",
    "CALL_ERROR_REASONS",
    "CLOSE_REASONS",
    "FINISH_REASONS",
    "ZERO_HASH",
    "Gpu",
    "Hardware",
    "TIERS",
    "Tier",
    "ModelOffer",
    "Listing",
    "ChannelGrant",
    "Open",
    "Accept",
    "Reject",
    "ChatMessage",
    "Request",
    "Chunk",
    "CallQueued",
    "CallError",
    "Cancel",
    "CANCELLED_FINISH",
    "Receipt",
    "CounterSign",
    "CounterSignAck",
    "ReceiptRefused",
    "RECEIPT_REFUSALS",
    "Close",
    "Balance",
    "ChannelState",
    "BudgetState",
    "EscrowMint",
    "EscrowOpen",
    "EscrowTopUp",
    "EscrowClaim",
    "EscrowClose",
    "EscrowRefund",
    "EscrowWithdraw",
    "EscrowBudgetCreate",
    "EscrowBudgetRefund",
    "EscrowQuery",
    "EscrowResponse",
]

PROVIDER_TYPES = ("self_hosted", "cloud", "decentralized")
REJECT_REASONS = (
    "price_changed",
    "unknown_model",
    "capacity",
    "rate_limited",
    "escrow_not_accepted",
    "escrow_invalid",
    "over_budget",
    "unavailable",
    "bad_request",
    "internal",
)
CALL_ERROR_REASONS = (
    "over_budget",
    "context_too_long",
    "max_tokens_too_large",
    "rate_limited",
    "capacity",
    "backend_error",
    "timeout",
    "expired",
    "bad_request",
)
#: why a provider refuses a receipt delivered on ``RECEIPT_PROTOCOL``: ``not_mine`` (it did not
#: sign it), ``bad_signature`` (the consumer's signature does not verify), ``not_sender`` (only the
#: receipt's consumer may deliver it) are final; ``rate_limited`` and ``unavailable`` are not
RECEIPT_REFUSALS = ("not_mine", "bad_signature", "not_sender", "rate_limited", "unavailable")
CLOSE_REASONS = ("done", "expired", "error", "shutdown", "protocol_error")
FINISH_REASONS = ("stop", "length")
#: the finish reason of a cancelled call's receipt: receipt v1's choices are frozen, and a call the
#: consumer cut short ended on the length it chose (docs/PROTOCOL.md, "Cancellation")
CANCELLED_FINISH = "length"
ZERO_HASH = bytes(32)

_SIG = Bytes(max_len=64)  # empty until signed; verification demands exactly 64 bytes
_ID = Bytes(16)
_HASH = Bytes(32)
_T = UInt()  # unix seconds
_AMOUNT = UInt(10**15)  # a billion credits: a bound on any amount
_MODEL = Str(128, min_bytes=1)


# ---- market -------------------------------------------------------------------------------


@record
@dataclasses.dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU in a provider's ``Hardware``: its name and total memory in MB."""

    name: str = wire(Str(128))
    memory_total_mb: int = wire(UInt())


@record
@dataclasses.dataclass(frozen=True, slots=True)
class Hardware:
    """The machine a provider advertises in its ``Listing``: GPUs, CPU count and RAM (0: not
    probed), shown to consumers as the provider reports it."""

    gpus: tuple[Gpu, ...] = wire(ListOf(Nested(Gpu), 16), default=())
    cpu_count: int = wire(UInt(4096), default=0)
    ram_mb: int = wire(UInt(), default=0)


TIERS = ("basic", "premium", "enterprise")


@record
@dataclasses.dataclass(frozen=True, slots=True)
class Tier:
    """A service tier a consumer may choose at open: its own price, concurrency and queue weight."""

    name: str = wire(Str(choices=TIERS))
    price: Price = wire(Nested(Price))
    max_concurrent: int = wire(UInt(1 << 16))
    priority: int = wire(UInt(100), default=1)  # queue weight: 3 gets three times the share of 1


@record
@dataclasses.dataclass(frozen=True, slots=True)
class ModelOffer:
    """One model for sale in a provider's ``Listing``: price, context, limits, its own measured
    speed, tiers and batch discount. ``session_terms`` computes a session's price from it."""

    name: str = wire(_MODEL)
    price: Price = wire(Nested(Price))
    max_context: int = wire(UInt(1 << 24))
    rate_limit_rpm: int = wire(UInt(1 << 20), default=0)  # requests/min per consumer; 0: no limit
    max_concurrent: int = wire(UInt(1 << 16), default=1)  # sessions at once
    tokens_per_s: int = wire(UInt(1 << 24), default=0)  # the provider's own benchmark; 0: not measured yet
    features: tuple[str, ...] = wire(ListOf(Str(32), 16), default=("streaming",))
    tiers: tuple[Tier, ...] = wire(ListOf(Nested(Tier), 3), default=())
    batch_min_calls: int = wire(UInt(1 << 20), default=0)  # a session declaring this many calls or more…
    batch_discount_permille: int = wire(UInt(1000), default=0)  # …pays this much less per token


@message("listing", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """A provider's signed offer; newer ``seq`` replaces older, nothing lives past ``expires_at``."""

    provider: str = wire(PeerId())
    addrs: tuple[str, ...] = wire(ListOf(Str(256), 16))
    seq: int = wire(UInt())
    issued_at: int = wire(_T)
    expires_at: int = wire(_T)
    provider_type: str = wire(Str(choices=PROVIDER_TYPES))
    models: tuple[ModelOffer, ...] = wire(ListOf(Nested(ModelOffer), 32))
    escrow_agents: tuple[str, ...] = wire(ListOf(PeerId(), 16))
    hardware: Hardware = wire(Nested(Hardware))
    sig: bytes = wire(_SIG, default=b"")


# ---- sessions -------------------------------------------------------------------------------


@message("channel", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class ChannelGrant:
    """An escrow channel as the agent signed it: ``cap`` µc locked for one provider until expiry."""

    agent: str = wire(PeerId())
    channel_id: bytes = wire(_ID)
    consumer: str = wire(PeerId())
    provider: str = wire(PeerId())
    cap: int = wire(_AMOUNT)
    expires_at: int = wire(_T)
    budget_id: bytes | None = wire(Optional(_ID), default=None)
    sig: bytes = wire(_SIG, default=b"")


@message("session_open", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class Open:
    """The consumer's signed first message on a session stream: the model and listing seq it answers,
    the price it offers (``session_terms``), the agent-signed channel that pays, and its spend
    limit. The provider answers ``Accept`` or ``Reject``."""

    session_id: bytes = wire(_ID)
    consumer: str = wire(PeerId())
    provider: str = wire(PeerId())
    model: str = wire(_MODEL)
    listing_seq: int = wire(UInt())
    price: Price = wire(Nested(Price))
    channel: ChannelGrant = wire(Nested(ChannelGrant))
    spend_limit: int = wire(_AMOUNT)
    issued_at: int = wire(_T)
    tier: str = wire(Str(choices=("",) + TIERS), default="")  # "": the offer's own price and queue
    batch_calls: int = wire(UInt(1 << 20), default=0)  # calls the consumer declares it will make
    sig: bytes = wire(_SIG, default=b"")


@message("session_accept", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class Accept:
    """The provider's signed terms: these prices hold for the whole session."""

    session_id: bytes = wire(_ID)
    provider: str = wire(PeerId())
    model: str = wire(_MODEL)
    price: Price = wire(Nested(Price))
    max_context: int = wire(UInt(1 << 24))
    spend_cap: int = wire(_AMOUNT)
    accepted_at: int = wire(_T)
    sig: bytes = wire(_SIG, default=b"")


@message("session_reject", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class Reject:
    """The provider's refusal of an ``Open`` (unsigned): a ``REJECT_REASONS`` code, a detail, and
    when to retry; the session ends. Also sent when the Open itself breaks the rules."""

    session_id: bytes = wire(_ID)
    reason: str = wire(Str(choices=REJECT_REASONS))
    detail: str = wire(Str(512), default="")
    retry_after_s: int = wire(UInt(86400), default=0)


@record
@dataclasses.dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of the conversation a ``Request`` carries: who said it (``role``) and what."""

    role: str = wire(Str(choices=("system", "user", "assistant", "tool")))
    content: str = wire(Str(DEFAULT_MAX_MESSAGE))


@message("call_request", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """The consumer's next call on an accepted session: the conversation, ``max_tokens`` and the
    sampling knobs. ``call_seq`` counts from 0; call n+1 is sent only once call n is settled or
    failed."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    messages: tuple[ChatMessage, ...] = wire(ListOf(Nested(ChatMessage), 1024))
    max_tokens: int = wire(UInt(1 << 24))
    temperature_milli: int = wire(UInt(2000), default=1000)
    top_p_milli: int = wire(UInt(1000), default=1000)
    stop: tuple[str, ...] = wire(ListOf(Str(64), 4), default=())
    stream: bool = wire(Bool(), default=True)


@message("call_chunk", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """The provider's next streamed piece of a call's completion (``index`` counts from 0) and its
    token count; the call's receipt bills their sum."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    index: int = wire(UInt())
    text: str = wire(Str(DEFAULT_MAX_MESSAGE))
    tokens: int = wire(UInt(1 << 24))


@message("call_queued", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class CallQueued:
    """The provider's queue holds the call: ``position`` 1 is next. Sent again when it moves."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    position: int = wire(UInt(1 << 20))


@message("call_error", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class CallError:
    """The provider could not (or would not) complete a call: no receipt, nothing charged."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    reason: str = wire(Str(choices=CALL_ERROR_REASONS))
    detail: str = wire(Str(512), default="")


@message("call_cancel", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    """The consumer wants no more of the running call: it received (and pays for) the call's first
    ``chunks`` chunks and nothing after them. The provider stops generating and answers with a
    receipt of exactly that prefix (``cancelled_output_tokens``), or a ``CallError``. Unsigned, as a
    ``Request``: it travels only on the consumer's own session stream."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    chunks: int = wire(UInt())


@message("receipt", 1, signatures=("provider_sig", "consumer_sig"))
@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    """One call's usage. Signed by the provider, counter-signed by the consumer; the doubly-signed
    receipt is the consumer's voucher for ``cumulative`` µc on ``channel_id``."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    model: str = wire(_MODEL)
    provider: str = wire(PeerId())
    consumer: str = wire(PeerId())
    agent: str = wire(PeerId())
    channel_id: bytes = wire(_ID)
    input_hash: bytes = wire(_HASH)
    output_hash: bytes = wire(_HASH)
    tokens_in: int = wire(UInt(1 << 24))
    tokens_out: int = wire(UInt(1 << 24))
    finish_reason: str = wire(Str(choices=FINISH_REASONS))
    price: Price = wire(Nested(Price))
    cost: int = wire(_AMOUNT)
    cumulative: int = wire(_AMOUNT)
    prev_hash: bytes = wire(_HASH)
    issued_at: int = wire(_T)
    discount_permille: int = wire(UInt(1000), default=0)  # e.g. an SLA penalty: cost is this much below price
    provider_sig: bytes = wire(_SIG, default=b"")
    consumer_sig: bytes = wire(_SIG, default=b"")


@message("receipt_countersign", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class CounterSign:
    """The consumer's signature (role ``consumer``) over the receipt named by ``receipt_hash``."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    receipt_hash: bytes = wire(_HASH)
    consumer_sig: bytes = wire(Bytes(64))


@message("receipt_ack", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class CounterSignAck:
    """The provider's signed word that it has stored the doubly-signed receipt ``receipt_hash``
    (durably: it can claim it). Sent on the session after a ``CounterSign``, and on
    ``RECEIPT_PROTOCOL`` after a redelivered receipt; until it comes the consumer's call is not done."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    receipt_hash: bytes = wire(_HASH)
    sig: bytes = wire(_SIG, default=b"")


@message("receipt_refused", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class ReceiptRefused:
    """The provider's refusal (unsigned) of a receipt redelivered on ``RECEIPT_PROTOCOL``: a
    ``RECEIPT_REFUSALS`` code, a detail, and when to try again."""

    receipt_hash: bytes = wire(_HASH)
    reason: str = wire(Str(choices=RECEIPT_REFUSALS))
    detail: str = wire(Str(512), default="")
    retry_after_s: int = wire(UInt(86400), default=0)


# ---- escrow (each request signed by the party it acts for; answers signed by the agent) ------


@record
@dataclasses.dataclass(frozen=True, slots=True)
class Balance:
    """A party's credits at an escrow agent: ``available`` to spend or withdraw, and ``locked`` in
    its open channels and budgets."""

    available: int = wire(_AMOUNT)
    locked: int = wire(_AMOUNT)


@record
@dataclasses.dataclass(frozen=True, slots=True)
class ChannelState:
    """One escrow channel as its agent reports it: the current signed grant, what the provider
    has claimed so far, and whether it is ``open``, ``closed`` or ``refunded``."""

    channel: ChannelGrant = wire(Nested(ChannelGrant))
    claimed: int = wire(_AMOUNT)
    status: str = wire(Str(choices=("open", "closed", "refunded")))


@record
@dataclasses.dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget as its agent reports it: a funder's pot that whitelisted consumers open channels
    on, each up to ``per_session_limit``, until it expires or is refunded."""

    budget_id: bytes = wire(_ID)
    funder: str = wire(PeerId())
    amount: int = wire(_AMOUNT)  # funded in total
    remaining: int = wire(_AMOUNT)  # not yet drawn into channels
    whitelist: tuple[str, ...] = wire(ListOf(PeerId(), 1024))
    per_session_limit: int = wire(_AMOUNT)
    expires_at: int = wire(_T)
    status: str = wire(Str(choices=("active", "refunded")))


def _escrow_request(kind: str, signatures: tuple[str, ...] = ("sig",)):
    return message(f"escrow_{kind}", 1, signatures=signatures)


@_escrow_request("mint")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowMint:
    """The agent operator's request to create ``amount`` µc for ``to`` (the devnet rail); the agent
    refuses anyone but its operators."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())  # the agent's operator
    to: str = wire(PeerId())
    amount: int = wire(_AMOUNT)
    issued_at: int = wire(_T)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("open")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowOpen:
    """The consumer's request to lock ``cap`` µc, from its balance or a budget, in a new channel
    to ``provider`` until ``expires_at``; the answer's ``channels`` holds its signed grant."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())  # the consumer
    provider: str = wire(PeerId())
    cap: int = wire(_AMOUNT)
    expires_at: int = wire(_T)
    budget_id: bytes | None = wire(Optional(_ID), default=None)
    issued_at: int = wire(_T, default=0)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("topup")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowTopUp:
    """The consumer's request to add ``add`` µc to its open channel and/or move its expiry later;
    the agent re-signs the grant."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())  # the consumer
    channel_id: bytes = wire(_ID)
    add: int = wire(_AMOUNT)
    expires_at: int = wire(_T)  # new expiry; never earlier than the current one
    issued_at: int = wire(_T)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("claim")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowClaim:
    """The provider's request to be paid for a doubly-signed receipt: the agent pays its
    ``cumulative`` less what that session has claimed already."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())  # the provider
    receipt: Receipt = wire(Nested(Receipt))
    issued_at: int = wire(_T)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("close", signatures=("consumer_sig", "provider_sig"))
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowClose:
    """Cooperative close: both parties sign; the agent settles ``receipt`` and refunds the rest."""

    request_id: bytes = wire(_ID)
    channel_id: bytes = wire(_ID)
    receipt: Receipt | None = wire(Optional(Nested(Receipt)))
    issued_at: int = wire(_T)
    consumer_sig: bytes = wire(_SIG, default=b"")
    provider_sig: bytes = wire(_SIG, default=b"")


@_escrow_request("refund")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowRefund:
    """The consumer's request to take back what its channel still holds, once the channel has
    expired without a cooperative close."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())  # the consumer, after expiry
    channel_id: bytes = wire(_ID)
    issued_at: int = wire(_T)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("withdraw")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowWithdraw:
    """A party's request to take ``amount`` µc of its available balance out of the agent's ledger."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())
    amount: int = wire(_AMOUNT)
    issued_at: int = wire(_T)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("budget_create")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowBudgetCreate:
    """A funder's request to lock ``amount`` µc in a budget: the consumers on its ``whitelist``
    open channels on it, each up to ``per_session_limit``, until ``expires_at``."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())  # the funder
    amount: int = wire(_AMOUNT)
    whitelist: tuple[str, ...] = wire(ListOf(PeerId(), 1024))
    per_session_limit: int = wire(_AMOUNT)
    expires_at: int = wire(_T)
    issued_at: int = wire(_T)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("budget_refund")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowBudgetRefund:
    """The funder's request to end its budget and take back what it still holds."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())  # the funder
    budget_id: bytes = wire(_ID)
    issued_at: int = wire(_T)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("query")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowQuery:
    """A party asks its balance and channels, or (``channel_id``) one channel's state."""

    request_id: bytes = wire(_ID)
    party: str = wire(PeerId())
    channel_id: bytes | None = wire(Optional(_ID), default=None)
    issued_at: int = wire(_T, default=0)
    sig: bytes = wire(_SIG, default=b"")


@_escrow_request("response")
@dataclasses.dataclass(frozen=True, slots=True)
class EscrowResponse:
    """The agent's signed answer to the request ``request_id``."""

    request_id: bytes = wire(_ID)
    agent: str = wire(PeerId())
    ok: bool = wire(Bool())
    error: str = wire(Str(64), default="")
    detail: str = wire(Str(512), default="")
    balance: Balance | None = wire(Optional(Nested(Balance)), default=None)
    channels: tuple[ChannelState, ...] = wire(ListOf(Nested(ChannelState), 1024), default=())
    budgets: tuple[BudgetState, ...] = wire(ListOf(Nested(BudgetState), 256), default=())
    paid: int = wire(_AMOUNT, default=0)
    budget_id: bytes | None = wire(Optional(_ID), default=None)
    issued_at: int = wire(_T, default=0)
    sig: bytes = wire(_SIG, default=b"")


# ---- session close (after the escrow messages it can carry) --------------------------------


@message("session_close", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """Either party's signed end of a session, naming the last settled receipt and the cumulative
    cost. The consumer's may carry its half of a cooperative ``EscrowClose``."""

    session_id: bytes = wire(_ID)
    by: str = wire(PeerId())
    reason: str = wire(Str(choices=CLOSE_REASONS))
    last_receipt_hash: bytes = wire(_HASH)
    cumulative: int = wire(_AMOUNT)
    issued_at: int = wire(_T)
    # the consumer's half of a cooperative escrow close (final receipt included): the provider
    # adds its signature and submits it, settling the channel at once
    escrow_close: "EscrowClose | None" = wire(Optional(Nested(EscrowClose)), default=None)
    sig: bytes = wire(_SIG, default=b"")
