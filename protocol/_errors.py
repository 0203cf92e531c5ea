"""The protocol package's errors: one root, Local vs Remote.

    ProtocolError                      root of everything protocol/ raises
    ├── LocalProtocolError             we asked for something the rules forbid
    │   ├── IllegalTransition          an action not allowed in the machine's current state
    │   ├── InvalidMessage             a message we built does not fit its field map
    │   ├── MessageTooLarge            a message we built does not fit in one frame
    │   └── SpendLimitReached          the next call cannot fit under the session's cap
    └── RemoteProtocolError            the peer broke the rules; drop what it sent
        ├── DecodeError                bytes that are not a valid message
        │   ├── FrameTooLarge          length prefix over the frame limit (checked before allocating)
        │   ├── BadVarint              overlong or non-minimal varint
        │   ├── MalformedMessage       not msgpack, not canonical, not the envelope
        │   ├── UnknownKind / UnknownVersion
        │   ├── MissingField / ExtraField / WrongFieldType
        ├── BadSignature               a signature that does not verify for the claimed key
        ├── UnexpectedMessage          a message the session cannot take in its state
        ├── TermsMismatch              an accept or message whose ids, model or prices disagree
        ├── Expired                    a listing, channel or session past its expiry
        └── ReceiptError               a receipt the consumer must not counter-sign
            ├── ReceiptHashMismatch    input or output hash differs from what we computed
            ├── ReceiptPriceMismatch   cost is not the pinned-price cost of its token counts
            ├── ReceiptChainBroken     prev hash or cumulative does not continue the chain
            ├── ReceiptOverCap         cumulative cost above the session's spend cap
            └── ReceiptReplay          a receipt for a call already settled

Every class carries a short stable ``code`` (used in logs, counters and reject reasons).
Lower-layer exceptions (msgpack, nacl) are converted here once, with ``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "IllegalTransition",
    "InvalidMessage",
    "MessageTooLarge",
    "SpendLimitReached",
    "DecodeError",
    "FrameTooLarge",
    "BadVarint",
    "MalformedMessage",
    "UnknownKind",
    "UnknownVersion",
    "MissingField",
    "ExtraField",
    "WrongFieldType",
    "BadSignature",
    "UnexpectedMessage",
    "TermsMismatch",
    "Expired",
    "ReceiptError",
    "ReceiptHashMismatch",
    "ReceiptPriceMismatch",
    "ReceiptChainBroken",
    "ReceiptOverCap",
    "ReceiptReplay",
]


class ProtocolError(Exception):
    """Root of every error raised by ``protocol``."""

    code = "protocol_error"


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids."""

    code = "local_error"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""

    code = "remote_error"


class IllegalTransition(LocalProtocolError):
    """A session machine was asked for an action its state does not allow: a request before the
    Accept or during a call, a second open, anything once it is in ERROR, or an Accept at a price
    the consumer did not offer (reject with ``price_changed`` instead)."""

    code = "illegal_transition"


class InvalidMessage(LocalProtocolError):
    """Something this side built breaks the rules: a field outside its wire type (``encode``), a
    signature field the message lacks, a negative token count or a discount outside 0..1000, a
    tier the offer does not sell (``session_terms``), or a channel not from this consumer to
    this provider (``ConsumerSession``)."""

    code = "invalid_message"


class MessageTooLarge(LocalProtocolError):
    """``encode`` or ``frame`` was given a message whose encoding is over the size limit; nothing
    is sent."""

    code = "message_too_large"


class SpendLimitReached(LocalProtocolError):
    """The session's spend cap leaves no room: the consumer cannot pay for even a one-token call
    (``ConsumerSession.request``), or the provider tried to stream or bill more than ``start_call``
    admitted (``chunk``, ``finish_call``)."""

    code = "spend_limit_reached"


