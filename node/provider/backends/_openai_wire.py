"""Reading an OpenAI-compatible upstream's answers (chat and legacy completion events, whole
answers, embeddings) into what the provider streams: text, ``protocol.ToolCallDelta`` pieces and
``protocol.TokenLogprob`` entries.

Rules:
- Whatever the upstream sends is bounded before it is used: a tool call's id and name fit the
  wire's 64 bytes and its arguments ``DEFAULT_MAX_MESSAGE`` bytes, at most 128 calls (indices
  0..127) of which the first piece names the function, a logprob token is cut to 256 bytes and a
  logprob is clamped into the wire's integer range, at most 20 alternatives per token; embeddings
  are exactly one finite float32 row per input, all of one size within ``MAX_EMBED_DIMS``.
- Tool calls are accepted only when the call offered tools (and did not say ``tool_choice: none``).
- Garbage is a ``BackendError`` of one line that says what was wrong and never quotes the upstream.
Pure: JSON in, protocol records out; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import secrets
import struct
from typing import Any

import protocol

from ._base import BackendError

__all__ = ["Piece", "ToolCallReader", "chat_event", "chat_answer", "completion_event", "completion_answer",
           "usage_counts", "embedding_rows", "parse_json", "ErrorEvent"]

_MAX_NEG = 1 << 40  # TokenLogprob.neg_logprob_micro's range
_MAX_TOKEN_BYTES = 256
_MAX_TOP = 20
_MAX_CALLS = 128  # ToolCallDelta.index is 0..127
_MAX_LIST = 4096  # entries of any one list an event may carry (logprobs); the meter bounds the rest
_NAME_BYTES = 64


@dataclasses.dataclass(frozen=True)
class Piece:
    """One streamed piece of an answer: text, tool-call deltas, the logprobs of its tokens, and the
    finish reason when the piece ends the answer."""

    text: str = ""
    tool_calls: tuple[protocol.ToolCallDelta, ...] = ()
    logprobs: tuple[protocol.TokenLogprob, ...] = ()
    finish: str | None = None


def _bad(what: str) -> BackendError:
    return BackendError(f"upstream sent {what}")


def _b(text: str) -> int:
    return len(text.encode("utf-8"))


def parse_json(data: str | bytes, what: str = "an answer that is not JSON") -> Any:
    """``data`` as JSON (NaN and infinities refused).

    Raises:
        BackendError: it is not JSON.
    """
    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(data, parse_constant=refuse)
    except (ValueError, RecursionError):
        raise _bad(what) from None


class ToolCallReader:
    """The tool calls of one answer as they stream: checks each raw delta against the bounds, gives
    every call an id (a synthetic ``call_…`` when the upstream names none) and drops repeated ids
    and names (the first piece of an index names them; ``accumulate_tool_calls`` keeps the first)."""

    def __init__(self, allowed: bool, names: frozenset[str] | None = None) -> None:
        """``names``: the functions a call may name (the offered tools, or only the forced one);
        None: any (a reader of a call whose tools are unknown here)."""
        self.allowed, self.names = allowed, names
        self._args: dict[int, int] = {}  # index -> argument bytes so far

    @property
    def count(self) -> int:
        return len(self._args)

    def read(self, raw: Any, positional: bool = False) -> tuple[protocol.ToolCallDelta, ...]:
        """The deltas of one event's (or a whole message's, ``positional``) ``tool_calls`` list.

        Raises:
            BackendError: tool calls where none were offered, or one outside the bounds.
        """
        if raw is None or raw == []:
            return ()
        if not self.allowed:
            raise _bad("tool calls though the call offered no tools")
        if not isinstance(raw, list) or len(raw) > _MAX_CALLS:
            raise _bad(f"tool calls that are not a list of at most {_MAX_CALLS}")
        out = []
        for pos, item in enumerate(raw):
            if not isinstance(item, dict):
                raise _bad("a tool call that is not an object")
            index = pos if positional or item.get("index") is None else item["index"]
            fn = item.get("function") or {}
            if type(index) is not int or not isinstance(fn, dict):
                raise _bad("a tool call that is not an OpenAI one")
            if not 0 <= index < _MAX_CALLS:
                raise _bad(f"a tool call index outside 0..{_MAX_CALLS - 1}")
            call_id, name, args = item.get("id") or "", fn.get("name") or "", fn.get("arguments") or ""
            if isinstance(args, dict):  # some servers send the object itself
                args = protocol.canonical_json(args)
            if not all(isinstance(v, str) for v in (call_id, name, args)):
                raise _bad("a tool call whose id, name or arguments are not text")
            if _b(call_id) > _NAME_BYTES or _b(name) > _NAME_BYTES:
                raise _bad(f"a tool call id or function name over {_NAME_BYTES} bytes")
            if index not in self._args:
                if not name:
                    raise _bad("a tool call that names no function")
                if self.names is not None and name not in self.names:
                    raise _bad(f"a tool call of {name[:64]!r}, a function the call did not offer")
                self._args[index] = 0
                delta = protocol.ToolCallDelta(index=index, id=call_id or "call_" + secrets.token_hex(12),
                                               name=name, arguments=args)
            elif args:
                delta = protocol.ToolCallDelta(index=index, arguments=args)
            else:
                continue
            self._args[index] += _b(args)
            if self._args[index] > protocol.DEFAULT_MAX_MESSAGE:
                raise _bad(f"tool call arguments over {protocol.DEFAULT_MAX_MESSAGE} bytes")
            out.append(delta)
        return tuple(out)


def _token(value: Any) -> str:
    if not isinstance(value, str):
        raise _bad("a logprob token that is not text")
    return value.encode("utf-8")[:_MAX_TOKEN_BYTES].decode("utf-8", "ignore")


def _neg_micro(value: Any) -> int:
    """``-logprob × 10^6`` rounded, within the wire's range (a positive logprob reads as 0)."""
    if type(value) not in (int, float) or value != value:
        raise _bad("a logprob that is not a number")
    if value >= 0:
        return 0
    return min(round(-value * 1_000_000), _MAX_NEG) if math.isfinite(value) else _MAX_NEG


