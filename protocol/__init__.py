"""Inferswarm's wire protocol: pure, with no I/O, no clock and no networking imports.

Messages (``_messages``) with canonical encoding (``_codec``), framing (``_framing``),
signatures (``_signing``), integer pricing (``_pricing``), the market's listing rule
(``_listing``), the sans-IO session machines (``_session``, ``_consumer``, ``_provider``) and the
protocol ids and gossip topic (``_ids``). Errors: ``_errors``.
"""

from ._codec import DEFAULT_MAX_MESSAGE, decode, encode, registered_kinds
from ._consumer import ConsumerSession, ConsumerState
from ._errors import *  # noqa: F403
from ._errors import __all__ as _errors_all
from ._framing import FrameReader, decode_varint, encode_varint, frame
from ._identity import peer_id_from_public_key, public_key_from_peer_id
from ._ids import DHT_NAMESPACE, ESCROW_PROTOCOL, LISTING_TOPIC, SESSION_PROTOCOL
from ._listing import (
    CLOCK_SKEW_S,
    MAX_LISTING_BYTES,
    MAX_LISTING_TTL_S,
    check_listing,
    decode_listing,
    supersedes,
)
from ._messages import *  # noqa: F403
from ._messages import __all__ as _messages_all
from ._pricing import (
    MICRO_PER_CREDIT,
    Price,
    call_cost,
    discounted,
    expected_call_cost,
    format_credits,
    max_output_tokens_within,
    parse_credits,
)
from ._provider import ProviderSession, ProviderState
from ._session import *  # noqa: F403
from ._session import __all__ as _session_all
from ._signing import Signer, body_hash, domain_tag, sign, signed_bytes, verify
from ._terms import session_terms

__all__ = [
    "SESSION_PROTOCOL",
    "ESCROW_PROTOCOL",
    "LISTING_TOPIC",
    "DHT_NAMESPACE",
    "DEFAULT_MAX_MESSAGE",
    "encode",
    "decode",
    "registered_kinds",
    "FrameReader",
    "frame",
    "encode_varint",
    "decode_varint",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "CLOCK_SKEW_S",
    "MAX_LISTING_BYTES",
    "MAX_LISTING_TTL_S",
    "check_listing",
    "decode_listing",
    "supersedes",
    "MICRO_PER_CREDIT",
    "Price",
    "call_cost",
    "discounted",
    "max_output_tokens_within",
    "parse_credits",
    "format_credits",
    "session_terms",
    "expected_call_cost",
    "Signer",
    "sign",
    "verify",
    "signed_bytes",
    "domain_tag",
    "body_hash",
    *_errors_all,
    *_messages_all,
    *_session_all,
    "ConsumerSession",
    "ConsumerState",
    "ProviderSession",
    "ProviderState",
]
