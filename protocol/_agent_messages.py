"""The wire kinds agents need beyond plain chat: tools, JSON output, logprobs, embeddings.

Rules this module owns (docs/PROTOCOL.md, "Agent calls"):
- Version-1 maps stay frozen: a call with any extra travels as ``call_request`` v2
  (``RequestV2``) and is answered by ``call_chunk`` v2 (``ChunkV2``); a plain call stays v1,
  so old providers keep working. Embeddings are their own kinds (``embed_request``,
  ``embed_result``), answered by the same receipt v1 as chat.
- No floats on the wire: a logprob travels as ``neg_logprob_micro`` = ``-logprob × 10^6``
  rounded; JSON (tool parameters, a response schema) travels as ``canonical_json`` text;
  embedding vectors travel as float32 little-endian bytes, row-major, never as numbers.
- A v2 request's shape (``request_problem``): a legacy ``prompt`` comes without messages or
  tools, and some prompt or message is there; ``tool_choice`` is "", "none", "auto",
  "required" (tools needed) or "function:NAME" naming one of the tools; ``json_schema`` is
  given iff ``response_format`` is "json_schema", and is a JSON object with a string ``name``
  and an object ``schema``; a tool's ``parameters`` ("" or) a JSON object; no JSON text nests
  deeper than ``MAX_JSON_DEPTH`` (32). An embed request has at least one input. The consumer
  never sends a request that breaks them; the provider refuses one (``CallError``
  ``bad_request``) without starting it.
- A streamed tool call is a sequence of ``ToolCallDelta`` pieces (OpenAI's delta shape), only on
  a call that offered tools, whose ``tool_choice`` is not "none", without a ``prompt``
  (``tool_call_problem``): the delta that begins an index gives a non-empty ``id`` and the name
  of one of the tools (the forced one for "function:NAME"); a later delta of the index gives
  neither (so id and name are metered once, and every billed byte is in the accumulated call).
  ``accumulate_tool_calls`` is the one reading of them, and ``call_output_hash`` the one hash of
  what a v2 call produced. ``request_token_bound`` is the one prompt bound of every request kind.
- Embedding vectors are finite (``finite_vectors``): no NaN or infinity is produced or paid for.
Pure: no clock, no I/O.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import math
import sys
from typing import Any, Iterable, Sequence

from ._codec import (
    DEFAULT_MAX_MESSAGE,
    Bool,
    Bytes,
    ListOf,
    Nested,
    Optional,
    Str,
    UInt,
    message,
    pack,
    record,
    wire,
)
from ._messages import ChatMessage, Request
from ._metering import (
    EMBED_INPUT_OVERHEAD,
    MESSAGE_OVERHEAD,
    PROMPT_OVERHEAD,
    TOOL_OVERHEAD,
    TOOLS_OVERHEAD,
    prompt_token_bound,
)

__all__ = [
    "FEATURES",
    "MAX_EMBED_INPUTS",
    "MAX_EMBED_DIMS",
    "MAX_JSON_DEPTH",
    "RESPONSE_FORMATS",
    "ToolCall",
    "Turn",
    "Tool",
    "ToolCallDelta",
    "TopLogprob",
    "TokenLogprob",
    "RequestV2",
    "ChunkV2",
    "EmbedRequest",
    "EmbedResult",
    "canonical_json",
    "accumulate_tool_calls",
    "call_output_hash",
    "embedding_hash",
    "request_token_bound",
    "metered_bytes",
    "is_plain",
    "request_problem",
    "tool_call_problem",
    "finite_vectors",
]

#: the names a ``ModelOffer.features`` may carry (ModelOffer itself is unchanged)
FEATURES = ("streaming", "tools", "json", "logprobs", "embeddings", "completions")
MAX_EMBED_INPUTS = 64  # texts in one embed_request
MAX_EMBED_DIMS = 3072  # dimensions of one vector
MAX_JSON_DEPTH = 32  # nesting of a request's JSON texts (a schema, tool parameters)
RESPONSE_FORMATS = ("", "json_object", "json_schema")
_ROLES = ("system", "user", "assistant", "tool")
_ID = Bytes(16)
_NAME = Str(64)

# ---- records -----------------------------------------------------------------------------------


@record
@dataclasses.dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call of an assistant turn: its id, the function's name, and the arguments as
    the JSON text the model wrote (never re-encoded: the hash covers what was sent)."""

    id: str = wire(_NAME)
    name: str = wire(Str(64, min_bytes=1))
    arguments: str = wire(Str(DEFAULT_MAX_MESSAGE))


