"""Tool calls in the Hermes format (Hermes 2 Pro, Qwen2.5, the builtin model): how tool turns are
handed to a chat template and how tool calls are read back out of the model's text.

The format: the template lists the tools (JSON) inside ``<tools></tools>`` in the system turn; the
model calls a tool by writing ``<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>``
(several in a row for parallel calls); a result comes back as a ``tool`` turn. A template uses
this format when its text mentions ``<tool_call>``; no other format is parsed: a model with
another format still gets its tools rendered, and its calls stay text.

Parsing rules (``HermesParser``, fed the model's text piece by piece as it streams):
- text before a ``<tool_call>`` streams as text at once, except a tail that could still become
  the opening tag, which waits for the next piece;
- a complete ``<tool_call>…</tool_call>`` whose body is a JSON object with a string ``name``
  (1..64 bytes) and an object ``arguments`` becomes one call, its arguments the JSON text as the
  model wrote it (what the call's tokens paid for);
  anything else inside the tags — malformed JSON, a missing name — is given back as text, markup
  included, and so is a call cut off by the end of the output;
- whitespace between and after calls is dropped (it is layout, not content).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any, Sequence

__all__ = ["HermesParser", "ParsedCall", "new_call_id", "template_messages", "uses_hermes"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_MAX_NAME = 64


@dataclasses.dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def new_call_id() -> str:
    """A fresh OpenAI-style call id: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


def uses_hermes(chat_template: Any) -> bool:
    """The template (a string, or a dict of named templates) writes Hermes ``<tool_call>`` markup."""
    if isinstance(chat_template, dict):
        return any(uses_hermes(t) for t in chat_template.values())
    return isinstance(chat_template, str) and OPEN in chat_template


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped messages as chat templates expect them: a tool call's ``arguments`` as an
    object (templates write it with ``tojson``) when its JSON text parses as one."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if not calls:
            out.append(dict(m))
            continue
        fixed = []
        for c in calls:
            fn = dict(c.get("function") or {})
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                args = None
            if isinstance(args, dict):
                fn["arguments"] = args
            fixed.append({**c, "function": fn})
        out.append({**m, "tool_calls": fixed})
    return out


def parse_call(body: str) -> ParsedCall | None:
    """The call a ``<tool_call>`` body writes, or None when it is not a well-formed one. Its
    arguments are the JSON text exactly as the model wrote it (``{}`` when it wrote none)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    name, args = doc.get("name"), doc.get("arguments", {})
    if not isinstance(name, str) or not 1 <= len(name.encode()) <= _MAX_NAME or not isinstance(args, dict):
        return None
    raw = _raw_member(body, "arguments")
    return ParsedCall(name, raw if raw is not None else "{}")


_DECODER = json.JSONDecoder()


def _raw_member(text: str, key: str) -> str | None:
    """The source text of the value of top-level member ``key`` of the JSON object ``text``
    (known to parse); the last one when the key repeats, as ``json.loads`` takes it."""
    at, found = text.index("{") + 1, None
    while True:
        at = _skip_space(text, at)
        if text[at] == "}":
            return found
        name, at = _DECODER.raw_decode(text, at)
        at = _skip_space(text, at) + 1  # the colon
        at = _skip_space(text, at)
        _, end = _DECODER.raw_decode(text, at)
        if name == key:
            found = text[at:end]
        at = _skip_space(text, end)
        if text[at] == ",":
            at += 1


def _skip_space(text: str, at: int) -> int:
    while text[at] in " \t\n\r":
        at += 1
    return at


class HermesParser:
    """Splits streamed model text into text and tool calls (see the module's rules)."""

    def __init__(self, names: frozenset[str] | None = None) -> None:
        """``names``: the functions a call may name (the offered tools, or only the forced one); a
        call of any other stays text, markup included (the wire carries only offered calls)."""
        self._names = names
        self._buf = ""
        self._inside = False
        self._held_space = ""  # whitespace after a call, given out only if text follows
        self.calls = 0

    def feed(self, text: str) -> list[str | ParsedCall]:
        """What the text read so far settles: text strings and calls, in order."""
        self._buf += text
        out: list[str | ParsedCall] = []
        while True:
            if self._inside:
                at = self._buf.find(CLOSE)
                if at < 0:
                    return out
                body, self._buf, self._inside = self._buf[:at], self._buf[at + len(CLOSE):], False
                call = parse_call(body)
                if call is None or (self._names is not None and call.name not in self._names):
                    self._text(out, OPEN + body + CLOSE)
                else:
                    self._held_space = ""
                    self.calls += 1
                    out.append(call)
                continue
            at = self._buf.find(OPEN)
            if at >= 0:
                self._text(out, self._buf[:at])
                self._buf, self._inside = self._buf[at + len(OPEN):], True
                continue
            keep = _partial_tag(self._buf)
            self._text(out, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return out

    def close(self) -> list[str | ParsedCall]:
        """What is left at the end of the output (an unfinished call is text)."""
        out: list[str | ParsedCall] = []
        rest = (OPEN if self._inside else "") + self._buf
        self._buf, self._inside = "", False
        self._text(out, rest)
        return out

    def _text(self, out: list[str | ParsedCall], text: str) -> None:
        if not text:
            return
        if self.calls and not text.strip():
            self._held_space += text
            return
        text, self._held_space = self._held_space + text, ""
        if out and isinstance(out[-1], str):
            out[-1] += text
        else:
            out.append(text)


def _partial_tag(text: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
