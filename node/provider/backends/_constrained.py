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
const, anyOf/allOf/oneOf, $ref to $defs, string min/maxLength, array min/maxItems).
A constraint decides only which tokens may come next; it cannot make random weights stop: an
open-ended value (a free string, an unbounded number, any object) can run to ``max_tokens``,
which ends the call with finish "length" and text that may not parse.

A schema comes from a remote consumer, so it is checked before anything is built for it
(``check_schema``; ``check_call_schema`` for a call's options, which the provider may call
before it admits the call):
- ``pattern`` and ``patternProperties`` are refused: the library compiles a regex lazily, at a
  decoding step, into an automaton that a 26-byte pattern can make exponential (minutes of CPU
  and GBs, review of issue #15). ``format`` is safe: the library ignores it (no regex).
- size: depth <= ``MAX_SCHEMA_DEPTH``, nodes <= ``MAX_SCHEMA_NODES`` (a ``$ref`` target counted
  at each use, so definitions cannot multiply), enum/anyOf/oneOf/allOf/type lists <=
  ``MAX_SCHEMA_WIDTH``, min/max Length/Items/Properties <= ``MAX_SCHEMA_LENGTH``; a recursive
  ``$ref`` is refused (the library expands refs eagerly: a cycle never ends).
- what no value satisfies (minLength > maxLength, minItems > maxItems, minimum > maximum, an
  empty enum, allOf of different types) and what the library would write wrongly (enum or const
  values other than all strings or all numbers, strings that need escapes, ``items`` as a list,
  unknown types) is refused: the library would log a traceback and end the output early, invalid.
At each decoding step (``Constraint.allowed``) the search for the allowed tokens checks, at every
node of the token tree it visits, a deadline (``STEP_SECONDS``: over it, a
``BackendError``) and the caller's stop flag (``ConstraintStopped``). Not bounded: one
``add_character`` of the library's parsers (small once patterns are refused) and the first build
of the tokenizer tables (once per model, seconds). When the library finds no token that may
follow, or a chosen token's text does not fit its parser, it would quietly allow only eos (a
clean "stop" with invalid JSON); here that raises ``ConstraintFailed``, and the decoding loop
ends the output with finish "length".