@record
@dataclasses.dataclass(frozen=True, slots=True)
class Turn:
    """One message of a ``RequestV2``: a ``ChatMessage`` plus OpenAI's ``name``, the
    ``tool_call_id`` a tool message answers, and an assistant turn's ``tool_calls``."""

    role: str = wire(Str(choices=_ROLES))
    content: str = wire(Str(DEFAULT_MAX_MESSAGE))
    name: str = wire(_NAME, default="")
    tool_call_id: str = wire(_NAME, default="")
    tool_calls: tuple[ToolCall, ...] = wire(ListOf(Nested(ToolCall), 128), default=())


@record
@dataclasses.dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: ``parameters`` is the ``canonical_json`` of its JSON-schema
    object ("" = none)."""

    name: str = wire(Str(64, min_bytes=1))
    description: str = wire(Str(8192), default="")
    parameters: str = wire(Str(65536), default="")
    strict: bool = wire(Bool(), default=False)


@record
@dataclasses.dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A streamed piece of tool call ``index``: its first piece names ``id`` and ``name``, later
    ones append to ``arguments`` (OpenAI's delta shape)."""

    index: int = wire(UInt(127))
    id: str = wire(_NAME, default="")
    name: str = wire(_NAME, default="")
    arguments: str = wire(Str(DEFAULT_MAX_MESSAGE), default="")


@record
@dataclasses.dataclass(frozen=True, slots=True)
class TopLogprob:
    """An alternative token and its ``-logprob × 10^6`` (rounded; logprob <= 0)."""

    token: str = wire(Str(256))
    neg_logprob_micro: int = wire(UInt(1 << 40))


@record
@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token, its ``-logprob × 10^6`` and the most likely alternatives."""

    token: str = wire(Str(256))
    neg_logprob_micro: int = wire(UInt(1 << 40))
    top: tuple[TopLogprob, ...] = wire(ListOf(Nested(TopLogprob), 20), default=())


# ---- messages ----------------------------------------------------------------------------------


@message("call_request", 2)
@dataclasses.dataclass(frozen=True, slots=True)
class RequestV2:
    """A call with what agents ask beyond plain chat: tools, a response format, a seed, logprobs,
    or a legacy completion (``prompt``: continue this raw text; ``messages`` and ``tools`` are
    then empty). Answered by ``ChunkV2``s. The first eight fields are v1's, with the same bounds."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    messages: tuple[Turn, ...] = wire(ListOf(Nested(Turn), 1024))
    max_tokens: int = wire(UInt(1 << 24))
    temperature_milli: int = wire(UInt(2000), default=1000)
    top_p_milli: int = wire(UInt(1000), default=1000)
    stop: tuple[str, ...] = wire(ListOf(Str(64), 4), default=())
    stream: bool = wire(Bool(), default=True)
    tools: tuple[Tool, ...] = wire(ListOf(Nested(Tool), 128), default=())
    tool_choice: str = wire(Str(80), default="")  # "" | "none" | "auto" | "required" | "function:NAME"
    response_format: str = wire(Str(choices=RESPONSE_FORMATS), default="")
    json_schema: str = wire(Str(65536), default="")  # canonical_json of OpenAI's json_schema object
    seed: int | None = wire(Optional(UInt()), default=None)
    logprobs: bool = wire(Bool(), default=False)
    top_logprobs: int = wire(UInt(20), default=0)
    user: str = wire(Str(256), default="")
    prompt: str | None = wire(Optional(Str(DEFAULT_MAX_MESSAGE)), default=None)


