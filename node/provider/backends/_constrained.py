"""Constrained decoding for local models with lm-format-enforcer: the output must be a JSON
object (``response_format`` ``json_object``), a value valid for a JSON schema (``json_schema``), or
one Hermes tool call (``<tool_call>\\n{"name": N, "arguments": ARGS}\\n</tool_call>``) whose
arguments satisfy the named tool's ``parameters`` (``tool_choice`` "required" or a named function,
as vLLM forces a tool choice).

lm-format-enforcer's own transformers integration does not import under transformers 5 (it
imports ``transformers.tokenization_utils.PreTrainedTokenizerBase``), so this module builds its
tokenizer data itself and asks its ``TokenEnforcer`` for the allowed tokens at each step; the
decoding loop masks every other token. Tokens the model's generation config suppresses (the
builtin model's non-printable bytes) are never offered, so output stays valid text.

A trap in the library (0.11.3), fixed here once (``_fix_integers``): an ``integer`` may take an
exponent (``8.784418e8``) and ``-0`` a decimal point, so "schema-valid" output parsed as a float.
Integers now allow digits (and a leading minus) only.

Limits: the schema subset lm-format-enforcer implements (types, properties, required, enum,
const, anyOf/allOf/oneOf, $ref to $defs, string min/maxLength and pattern, array min/maxItems).
A constraint decides only which tokens may come next; it cannot make random weights stop: an
open-ended value (a free string, an unbounded number, any object) can run to ``max_tokens``,
which ends the call with finish "length" and text that may not parse.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Sequence

from ._base import BackendUnsupported

__all__ = ["Constraint", "TokenizerData", "tool_call_schema"]

_DATA_LOCK = threading.Lock()


class TokenizerData:
    """lm-format-enforcer's per-tokenizer tables (built once per model; seconds for a large vocabulary)."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], suppressed: Sequence[int]) -> None:
        self._tokenizer, self._eos, self._suppressed = tokenizer, list(eos_ids), set(suppressed)
        self._data: Any = None

    def get(self) -> Any:
        with _DATA_LOCK:
            if self._data is None:
                self._data = self._build()
            return self._data

    def _build(self) -> Any:
        from lmformatenforcer import TokenEnforcerTokenizerData

        tok = self._tokenizer
        vocab_size = len(tok)
        skip = set(tok.all_special_ids) | self._suppressed | set(self._eos)
        zero = tok.encode("0", add_special_tokens=False)[-1]
        regular = []
        for i in range(vocab_size):
            if i in skip:
                continue
            after_zero = tok.decode([zero, i])[1:]  # the token as it reads mid-text (a leading space kept)
            alone = tok.decode([i])
            if not after_zero:
                continue
            regular.append((i, after_zero, len(after_zero) > len(alone)))

        def decode(ids: list[int]) -> str:
            return tok.decode(ids).rstrip("\ufffd")

        eos: Any = self._eos if len(self._eos) != 1 else self._eos[0]
        return TokenEnforcerTokenizerData(regular, decode, eos, False, vocab_size)


def tool_call_schema(tools: Sequence[dict[str, Any]], forced: str) -> dict[str, Any]:
    """The JSON schema of one Hermes call body: ``{"name": N, "arguments": PARAMETERS}`` for the
    forced tool (``forced`` a name, or ``"*"``: any of ``tools``).

    Raises:
        BackendUnsupported: the forced function is not among the tools.
    """
    options = []
    for tool in tools:
        fn = tool.get("function") or {}
        if forced not in ("*", fn.get("name")):
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": fn.get("name")}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise BackendUnsupported(f"tool_choice names {forced!r}, which is not among the tools")
    return options[0] if len(options) == 1 else {"anyOf": options}


_FIXED = False


def _fix_integers() -> None:
    """Make lm-format-enforcer's integer parsing refuse ``.``, ``e`` and ``E`` (see the module docstring)."""
    global _FIXED
    with _DATA_LOCK:
        if _FIXED:
            return
        from lmformatenforcer.jsonschemaparser import NumberParsingState

        original = NumberParsingState.get_allowed_characters

        def get_allowed_characters(self: Any) -> str:
            allowed = original(self)
            if self.allow_floating_point:
                return allowed
            return "".join(c for c in allowed if c not in ".eE+")  # "+" only ever follows an exponent

        NumberParsingState.get_allowed_characters = get_allowed_characters
        _FIXED = True


class Constraint:
    """The allowed next tokens of one constrained generation (fed the tokens generated so far)."""

    def __init__(self, data: TokenizerData, *, schema: dict[str, Any] | None = None,
                 tool_schema: dict[str, Any] | None = None) -> None:
        from lmformatenforcer import (
            CharacterLevelParserConfig,
            JsonSchemaParser,
            SequenceParser,
            StringParser,
            TokenEnforcer,
        )

        _fix_integers()
        try:
            if tool_schema is not None:
                # "name" before "arguments", as the template writes calls
                ordered = CharacterLevelParserConfig(force_json_field_order=True)
                parser: Any = SequenceParser([StringParser("<tool_call>\n"), JsonSchemaParser(tool_schema, ordered),
                                              StringParser("\n</tool_call>")])
            else:
                parser = JsonSchemaParser(schema or {"type": "object"})
            self._enforcer = TokenEnforcer(data.get(), parser)
        except BackendUnsupported:
            raise
        except Exception as exc:  # the library rejects a schema with several exception types
            raise BackendUnsupported(f"the JSON schema cannot be enforced: {str(exc)[:200]}") from exc

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """The token ids that may come after ``generated`` (the eos token once the output is complete)."""
        return list(self._enforcer.get_allowed_tokens(list(generated)).allowed_tokens)


def check_schema(schema: Any) -> None:
    """Refuse a schema that is not an object before loading anything for it.

    Raises:
        BackendUnsupported: ``schema`` is not a JSON object.
    """
    if not isinstance(schema, dict):
        raise BackendUnsupported(f"a JSON schema is an object, not {json.dumps(schema)[:80]}")
