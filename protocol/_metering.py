"""What a consumer will counter-sign: the bounds on every count a receipt bills (docs/PROTOCOL.md,
"Metering"). Both machines apply the same rules, so an honest provider never sends a receipt
the consumer refuses, and a dishonest one is never paid past what the consumer can measure.

- **Prompt tokens** are bounded before generation by what the consumer sent:
  ``prompt_token_bound(messages) = 16 + sum(8 + bytes(role) + bytes(content))`` (UTF-8 bytes).
  A byte-level tokenizer with a chat template never needs more; a provider whose tokenizer
  counts more (a template's default system prompt, say) bills the bound, never its own count.
- **Completion tokens** are bounded by the text received: ``tokens_out <= bytes(text) +
  TOKEN_SLACK`` (tokens that decode to nothing, such as skipped special tokens, cost at most
  ``TOKEN_SLACK`` per call), and never more than the chunks claimed in sum.
- **Completion text** is bounded by the tokens asked for and billed: at most
  ``completion_byte_limit(max_tokens)`` bytes may stream in a call (so a provider cannot make a
  consumer hold more), and at most ``MAX_BYTES_PER_TOKEN`` bytes per billed token in the end.
- **A cancelled call** (``Cancel``) bills the prefix the consumer says it received: its chunks'
  claims in sum, but never under one token per ``MAX_BYTES_PER_TOKEN`` bytes of that prefix
  (``cancelled_output_tokens``), so a backend that counts tokens only at the end (an upstream
  server's usage) still bills received text within the rules above.
- **Agent calls** (``request_token_bound``, protocol/_agent_messages.py): a v2 request's bound
  adds each turn's ``name``, ``tool_call_id`` and tool calls, the JSON schema and a legacy
  ``prompt``; when there are tools, ``TOOLS_OVERHEAD`` plus, per tool, ``TOOL_OVERHEAD`` and
  twice the bytes of its name, description and parameters (a template renders each tool as
  spaced JSON inside a wrapper object, which can double its compact bytes). An embeddings
  request bounds each input at ``min(EMBED_INPUT_OVERHEAD + bytes(input), max_context)`` (the
  accepted context: the model truncates past it). A v2 chunk's "text bytes" are its text plus
  the id and name of each delta that begins a tool call and every delta's arguments, for every
  rule above that counts them; a call's logprobs never outnumber its claimed tokens plus
  ``TOKEN_SLACK``.
- **Context**: ``max_context`` is the one in the signed listing the consumer chose from; an
  Accept naming more is refused.
Pure arithmetic on integers: no clock, no I/O.
"""

from __future__ import annotations

from typing import Iterable

__all__ = [
    "PROMPT_OVERHEAD",
    "MESSAGE_OVERHEAD",
    "TOKEN_SLACK",
    "MAX_BYTES_PER_TOKEN",
    "MAX_COMPLETION_BYTES",
    "TOOLS_OVERHEAD",
    "TOOL_OVERHEAD",
    "EMBED_INPUT_OVERHEAD",
    "prompt_token_bound",
    "completion_byte_limit",
    "billable_output_tokens",
    "cancelled_output_tokens",
]

PROMPT_OVERHEAD = 16  # the template's generation prompt
MESSAGE_OVERHEAD = 8  # per message: the template's markers around role and content
TOKEN_SLACK = 16  # completion tokens per call that may decode to no text
MAX_BYTES_PER_TOKEN = 32  # no vocabulary's tokens average more over a whole completion
MAX_COMPLETION_BYTES = 8 << 20  # one call's text, whatever max_tokens says
TOOLS_OVERHEAD = 512  # a chat template's tool preamble, when a request offers tools
TOOL_OVERHEAD = 64  # per tool: its wrapper ({"type": "function", "function": {...}}) and layout
EMBED_INPUT_OVERHEAD = 8  # per embedded text: its special tokens


def prompt_token_bound(messages: Iterable[tuple[str, str]]) -> int:
    """The most prompt tokens a call of these ``(role, content)`` messages may bill."""
    return PROMPT_OVERHEAD + sum(MESSAGE_OVERHEAD + len(role.encode()) + len(content.encode())
                                 for role, content in messages)


def completion_byte_limit(max_tokens: int) -> int:
    """The most completion text (UTF-8 bytes) a call asking for ``max_tokens`` tokens may stream."""
    return min(MAX_COMPLETION_BYTES, max_tokens * MAX_BYTES_PER_TOKEN)


def billable_output_tokens(tokens: int, text_bytes: int) -> int:
    """Of ``tokens`` generated for ``text_bytes`` bytes of text, how many may be billed."""
    return max(0, min(tokens, text_bytes + TOKEN_SLACK))


def cancelled_output_tokens(claimed: int, text_bytes: int) -> int:
    """The completion tokens a cancelled call bills for a received prefix of ``text_bytes`` bytes
    whose chunks claimed ``claimed`` tokens: the claims, raised to one token per
    ``MAX_BYTES_PER_TOKEN`` bytes (a backend that claims its count only at the end has claimed
    nothing yet). Both machines compute it; it never passes the bounds of ``billable_output_tokens``."""
    return max(claimed, -(-text_bytes // MAX_BYTES_PER_TOKEN))
