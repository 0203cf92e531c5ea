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
    code = "illegal_transition"


class InvalidMessage(LocalProtocolError):
    code = "invalid_message"


class MessageTooLarge(LocalProtocolError):
    code = "message_too_large"


class SpendLimitReached(LocalProtocolError):
    code = "spend_limit_reached"


class DecodeError(RemoteProtocolError):
    code = "malformed"


class FrameTooLarge(DecodeError):
    code = "oversize"


class BadVarint(DecodeError):
    code = "bad_varint"


class MalformedMessage(DecodeError):
    code = "malformed"


class UnknownKind(DecodeError):
    code = "unknown_kind"


class UnknownVersion(DecodeError):
    code = "unknown_version"


class MissingField(DecodeError):
    code = "missing_field"


class ExtraField(DecodeError):
    code = "extra_field"


class WrongFieldType(DecodeError):
    code = "wrong_type"


class BadSignature(RemoteProtocolError):
    code = "bad_signature"


class UnexpectedMessage(RemoteProtocolError):
    code = "unexpected_message"


class TermsMismatch(RemoteProtocolError):
    code = "terms_mismatch"


class Expired(RemoteProtocolError):
    code = "expired"


class ReceiptError(RemoteProtocolError):
    code = "bad_receipt"


class ReceiptHashMismatch(ReceiptError):
    code = "receipt_hash_mismatch"


class ReceiptPriceMismatch(ReceiptError):
    code = "receipt_price_mismatch"


class ReceiptChainBroken(ReceiptError):
    code = "receipt_chain_broken"


class ReceiptOverCap(ReceiptError):
    code = "receipt_over_cap"


class ReceiptReplay(ReceiptError):
    code = "receipt_replay"
