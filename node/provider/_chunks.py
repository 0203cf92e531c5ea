"""Cutting one backend piece (text, tool-call deltas, logprobs) into call chunks that each fit a
frame with room to spare: text and tool-call arguments at character boundaries, ``_CHUNK_TEXT``
bytes of text and ``_CHUNK_ARGS`` of arguments, ``_CHUNK_DELTAS`` deltas and ``_CHUNK_LOGPROBS``
logprobs a chunk. The first chunk carries the piece's tokens; a long argument continues in deltas
of the same index (``protocol.accumulate_tool_calls`` joins them). Pure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import protocol

__all__ = ["merge_pieces", "wire_pieces"]

_CHUNK_TEXT = 128 << 10
_CHUNK_ARGS = 128 << 10
_CHUNK_DELTAS = 16
_CHUNK_LOGPROBS = 64


def _split_utf8(text: str, size: int) -> list[str]:
    """``text`` in pieces of at most ``size`` UTF-8 bytes, never half a character (``[""]`` for "")."""
    data = text.encode("utf-8")
    out, i = [], 0
    while i < len(data):
        j = min(i + size, len(data))
        while j < len(data) and data[j] & 0xC0 == 0x80:
            j -= 1
        out.append(data[i:j].decode("utf-8"))
        i = j
    return out or [""]


def wire_pieces(text: str, tokens: int, tool_calls: tuple[protocol.ToolCallDelta, ...] = (),
                 logprobs: tuple[protocol.TokenLogprob, ...] = ()) -> list[tuple[str, int, tuple[Any, ...], tuple[Any, ...]]]:
    """One backend piece as ``(text, tokens, tool_calls, logprobs)`` chunks that each fit a frame; the
    first carries the tokens, a long argument continues in deltas of the same index."""
    deltas = []
    for d in tool_calls:
        parts = _split_utf8(d.arguments, _CHUNK_ARGS)
        deltas.append(dataclasses.replace(d, arguments=parts[0]))
        deltas += [protocol.ToolCallDelta(index=d.index, arguments=p) for p in parts[1:]]
    groups: list[tuple[Any, ...]] = []
    group: list[Any] = []
    size = 0
    for d in deltas:
        n = len(d.arguments.encode("utf-8"))
        if group and (len(group) == _CHUNK_DELTAS or size + n > _CHUNK_ARGS):
            groups.append(tuple(group))
            group, size = [], 0
        group.append(d)
        size += n
    if group:
        groups.append(tuple(group))
    texts = _split_utf8(text, _CHUNK_TEXT)
    lps = [tuple(logprobs[i:i + _CHUNK_LOGPROBS]) for i in range(0, len(logprobs), _CHUNK_LOGPROBS)]
    count = max(len(texts), len(groups), len(lps))
    return [(texts[i] if i < len(texts) else "", tokens if i == 0 else 0, groups[i] if i < len(groups) else (),
             lps[i] if i < len(lps) else ()) for i in range(count)]


def merge_pieces(pieces: list[tuple[str, int, tuple[Any, ...], tuple[Any, ...]]]
                 ) -> tuple[str, int, tuple[Any, ...], tuple[Any, ...]]:
    """Backend pieces that waited for the stream, as one: text joined, tokens summed, tool-call
    deltas and logprobs in order (``protocol.accumulate_tool_calls`` joins deltas of one index)."""
    if len(pieces) == 1:
        return pieces[0]
    return ("".join(p[0] for p in pieces), sum(p[1] for p in pieces),
            tuple(d for p in pieces for d in p[2]), tuple(lp for p in pieces for lp in p[3]))