@message("call_chunk", 2)
@dataclasses.dataclass(frozen=True, slots=True)
class ChunkV2:
    """A streamed piece of a v2 call: v1's fields, then tool-call deltas and the logprobs of
    the piece's tokens. Sent iff the call's request was a ``RequestV2``."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    index: int = wire(UInt())
    text: str = wire(Str(DEFAULT_MAX_MESSAGE))
    tokens: int = wire(UInt(1 << 24))
    tool_calls: tuple[ToolCallDelta, ...] = wire(ListOf(Nested(ToolCallDelta), 16), default=())
    logprobs: tuple[TokenLogprob, ...] = wire(ListOf(Nested(TokenLogprob), 1024), default=())


@message("embed_request", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class EmbedRequest:
    """An embeddings call: one vector per input text (at least one), of ``dimensions`` dimensions
    (0: the model's own). Answered by one ``EmbedResult``, then a receipt billing input tokens only."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    inputs: tuple[str, ...] = wire(ListOf(Str(DEFAULT_MAX_MESSAGE), MAX_EMBED_INPUTS))
    dimensions: int = wire(UInt(MAX_EMBED_DIMS), default=0)


@message("embed_result", 1)
@dataclasses.dataclass(frozen=True, slots=True)
class EmbedResult:
    """The vectors of an ``EmbedRequest``: float32 little-endian, row-major, exactly
    ``len(inputs) * dims * 4`` bytes; the receipt's output hash is ``embedding_hash``."""

    session_id: bytes = wire(_ID)
    call_seq: int = wire(UInt())
    dims: int = wire(UInt(MAX_EMBED_DIMS))
    vectors: bytes = wire(Bytes(max_len=MAX_EMBED_INPUTS * MAX_EMBED_DIMS * 4))


# ---- pure helpers ------------------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj`` on the wire: sorted keys, no spaces, UTF-8, no NaN.

    Raises:
        ValueError: ``obj`` holds NaN or an infinity. TypeError: it is not JSON.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def accumulate_tool_calls(deltas: Iterable[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """The tool calls a stream of deltas spells, by index ascending: the first non-empty ``id`` and
    ``name`` of an index win, its ``arguments`` are concatenated in order."""
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    args: dict[int, list[str]] = {}
    for d in deltas:
        args.setdefault(d.index, []).append(d.arguments)
        if d.id and not ids.get(d.index):
            ids[d.index] = d.id
        if d.name and not names.get(d.index):
            names[d.index] = d.name
    return tuple(ToolCall(id=ids.get(i, ""), name=names.get(i, ""), arguments="".join(args[i])) for i in sorted(args))


def call_output_hash(text: str, tool_calls: Sequence[ToolCall] = ()) -> bytes:
    """The receipt's ``output_hash`` of a chat call: sha256 of the UTF-8 text when it made no tool
    calls (v1's ``output_hash``), else sha256 of ``msgpack([text, [[id, name, arguments], ...]])``."""
    if not tool_calls:
        return hashlib.sha256(text.encode("utf-8")).digest()
    return hashlib.sha256(pack([text, [[c.id, c.name, c.arguments] for c in tool_calls]])).digest()


def embedding_hash(dims: int, vectors: bytes) -> bytes:
    """The receipt's ``output_hash`` of an embeddings call."""
    return hashlib.sha256(b"inferswarm/embeddings/v1\0" + dims.to_bytes(4, "big") + vectors).digest()


def _b(text: str) -> int:
    return len(text.encode("utf-8"))


def request_token_bound(request: Request | RequestV2 | EmbedRequest, max_context: int | None = None) -> int:
    """The most input tokens a call of ``request`` may bill (docs/PROTOCOL.md, "Metering").

    Args:
        max_context: the session's accepted context. It caps each input of an embeddings call
            (the model truncates an input past it): both session machines pass it. Without it
            (a caller with no session yet, estimating a cost) the bound is the uncapped one,
            never below the capped one. A chat call's bound does not depend on it (its whole
            prompt is checked against the context apart).
    """
    if isinstance(request, Request):
        return prompt_token_bound((m.role, m.content) for m in request.messages)
    if isinstance(request, EmbedRequest):
        cap = max_context if max_context is not None else 1 << 62
        return sum(min(EMBED_INPUT_OVERHEAD + _b(t), cap) for t in request.inputs)
    turns = sum(MESSAGE_OVERHEAD + _b(t.role) + _b(t.content) + _b(t.name) + _b(t.tool_call_id)
                + sum(_b(c.id) + _b(c.name) + _b(c.arguments) for c in t.tool_calls) for t in request.messages)
    # a template renders each tool as spaced JSON in a wrapper: up to twice its compact bytes
    tools = (TOOLS_OVERHEAD + sum(TOOL_OVERHEAD + 2 * (_b(t.name) + _b(t.description) + _b(t.parameters))
                                  for t in request.tools)) if request.tools else 0
    return PROMPT_OVERHEAD + turns + tools + _b(request.json_schema) + _b(request.prompt or "")


def metered_bytes(text: str, tool_calls: Iterable[ToolCallDelta] = ()) -> int:
    """A chunk's "text bytes" for every rule that counts them: its text and its deltas' id, name
    and arguments (UTF-8). Only the delta that begins a tool call may give an id and a name
    (``tool_call_problem``), so they are metered once per call."""
    return _b(text) + sum(_b(d.id) + _b(d.name) + _b(d.arguments) for d in tool_calls)


def is_plain(turn: ChatMessage | Turn) -> bool:
    """True when ``turn`` says nothing a v1 ``ChatMessage`` cannot."""
    return isinstance(turn, ChatMessage) or not (turn.name or turn.tool_call_id or turn.tool_calls)


_CHOICES = ("", "none", "auto", "required")


def request_problem(request: Request | RequestV2 | EmbedRequest) -> str:
    """Why ``request`` breaks the shape rules of its kind ("" when it does not)."""
    if isinstance(request, EmbedRequest):
        return "" if request.inputs else "an embeddings call needs at least one input"
    if isinstance(request, Request):
        return ""
    if request.prompt is not None and (request.messages or request.tools):
        return "a completion prompt comes without messages or tools"
    if request.prompt is None and not request.messages:
        return "a call needs messages or a prompt"
    choice = request.tool_choice
    if choice not in _CHOICES:
        name = choice.removeprefix("function:")
        if name == choice or not name:
            return f"tool_choice {choice!r:.90} is not none, auto, required or function:NAME"
        if name not in {t.name for t in request.tools}:
            return f"tool_choice names {name!r}, which is not one of the tools"
    elif choice == "required" and not request.tools:
        return "tool_choice required needs tools"
    if (request.response_format == "json_schema") != bool(request.json_schema):
        return "json_schema is given with response_format json_schema, and only then"
    if request.json_schema:
        schema, problem = _json_object(request.json_schema, "json_schema")
        if problem:
            return problem
        if not isinstance(schema.get("name"), str) or not isinstance(schema.get("schema"), dict):
            return "json_schema is not an object with a string name and an object schema"
    for tool in request.tools:
        if tool.parameters:
            _, problem = _json_object(tool.parameters, f"the parameters of tool {tool.name!r:.70}")
            if problem:
                return problem
    return ""


def _json_object(text: str, what: str) -> tuple[dict, str]:
    """``text`` parsed when it is a JSON object nesting at most ``MAX_JSON_DEPTH`` levels, else
    ``({}, why)``. Deep nesting never recurses here: the parser's own limit is caught, and the
    depth is measured with an explicit stack."""
    try:
        obj = json.loads(text)
    except RecursionError:
        return {}, f"{what} nests deeper than {MAX_JSON_DEPTH} levels"
    except ValueError:
        return {}, f"{what} is not JSON"
    if not isinstance(obj, dict):
        return {}, f"{what} is not a JSON object"
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return {}, f"{what} nests deeper than {MAX_JSON_DEPTH} levels"
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return obj, ""


def tool_call_problem(request: RequestV2, begun: set[int], deltas: Iterable[ToolCallDelta]) -> str:
    """Why ``deltas`` cannot stream on a call of ``request`` whose tool-call indices ``begun`` so
    far have begun ("" when they can: then ``begun`` gains the indices they begin).

    Tool calls come only on a call that offered tools, whose ``tool_choice`` is not "none" and
    that has no ``prompt``. The delta that begins an index gives a non-empty ``id`` and the name
    of one of the tools (exactly the forced one for "function:NAME"); a later delta of the same
    index gives neither. So every accumulated call has an id and an offered name, and every
    billed byte of it is in what the consumer is shown."""
    deltas = tuple(deltas)
    if not deltas:
        return ""
    if not request.tools or request.tool_choice == "none" or request.prompt is not None:
        return "tool calls on a call that offered no tools (or tool_choice none, or a completion prompt)"
    forced = request.tool_choice.startswith("function:")
    names = {request.tool_choice.removeprefix("function:")} if forced else {t.name for t in request.tools}
    new: set[int] = set()
    for d in deltas:
        if d.index in begun or d.index in new:
            if d.id or d.name:
                return f"tool call {d.index} gives its id or name again"
        elif not d.name:
            return f"tool call {d.index} began without the function's name"
        elif not d.id:
            return f"tool call {d.index} began without an id"
        elif d.name not in names:
            return f"tool call {d.index} calls {d.name!r:.70}, which is not " + (
                "the function tool_choice forces" if forced else "one of the tools offered")
        else:
            new.add(d.index)
    begun |= new
    return ""


def finite_vectors(vectors: bytes) -> bool:
    """True when every float32 (little-endian) of ``vectors`` is finite: no NaN, no infinity.
    ``len(vectors)`` is a multiple of 4."""
    floats = array.array("f")
    floats.frombytes(vectors)
    if sys.byteorder != "little":
        floats.byteswap()
    return all(map(math.isfinite, floats))

