"""Whether a call can go on the wire at all, checked before any money moves.

Rules: a call is checked by building the very request it would send — a ``protocol.Request`` for
a plain chat, a ``protocol.RequestV2`` once it carries tools, a response format, logprobs, a seed,
a user, a legacy prompt or a message with a name, tool call id or tool calls (as
``ConsumerSession.request`` chooses), a ``protocol.EmbedRequest`` for each batch of an embeddings
call — with a dummy session id and the largest call sequence number, so the real one is never
bigger, and encoding it. A field outside its wire bounds (over 1,024 messages, a role the wire
does not carry, content over 1 MiB, more than 4 ``stop`` strings or one over 64 bytes,
``max_tokens`` over 2^24, sampling knobs outside 0..2000 / 0..1000 thousandths, over 128 tools, a
tool's parameters over 64 KiB, ``top_logprobs`` over 20) is ``InvalidRequest`` naming that field
as a dotted path (``messages.3.role``); fields that each fit but together exceed one frame are
``protocol.MessageTooLarge``. ``tool_choice`` must name a function ``tools`` defines. Embeddings
inputs are split into calls of at most ``MAX_EMBED_INPUTS`` inputs and one frame each
(``embed_batches``). Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import protocol

from .._calls import CallOptions, request_fields
from .._errors import InvalidRequest

__all__ = ["check_call", "embed_batches"]

_DUMMY_SESSION = bytes(16)
_LAST_SEQ = (1 << 64) - 1  # the widest call_seq: a real call's encoding is never longer
_PATH = re.compile(r"(?:Request|RequestV2|EmbedRequest)\.([\w.\[\]]+): (.*)", re.DOTALL)
_V2_DEFAULTS: dict[str, Any] = {"tools": (), "tool_choice": "", "response_format": "", "json_schema": "",
                                "seed": None, "logprobs": False, "top_logprobs": 0, "user": "", "prompt": None}
# a wire path's parts where the OpenAI body nests them deeper (the HTTP faces' ``param``)
_OPENAI_PATH = ((re.compile(r"^tools\.(\d+)\.(name|description|parameters|strict)"), r"tools.\1.function.\2"),
                (re.compile(r"^messages\.(\d+)\.tool_calls\.(\d+)\.(name|arguments)"),
                 r"messages.\1.tool_calls.\2.function.\3"),
                (re.compile(r"^inputs"), "input"), (re.compile(r"^json_schema"), "response_format.json_schema"))
_FRAME_MARGIN = 512  # bytes of an EmbedRequest besides its inputs' text (ids, lengths, the envelope)


def _field(path: str) -> str:
    """``messages[3].role`` (the codec's path) as ``messages.3.role`` (the HTTP faces' ``param``)."""
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    for pattern, repl in _OPENAI_PATH:
        path = pattern.sub(repl, path)
    return path


def _encoded(request: Any) -> None:
    """Raise unless ``request`` encodes within the wire's bounds and one frame."""
    try:
        protocol.encode(request)
    except protocol.InvalidMessage as exc:
        m = _PATH.match(str(exc))
        field = _field(m.group(1)) if m else None
        raise InvalidRequest(f"{field}: {m.group(2)}" if m else str(exc), field) from exc
    except protocol.MessageTooLarge as exc:
        raise protocol.MessageTooLarge(
            f"the call is too large to send: it encodes to more than the {protocol.DEFAULT_MAX_MESSAGE} bytes "
            f"of one protocol frame ({exc})") from exc


def _plain(message: Any) -> bool:
    return isinstance(message, protocol.ChatMessage) or not (message.name or message.tool_call_id
                                                             or message.tool_calls)


def _turn(message: Any) -> protocol.Turn:
    if isinstance(message, protocol.Turn):
        return message
    return protocol.Turn(role=message.role, content=message.content)