class DecodeError(RemoteProtocolError):
    """Bytes from the peer that are not a valid message (the base of the decoding errors below),
    raised by ``decode``, ``FrameReader``, ``decode_listing`` and peer-id parsing."""

    code = "malformed"


class FrameTooLarge(DecodeError):
    """Over the size limit: a frame's length prefix (refused by ``FrameReader`` before it buffers
    the frame), the bytes given to ``decode``, or a listing from the network (``decode_listing``)."""

    code = "oversize"


class BadVarint(DecodeError):
    """A frame's length prefix is a non-minimal varint or longer than 9 bytes (``FrameReader``)."""

    code = "bad_varint"


class MalformedMessage(DecodeError):
    """``decode``: not msgpack, trailing bytes, not the ``{kind, v, body}`` envelope, or not the
    canonical encoding of the message it decodes to."""

    code = "malformed"


class UnknownKind(DecodeError):
    """``decode``: the envelope names a message kind that is not registered."""

    code = "unknown_kind"


class UnknownVersion(DecodeError):
    """``decode``: a registered kind at a version this side does not know (a newer field map)."""

    code = "unknown_version"


class MissingField(DecodeError):
    """``decode``: a message's or nested record's body map lacks a field its version declares."""

    code = "missing_field"


class ExtraField(DecodeError):
    """``decode``: a body map carries a field its version does not declare."""

    code = "extra_field"


class WrongFieldType(DecodeError):
    """A value does not fit its field's declared wire type (type, range, length or choices), or a
    peer id (or key) is not a canonical Ed25519 one; ``encode`` reports the same as ``InvalidMessage``."""

    code = "wrong_type"


class BadSignature(RemoteProtocolError):
    """``verify``: a signature field is missing, not 64 bytes, or does not verify for the key the
    message names (listings, channel grants, opens, accepts, receipts, counter-signatures, closes)."""

    code = "bad_signature"


class UnexpectedMessage(RemoteProtocolError):
    """A well-formed message the session cannot take now: the wrong state or session id, a call or
    chunk out of order, more tokens than ``max_tokens``, a close signed by a third party, or a kind
    ``decode`` was told not to expect here."""

    code = "unexpected_message"


class TermsMismatch(RemoteProtocolError):
    """The peer's terms disagree with ours: an Accept whose provider, model, price or spend cap
    differs from the Open, an Open for another provider or on another pair's channel, a receipt
    naming another model, party or channel, or a listing with a bad lifetime or a model twice."""

    code = "terms_mismatch"


class Expired(RemoteProtocolError):
    """Past its time: a listing expired or issued too far in the future (``check_listing``), or the
    escrow channel expired when the session opens (either side)."""

    code = "expired"


class ReceiptError(RemoteProtocolError):
    """A receipt, or a counter-signature of one, that breaks the receipt rules (the base of the
    reasons below): the consumer does not counter-sign it, so the call is not paid, and the
    machine that saw it moves to ERROR."""

    code = "bad_receipt"


class ReceiptHashMismatch(ReceiptError):
    """A receipt's input or output hash is not that of the request sent or the text streamed, or
    a counter-signature names another receipt than the one pending."""

    code = "receipt_hash_mismatch"


class ReceiptPriceMismatch(ReceiptError):
    """A receipt bills other output tokens than were streamed, more input tokens than the context
    holds, or a cost that is not the pinned price of its tokens less its discount."""

    code = "receipt_price_mismatch"


class ReceiptChainBroken(ReceiptError):
    """A receipt's ``prev_hash`` is not the previous receipt's hash, or its ``cumulative`` is not
    the previous cumulative plus its ``cost``."""

    code = "receipt_chain_broken"


class ReceiptOverCap(ReceiptError):
    """A receipt's ``cumulative`` is above the session's spend cap."""

    code = "receipt_over_cap"


class ReceiptReplay(ReceiptError):
    """A receipt (at the consumer) or counter-signature (at the provider) for a call already settled."""

    code = "receipt_replay"