Each step costs the new token only: a constraint keeps the parser state of the output so far
(the library's ``get_allowed_tokens`` keeps every prefix of it, keyed by the whole token tuple),
and reads the newest token's text from at most ``_WORD_WINDOW`` tokens.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any, Callable, Sequence

from ..._clock import THREAD_CLOCK
from ._base import BackendError, BackendUnsupported

__all__ = [
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_LENGTH",
    "MAX_SCHEMA_NODES",
    "MAX_SCHEMA_WIDTH",
    "STEP_SECONDS",
    "Constraint",
    "ConstraintFailed",
    "ConstraintStopped",
    "TokenizerData",
    "check_call_schema",
    "check_schema",
    "tool_call_schema",
]

STEP_SECONDS = 2.0  # the longest one step's search for the allowed tokens may take
_WORD_WINDOW = 8  # tokens decoded together to read the text of the newest one

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


class ConstraintFailed(Exception):
    """The enforcer gave up: no token may follow the output, or a token's text did not fit."""


class ConstraintStopped(Exception):
    """The caller's stop flag was set during a step's search."""


class Constraint:
    """The allowed next tokens of one constrained generation: ``allowed()`` for the next step,
    ``feed(token)`` once the token is chosen (worker thread; see the module's rules)."""

    def __init__(self, data: TokenizerData, *, schema: dict[str, Any] | None = None,
                 tool_schema: dict[str, Any] | None = None, step_seconds: float | None = None) -> None:
        from lmformatenforcer import (
            CharacterLevelParserConfig,
            JsonSchemaParser,
            SequenceParser,
            StringParser,
        )

        _fix_integers()
        if schema == {} or (schema is None and tool_schema is None):
            schema = {"type": "object"}  # json_object: any object
        check_schema(tool_schema if tool_schema is not None else schema)
        try:
            if tool_schema is not None:
                # "name" before "arguments", as the template writes calls
                ordered = CharacterLevelParserConfig(force_json_field_order=True)
                parser: Any = SequenceParser([StringParser("<tool_call>\n"), JsonSchemaParser(tool_schema, ordered),
                                              StringParser("\n</tool_call>")])
            else:
                parser = JsonSchemaParser(schema)
            self._enforcer = _enforcer_class()(data.get(), parser)
        except BackendUnsupported:
            raise
        except Exception as exc:  # the library rejects a schema with several exception types
            raise BackendUnsupported(f"the JSON schema cannot be enforced: {str(exc)[:200]}") from exc
        self._parser, self._word = parser, []
        self._step_seconds = STEP_SECONDS if step_seconds is None else step_seconds

    def allowed(self, stop: Callable[[], bool] = lambda: False) -> list[int]:
        """The token ids that may come next (eos among them once the output may end).

        Raises:
            BackendError: the search took longer than ``step_seconds``.
            ConstraintStopped: ``stop()`` became true during the search.
            ConstraintFailed: no token may come next.
        """
        from lmformatenforcer.tokenlist import TokenList

        enf, parser = self._enforcer, self._parser
        key = parser.cache_key()
        if key is not None and key in enf.allowed_token_cache:
            return enf.allowed_token_cache[key]
        deadline = THREAD_CLOCK() + self._step_seconds

        def check() -> None:
            if stop():
                raise ConstraintStopped("stopped")
            if THREAD_CLOCK() > deadline:
                raise BackendError(f"a constrained decoding step took over {self._step_seconds:g} s: "
                                        "the JSON schema is too costly for this provider")

        found = TokenList(False, enf.vocab_size)
        enf.check = check
        try:
            enf._collect_allowed_tokens(parser, enf.tokenizer_tree.root, found, parser.shortcut_key())
            done = parser.can_end()
        except (ConstraintStopped, BackendError):
            raise
        except Exception as exc:  # the library's parsers raise many types on states they cannot continue
            raise ConstraintFailed(f"the enforcer cannot continue: {str(exc)[:200]}") from exc
        finally:
            enf.check = _no_check
        tokens = list(found.allowed_tokens)
        if done:
            tokens += enf.eos_token_id if isinstance(enf.eos_token_id, list) else [enf.eos_token_id]
        if not tokens:
            raise ConstraintFailed("the enforcer allows no token after this output")
        if key is not None:
            enf.allowed_token_cache[key] = tokens
        return tokens

    def feed(self, token: int) -> None:
        """Advance past the chosen ``token`` (one of ``allowed()``, not eos).

        Raises:
            ConstraintFailed: the token's text does not fit the parser.
        """
        tree = self._enforcer.tokenizer_tree
        if token in tree.new_word_tokens:
            self._word, text = [token], tree.tokens_to_strs[token]
        else:  # the word's text, read from at most _WORD_WINDOW tokens (a split UTF-8 character settles)
            before = self._word[-(_WORD_WINDOW - 1):]
            self._word = before + [token]
            decode = self._enforcer.decoder
            prev = decode(before) if before else ""
            text = decode(self._word)[len(prev):]
        parser = self._parser
        try:
            for ch in text:
                parser = parser.add_character(ch)
        except Exception as exc:  # as allowed(): the library raises many types
            raise ConstraintFailed(f"the enforcer cannot read {text!r}: {str(exc)[:200]}") from exc
        self._parser = parser


def _no_check() -> None:
    pass


_ENFORCER: Any = None


def _enforcer_class() -> Any:
    """lm-format-enforcer's ``TokenEnforcer`` with a check (``self.check``) at every node its
    token-tree search visits: a step's deadline and the caller's stop flag."""
    global _ENFORCER
    if _ENFORCER is None:
        from lmformatenforcer import TokenEnforcer

        class BoundedEnforcer(TokenEnforcer):  # type: ignore[misc]
            check: Callable[[], None] = staticmethod(_no_check)

            def _collect_allowed_tokens(self, *args: Any) -> None:
                self.check()
                super()._collect_allowed_tokens(*args)

        _ENFORCER = BoundedEnforcer
    return _ENFORCER


def check_call_schema(options: Any) -> None:
    """Check the schema a call's options would constrain its output with (``json_schema``, or the
    forced tool's call body), as ``check_schema``; nothing when the call is unconstrained.

    Raises:
        BackendUnsupported: as ``check_schema``; or the forced function is not among the tools.
    """
    forced = options.forced_tool()
    if forced is not None:
        check_schema(tool_call_schema(options.tools, forced))
    elif options.json_schema() is not None:
        check_schema(options.json_schema())


MAX_SCHEMA_DEPTH = 16  # nested subschemas, $ref targets included
MAX_SCHEMA_NODES = 2000  # subschemas and values, each $ref target counted where it is used
MAX_SCHEMA_WIDTH = 256  # members of one enum, anyOf, oneOf, allOf or type list
MAX_SCHEMA_LENGTH = 4096  # the largest minLength, maxLength, minItems or maxItems
_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_SUBSCHEMA = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")
_SUBSCHEMA_MAPS = ("properties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
_LENGTHS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_PAIRS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
          ("minimum", "maximum"), ("exclusiveMinimum", "maximum"), ("minimum", "exclusiveMaximum"))


def check_schema(schema: Any) -> None:
    """Refuse, before anything is built for it, a JSON schema that is costly for the enforcer or
    that no value can satisfy (the bounds above; the module docstring gives the reasons).

    Raises:
        BackendUnsupported: the first problem found, in one line.
    """
    if not isinstance(schema, dict):
        raise BackendUnsupported(f"a JSON schema is an object, not {_show(schema)}")
    _SchemaWalk(schema).walk(schema, 1, ())


class _SchemaWalk:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root, self.nodes = root, 0

    def _count(self, n: int = 1) -> None:
        self.nodes += n
        if self.nodes > MAX_SCHEMA_NODES:
            raise BackendUnsupported(f"the JSON schema has more than {MAX_SCHEMA_NODES} nodes "
                                     "($ref targets counted where used)")

    def walk(self, node: Any, depth: int, refs: tuple[str, ...]) -> None:
        self._count()
        if depth > MAX_SCHEMA_DEPTH:
            raise BackendUnsupported(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if not isinstance(node, dict):
            raise BackendUnsupported(f"a JSON subschema is an object, not {_show(node)}")
        if "pattern" in node or "patternProperties" in node:
            raise BackendUnsupported("JSON schema patterns are not supported by this provider")
        self._values(node)
        for key in _SUBSCHEMA:
            if key in node:
                if key == "items" and isinstance(node[key], list):
                    raise BackendUnsupported("a JSON schema's items is one schema here, not a list")
                if not isinstance(node[key], bool):
                    self.walk(node[key], depth + 1, refs)
        for key in _SUBSCHEMA_MAPS:
            if key in node:
                members = node[key]
                if not isinstance(members, dict):
                    raise BackendUnsupported(f"a JSON schema's {key} is an object, not {_show(members)}")
                for sub in members.values():
                    if not isinstance(sub, bool):
                        self.walk(sub, depth + 1, refs)
        for key in _SUBSCHEMA_LISTS:
            if key in node:
                for sub in _members(node, key):
                    self.walk(sub, depth + 1, refs)
        for key in ("$defs", "definitions"):  # walked where used (through $ref), only counted here
            if isinstance(node.get(key), dict):
                self._count(len(node[key]))
        if "$ref" in node:
            self.walk(self._target(node["$ref"], refs), depth + 1, refs + (node["$ref"],))

    def _target(self, ref: Any, refs: tuple[str, ...]) -> Any:
        """The definition ``ref`` names, found as lm-format-enforcer finds it (by its last path
        segment, in the root's ``definitions`` if it has them, else its ``$defs``)."""
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise BackendUnsupported(f"a JSON schema $ref is a local '#/$defs/NAME', not {_show(ref)}")
        if ref in refs:
            raise BackendUnsupported(f"the JSON schema's $ref {_show(ref)} is recursive: not supported here")
        defs = self.root.get("definitions") if "definitions" in self.root else self.root.get("$defs")
        name = ref.split("/")[-1]
        if not isinstance(defs, dict) or name not in defs:
            raise BackendUnsupported(f"the JSON schema's $ref {_show(ref)} names no definition")
        return defs[name]

    def _values(self, node: dict[str, Any]) -> None:
        """The schema's own values: types known, enums and consts writable, bounds satisfiable."""
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        if isinstance(kind, list):
            _width(kind, "type")
        if not all(isinstance(k, str) and k in _TYPES for k in kinds) or (isinstance(kind, list) and not kind):
            raise BackendUnsupported(f"the JSON schema type {_show(kind)} is not one of {', '.join(sorted(_TYPES))}")
        if "enum" in node:
            values = node["enum"]
            if not isinstance(values, list):
                raise BackendUnsupported(f"a JSON schema's enum is a list, not {_show(values)}")
            _width(values, "enum")
            if not values:
                raise BackendUnsupported("the JSON schema can never be satisfied: an empty enum")
            self._count(len(values))
            if not (all(isinstance(v, str) for v in values) or all(_is_number(v) for v in values)):
                raise BackendUnsupported("a JSON schema's enum values are all strings or all numbers here")
            for v in values:
                _writable(v, "enum")
        if "const" in node:
            _writable(node["const"], "const")
            if not isinstance(node["const"], str) and not _is_number(node["const"]):
                raise BackendUnsupported("a JSON schema's const is a string or a number here")
        for key in _LENGTHS:
            if key in node:
                value = node[key]
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SCHEMA_LENGTH:
                    raise BackendUnsupported(f"a JSON schema's {key} is an integer from 0 to {MAX_SCHEMA_LENGTH}, "
                                             f"not {_show(value)}")
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in node and not _is_number(node[key]) and not isinstance(node[key], bool):
                raise BackendUnsupported(f"a JSON schema's {key} is a number, not {_show(node[key])}")
        for low, high in _PAIRS:
            a, b = node.get(low), node.get(high)
            strict = "exclusive" in low + high
            if _is_number(a) and _is_number(b) and (a > b or (strict and a == b)):
                raise BackendUnsupported(f"the JSON schema can never be satisfied: {low} {a} "
                                         f"{'>=' if strict else '>'} {high} {b}")
        if "allOf" in node:
            types = [_type_set(s["type"]) for s in _members(node, "allOf") if "type" in s]
            if types and not set.intersection(*types):
                raise BackendUnsupported("the JSON schema can never be satisfied: allOf members of different types")


def _type_set(kind: Any) -> set[str]:
    kinds = {k for k in (kind if isinstance(kind, list) else [kind]) if isinstance(k, str)}
    return kinds | ({"integer"} if "number" in kinds else set())  # an integer is a number


def _members(node: dict[str, Any], key: str) -> list[Any]:
    members = node[key]
    if not isinstance(members, list) or not members:
        raise BackendUnsupported(f"a JSON schema's {key} is a non-empty list of schemas, not {_show(members)}")
    _width(members, key)
    if not all(isinstance(m, dict) for m in members):
        raise BackendUnsupported(f"a JSON schema's {key} lists schemas (objects)")
    return members


def _width(values: list[Any], key: str) -> None:
    if len(values) > MAX_SCHEMA_WIDTH:
        raise BackendUnsupported(f"a JSON schema's {key} has {len(values)} members, more than {MAX_SCHEMA_WIDTH}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _writable(value: Any, key: str) -> None:
    """The enforcer writes an enum or const string verbatim between quotes: no quote, backslash or
    control character (they would need escapes it does not write)."""
    if isinstance(value, str) and any(c in '"\\' or ord(c) < 0x20 for c in value):
        raise BackendUnsupported(f"a JSON schema {key} string with a quote, backslash or control character "
                                 "is not supported here")


def _show(value: Any) -> str:
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return type(value).__name__