def check_call(messages: Sequence[dict[str, Any]], max_tokens: int, temperature_milli: int, top_p_milli: int,
               stop: Sequence[str], options: CallOptions = CallOptions()) -> protocol.Request | protocol.RequestV2:
    """Raise unless a call with these arguments fits the wire's request and one frame.

    Args:
        messages: OpenAI-shaped dicts (``role``, ``content``; ``name``, ``tool_call_id``,
            ``tool_calls`` when present), as the consumer sends them.
        max_tokens, temperature_milli, top_p_milli, stop: the call's limits and sampling knobs.
        options: what else the call asks (tools, a response format, logprobs, …).

    Returns:
        The request the call would send (with a dummy session id): ``protocol.request_token_bound``
        of it is the most prompt tokens it can be billed.

    Raises:
        InvalidRequest: a field out of the wire's bounds (``.field`` names it, e.g. ``messages.0.content``).
        protocol.MessageTooLarge: every field fits but the whole call is over one frame (1 MiB).
    """
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("messages: each message is an object with role and content", "messages")
    names = {t.get("function", {}).get("name") for t in options.tools if isinstance(t, dict)}
    forced = options.forced_tool()
    if forced not in (None, "*") and forced not in names:
        raise InvalidRequest(f"tool_choice: names function {forced!r}, which tools does not define", "tool_choice")
    if not options.tools and (options.tool_choice == "required" or isinstance(options.tool_choice, dict)):
        raise InvalidRequest("tool_choice: a forced tool call needs tools to choose from", "tool_choice")
    try:
        fields = request_fields(list(messages), options)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a message or option of the wrong shape
        text = str(exc)
        field = next((f for f in ("tool_choice", "response_format") if text.startswith(f)),
                     "tools" if text.startswith("each tool") else None)
        raise InvalidRequest(text if field else f"the call cannot be sent: {text}", field) from exc
    except protocol.InvalidMessage as exc:
        m = _PATH.match(str(exc))
        field = _field(m.group(1)) if m else None
        raise InvalidRequest(f"{field}: {m.group(2)}" if m else str(exc), field) from exc
    chat = tuple(fields.pop("messages"))
    stop = tuple(stop) if isinstance(stop, (list, tuple)) else stop
    common = dict(session_id=_DUMMY_SESSION, call_seq=_LAST_SEQ, max_tokens=max_tokens,
                  temperature_milli=temperature_milli, top_p_milli=top_p_milli, stop=stop, stream=True)
    extras = {k: v for k, v in fields.items() if k in _V2_DEFAULTS and v != _V2_DEFAULTS[k]}
    try:
        if not extras and all(_plain(m) for m in chat):
            request: Any = protocol.Request(messages=tuple(protocol.ChatMessage(role=m.role, content=m.content)
                                                           for m in chat), **common)
        else:
            request = protocol.RequestV2(messages=tuple(_turn(m) for m in chat), **common, **extras)
    except protocol.InvalidMessage as exc:  # a record refusing its value at construction
        m = _PATH.match(str(exc))
        field = _field(m.group(1)) if m else None
        raise InvalidRequest(f"{field}: {m.group(2)}" if m else str(exc), field) from exc
    problem = protocol.request_problem(request)  # the shape rules the machines hold a call to
    if problem:
        raise InvalidRequest(problem, "tool_choice" if "tool_choice" in problem else
                             "response_format" if "json_schema" in problem or "format" in problem else
                             "tools" if "tool" in problem else None)
    _encoded(request)
    return request


def embed_batches(inputs: Sequence[str], dimensions: int = 0) -> list[tuple[str, ...]]:
    """``inputs`` split into the calls an embeddings request makes, in order: at most
    ``protocol.MAX_EMBED_INPUTS`` inputs each, and each call within one frame; each checked as
    the ``EmbedRequest`` it will send.

    Raises:
        InvalidRequest: no inputs, an input that is not text or is over 1 MiB (``input.3``), or
            ``dimensions`` outside 0..``MAX_EMBED_DIMS``.
        protocol.MessageTooLarge: one input alone is over one frame.
    """
    if not inputs:
        raise InvalidRequest("input: at least one text to embed", "input")
    if not 0 <= dimensions <= protocol.MAX_EMBED_DIMS:
        raise InvalidRequest(f"dimensions: 0 (the model's own) to {protocol.MAX_EMBED_DIMS}", "dimensions")
    budget = protocol.DEFAULT_MAX_MESSAGE - _FRAME_MARGIN
    batches: list[tuple[str, ...]] = []
    batch: list[str] = []
    size = 0
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise InvalidRequest(f"input.{i}: each input is a string", f"input.{i}")
        try:
            n = len(text.encode("utf-8")) + 5  # its length prefix
        except UnicodeEncodeError:
            raise InvalidRequest(f"input.{i}: not valid UTF-8 text (a lone surrogate)", f"input.{i}") from None
        if n - 5 > protocol.DEFAULT_MAX_MESSAGE:
            raise InvalidRequest(f"input.{i}: {n - 5} bytes of UTF-8, over the {protocol.DEFAULT_MAX_MESSAGE} the "
                                 "wire carries", f"input.{i}")
        if batch and (len(batch) == protocol.MAX_EMBED_INPUTS or size + n > budget):
            batches.append(tuple(batch))
            batch, size = [], 0
        batch.append(text)
        size += n
    batches.append(tuple(batch))
    for b in batches:
        _encoded(protocol.EmbedRequest(session_id=_DUMMY_SESSION, call_seq=_LAST_SEQ, inputs=b,
                                       dimensions=dimensions))
    return batches