def _chat_logprobs(raw: Any, top: int | None) -> tuple[protocol.TokenLogprob, ...]:
    """A chat choice's ``logprobs`` (``{"content": [{token, logprob, top_logprobs}]}``); () when
    the call did not ask for them (``top`` None)."""
    if top is None or raw is None:
        return ()
    content = raw.get("content") if isinstance(raw, dict) else None
    if content is None:
        return ()
    if not isinstance(content, list) or len(content) > _MAX_LIST:
        raise _bad("logprobs that are not a list")
    out = []
    for entry in content:
        if not isinstance(entry, dict):
            raise _bad("a logprob that is not an object")
        alts = entry.get("top_logprobs") or []
        if not isinstance(alts, list) or not all(isinstance(a, dict) for a in alts[:top]):
            raise _bad("top_logprobs that are not a list of objects")
        out.append(protocol.TokenLogprob(
            token=_token(entry.get("token")), neg_logprob_micro=_neg_micro(entry.get("logprob")),
            top=tuple(protocol.TopLogprob(token=_token(a.get("token")), neg_logprob_micro=_neg_micro(a.get("logprob")))
                      for a in alts[:min(top, _MAX_TOP)])))
    return tuple(out)


def _completion_logprobs(raw: Any, top: int | None) -> tuple[protocol.TokenLogprob, ...]:
    """A legacy completion choice's ``logprobs`` (``{tokens, token_logprobs, top_logprobs}``)."""
    if top is None or raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _bad("logprobs that are not an object")
    tokens, lps, alts = raw.get("tokens") or [], raw.get("token_logprobs") or [], raw.get("top_logprobs") or []
    if not all(isinstance(x, list) for x in (tokens, lps, alts)) or len(tokens) > _MAX_LIST \
            or len(lps) != len(tokens) or len(alts) not in (0, len(tokens)):
        raise _bad("legacy logprobs whose lists do not match")
    out = []
    for i, token in enumerate(tokens):
        options = alts[i] if alts else {}
        if not isinstance(options, dict) and options is not None:
            raise _bad("legacy top_logprobs that are not objects")
        best = sorted((options or {}).items(), key=lambda kv: kv[1] if type(kv[1]) in (int, float) else 0,
                      reverse=True)[:min(top, _MAX_TOP)]
        out.append(protocol.TokenLogprob(
            token=_token(token), neg_logprob_micro=_neg_micro(lps[i] if lps[i] is not None else 0.0),
            top=tuple(protocol.TopLogprob(token=_token(t), neg_logprob_micro=_neg_micro(v)) for t, v in best)))
    return tuple(out)


