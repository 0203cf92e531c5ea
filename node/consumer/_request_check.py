"""Whether a call can go on the wire at all, checked before any money moves.

Rules: a call is checked by building the very ``protocol.Request`` it would send — with a dummy
session id and the largest call sequence number, so the real one is never bigger — and encoding
it. A field outside its wire bounds (over 1,024 messages, a role the wire does not carry, content
over 1 MiB, more than 4 ``stop`` strings or one over 64 bytes, ``max_tokens`` over 2^24, sampling
knobs outside 0..2000 / 0..1000 thousandths) is ``InvalidRequest`` naming that field as a dotted
path (``messages.3.role``); fields that each fit but together exceed one frame are
``protocol.MessageTooLarge``. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import protocol

from .._errors import InvalidRequest

__all__ = ["check_call"]

_DUMMY_SESSION = bytes(16)
_LAST_SEQ = (1 << 64) - 1  # the widest call_seq: a real call's encoding is never longer
_PATH = re.compile(r"Request\.([\w.\[\]]+): (.*)", re.DOTALL)


def _field(path: str) -> str:
    """``messages[3].role`` (the codec's path) as ``messages.3.role`` (the HTTP faces' ``param``)."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def check_call(messages: Sequence[dict[str, Any]], max_tokens: int, temperature_milli: int, top_p_milli: int,
               stop: Sequence[str]) -> None:
    """Raise unless a call with these arguments fits the wire's ``Request`` and one frame.

    Args:
        messages: ``{"role", "content"}`` dicts, as the consumer sends them.
        max_tokens, temperature_milli, top_p_milli, stop: the call's limits and sampling knobs.

    Raises:
        InvalidRequest: a field out of the wire's bounds (``.field`` names it, e.g. ``messages.0.content``).
        protocol.MessageTooLarge: every field fits but the whole call is over one frame (1 MiB).
    """
    try:
        chat = tuple(protocol.ChatMessage(role=m.get("role"), content=m.get("content")) for m in messages)
    except AttributeError as exc:  # not a dict
        raise InvalidRequest("messages: each message is an object with role and content", "messages") from exc
    request = protocol.Request(session_id=_DUMMY_SESSION, call_seq=_LAST_SEQ, messages=chat, max_tokens=max_tokens,
                               temperature_milli=temperature_milli, top_p_milli=top_p_milli,
                               stop=tuple(stop) if isinstance(stop, (list, tuple)) else stop, stream=True)
    try:
        protocol.encode(request)
    except protocol.InvalidMessage as exc:
        m = _PATH.match(str(exc))
        field = _field(m.group(1)) if m else None
        raise InvalidRequest(f"{field}: {m.group(2)}" if m else str(exc), field) from exc
    except protocol.MessageTooLarge as exc:
        raise protocol.MessageTooLarge(
            f"the call is too large to send: its messages and stop strings encode to more than the "
            f"{protocol.DEFAULT_MAX_MESSAGE} bytes of one protocol frame ({exc})") from exc