def _event(data: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """One event (or whole answer): its usage and the choices of index 0.

    Raises:
        BackendError: not an OpenAI event, or an error event (``error_event``: the caller summarises it).
    """
    event = parse_json(data, "something that is not an OpenAI stream")
    if not isinstance(event, dict):
        raise _bad("an event that is not an object")
    if event.get("error") is not None:
        raise ErrorEvent()
    usage = event.get("usage")
    choices = event.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise _bad("choices that are not a list of objects")
    return (usage if isinstance(usage, dict) else None), [c for c in choices if c.get("index", 0) == 0]


class ErrorEvent(Exception):
    """An error sent as an event of a 200 answer: a signal, not a node error — the backend catches
    it and raises its own redacted ``BackendError`` summary in its place."""


def _finish(choice: dict[str, Any]) -> str | None:
    finish = choice.get("finish_reason")
    if not isinstance(finish, (str, type(None))):
        raise _bad("a finish reason that is not text")
    return finish


def _chat_piece(choice: dict[str, Any], key: str, calls: ToolCallReader, top: int | None) -> Piece:
    body = choice.get(key) or {}
    if not isinstance(body, dict):
        raise _bad("a choice that is not an OpenAI one")
    text = body.get("content") or ""
    if not isinstance(text, str):
        raise _bad("content that is not text")
    return Piece(text, calls.read(body.get("tool_calls"), positional=key == "message"),
                 _chat_logprobs(choice.get("logprobs"), top), _finish(choice))


def chat_event(data: str, calls: ToolCallReader, top: int | None) -> tuple[dict[str, Any] | None, list[Piece]]:
    """One ``/chat/completions`` stream event: its usage (if any) and its pieces.

    Args:
        top: alternatives per token when the call asked for logprobs, else None (any sent are dropped).

    Raises:
        BackendError: garbage or out of bounds.
        ErrorEvent: the upstream sent an error event.
    """
    usage, choices = _event(data)
    return usage, [_chat_piece(c, "delta", calls, top) for c in choices]


def chat_answer(data: str, calls: ToolCallReader, top: int | None) -> tuple[dict[str, Any] | None, list[Piece]]:
    """A whole ``chat.completion`` answer (an upstream that did not stream) as its pieces."""
    usage, choices = _event(data)
    return usage, [_chat_piece(c, "message", calls, top) for c in choices[:1]]


def _completion_piece(choice: dict[str, Any], top: int | None) -> Piece:
    text = choice.get("text") or ""
    if not isinstance(text, str):
        raise _bad("completion text that is not text")
    return Piece(text, (), _completion_logprobs(choice.get("logprobs"), top), _finish(choice))


def completion_event(data: str, top: int | None) -> tuple[dict[str, Any] | None, list[Piece]]:
    """One legacy ``/completions`` stream event (or whole answer): its usage and pieces."""
    usage, choices = _event(data)
    return usage, [_completion_piece(c, top) for c in choices]


completion_answer = completion_event


def usage_counts(usage: dict[str, Any] | None, *, completion: bool = True) -> tuple[int | None, int]:
    """``(prompt_tokens or None, completion_tokens)`` of an upstream's usage.

    Args:
        completion: the answer is a completion (it must say its completion tokens).

    Raises:
        BackendError: no usage, or counts that are not non-negative integers.
    """
    if completion and (not usage or "completion_tokens" not in usage):
        raise BackendError("upstream reported no token usage; it cannot be metered")
    usage = usage or {}
    counts = (usage.get("prompt_tokens"), usage.get("completion_tokens", 0))
    if not all(c is None or (type(c) is int and 0 <= c < 1 << 40) for c in counts) or counts[1] is None:
        raise BackendError("upstream reported token counts that are not counts")
    return counts[0], counts[1]


def _row(raw: Any) -> list[float] | bytes:
    if isinstance(raw, str):  # encoding_format base64: float32 little-endian already
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("an embedding that is neither numbers nor base64") from None
        if not data or len(data) % 4 or len(data) > protocol.MAX_EMBED_DIMS * 4:
            raise _bad("a base64 embedding that is not float32 values")
        if not all(math.isfinite(v) for v in struct.unpack(f"<{len(data) // 4}f", data)):
            raise _bad("an embedding value that is not finite")
        return data
    if not isinstance(raw, list) or not 1 <= len(raw) <= protocol.MAX_EMBED_DIMS:
        raise _bad(f"an embedding that is not 1 to {protocol.MAX_EMBED_DIMS} numbers")
    if not all(type(v) in (int, float) and math.isfinite(v) for v in raw):
        raise _bad("an embedding value that is not a finite number")
    return raw


def embedding_rows(data: bytes, count: int, dimensions: int) -> tuple[bytes, int, int | None]:
    """An ``/embeddings`` answer as ``(vectors, dims, prompt_tokens or None)``: float32 little-endian,
    one row per input in input order.

    Raises:
        BackendError: not one row of one size per input, a value that is not a finite float32, a
            size other than the ``dimensions`` asked for, or usage that is not a count.
    """
    doc = parse_json(data)
    rows = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or len(rows) != count or not all(isinstance(r, dict) for r in rows):
        raise _bad(f"an embeddings answer without exactly {count} rows")
    by_index: dict[int, Any] = {}
    for pos, row in enumerate(rows):
        index = row.get("index", pos)
        if type(index) is not int or not 0 <= index < count or index in by_index:
            raise _bad("embedding rows whose indices are not 0..n-1 once each")
        by_index[index] = _row(row.get("embedding"))
    packed = []
    dims = 0
    for i in range(count):
        row = by_index[i]
        try:
            raw = row if isinstance(row, bytes) else struct.pack(f"<{len(row)}f", *row)
        except (OverflowError, struct.error):
            raise _bad("an embedding value outside float32's range") from None
        dims = dims or len(raw) // 4
        if len(raw) != dims * 4:
            raise _bad("embedding rows of different sizes")
        packed.append(raw)
    if dimensions and dims != dimensions:
        raise BackendError(f"upstream answered {dims} dimensions where {dimensions} were asked")
    tokens, _ = usage_counts(doc.get("usage") if isinstance(doc.get("usage"), dict) else None, completion=False)
    return b"".join(packed), dims, tokens
