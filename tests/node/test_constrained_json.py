"""The builtin model under call options: JSON output by constrained decoding (schema-valid for
json_schema; parseable or cut by max_tokens for json_object), logprobs consistent with their top
alternatives, seeded sampling that repeats, stop strings, and legacy raw-text completions."""

from __future__ import annotations

import json

import pytest
import trio

from node._calls import CallOptions
from node.provider.backends import BackendUnsupported, TransformersBackend
from node.provider.backends._builtin_model import ensure_builtin_model
from tests.node.session_rig import _MODELS

USER = [{"role": "user", "content": "Describe a pet as JSON."}]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "kind": {"enum": ["cat", "dog"]}, "vaccinated": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "kind", "vaccinated"]}


@pytest.fixture(scope="module")
def builtin():
    backend = TransformersBackend("builtin", ensure_builtin_model(_MODELS))
    trio.run(backend.start)
    return backend


async def _run(backend, options=CallOptions(), *, messages=USER, max_tokens=300, temperature=1000, stop=()):
    pieces = []

    async def on_piece(text, tokens, *, tool_calls=(), logprobs=()):
        pieces.append((text, tokens, tuple(logprobs)))

    result = await backend.generate(messages, max_tokens=max_tokens, temperature_milli=temperature,
                                    top_p_milli=1000, stop=stop, on_piece=on_piece, options=options)
    assert result.tokens_out == sum(t for _, t, _ in pieces) <= max_tokens
    return result, "".join(t for t, _, _ in pieces), [lp for _, _, lps in pieces for lp in lps]


def _check_pet(doc) -> None:
    """SCHEMA, checked by hand (jsonschema is not a dependency)."""
    assert isinstance(doc, dict) and {"name", "kind", "vaccinated"} <= set(doc) <= set(SCHEMA["properties"])
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 6
    assert doc["kind"] in ("cat", "dog") and isinstance(doc["vaccinated"], bool)
    assert set(doc.get("tags", [])) <= {"a", "b"} and len(doc.get("tags", [])) <= 2


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_json_schema_output_is_valid_for_its_schema(builtin, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    result, text, _ = await _run(builtin, CallOptions(response_format=fmt, seed=seed))
    assert result.finish_reason == "stop"
    _check_pet(json.loads(text))


@pytest.mark.parametrize("seed", [1, 2])
async def test_json_object_output_is_an_object_or_cut_by_max_tokens(builtin, seed):
    result, text, _ = await _run(builtin, CallOptions(response_format={"type": "json_object"}, seed=seed),
                                 max_tokens=120)
    if result.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert result.finish_reason == "length" and result.tokens_out == 120
    assert text.isascii()


async def test_a_schema_the_enforcer_cannot_read_is_refused(builtin):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}
    with pytest.raises(BackendUnsupported, match="JSON schema"):
        await _run(builtin, CallOptions(response_format=fmt))


@pytest.mark.parametrize("temperature", [0, 800])
async def test_logprobs_come_one_per_token_and_agree_with_their_top(builtin, temperature):
    result, text, lps = await _run(builtin, CallOptions(logprobs=True, top_logprobs=5, seed=9), max_tokens=40,
                                   temperature=temperature)
    assert len(lps) == result.tokens_out and "".join(lp.token for lp in lps) == text
    for lp in lps:
        assert len(lp.top) == 5 and [t.neg_logprob_micro for t in lp.top] == sorted(t.neg_logprob_micro for t in lp.top)
        assert lp.neg_logprob_micro >= lp.top[0].neg_logprob_micro
        if any(t.token == lp.token for t in lp.top):
            assert next(t for t in lp.top if t.token == lp.token).neg_logprob_micro == lp.neg_logprob_micro
        if temperature == 0:  # greedy: the chosen token is the most likely one
            assert lp.neg_logprob_micro == lp.top[0].neg_logprob_micro
    _, _, none = await _run(builtin, CallOptions(seed=9), max_tokens=5)
    assert none == []  # logprobs only when asked


async def test_a_seeded_call_repeats_and_seeds_differ(builtin):
    runs = [(await _run(builtin, CallOptions(seed=s), max_tokens=60, temperature=1000))[1] for s in (42, 42, 43)]
    assert runs[0] == runs[1] != runs[2]
    greedy = [(await _run(builtin, max_tokens=30, temperature=0))[1] for _ in range(2)]
    assert greedy[0] == greedy[1]


async def test_a_stop_string_ends_the_output_before_it(builtin):
    _, free, _ = await _run(builtin, CallOptions(seed=5), max_tokens=60)
    if len(free) < 6:
        pytest.skip("the seeded output is too short to cut")
    stop = free[3:5]
    result, text, _ = await _run(builtin, CallOptions(seed=5), max_tokens=60, stop=(stop,))
    assert result.finish_reason == "stop" and text == free[:free.index(stop)]


async def test_a_legacy_prompt_is_continued_as_raw_text(builtin):
    options = CallOptions(prompt="Once upon a time")
    assert await builtin.count_prompt_tokens([], options) == len("Once upon a time")  # bytes, no template
    result, text, _ = await _run(builtin, options, messages=[], max_tokens=20)
    assert result.tokens_out <= 20 and text.isascii()
    assert await builtin.count_prompt_tokens([], CallOptions(prompt="")) == 1  # continued from the start token


def test_an_integer_takes_no_decimal_point_or_exponent():
    """lm-format-enforcer 0.11.3 let an integer take ``e8`` (and ``-0`` a ``.``): json.loads then
    gave a float for a schema's integer. _constrained._fix_integers removes them."""
    from lmformatenforcer import JsonSchemaParser

    from node.provider.backends._constrained import _fix_integers

    _fix_integers()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}}}
    parser = JsonSchemaParser(schema)
    for ch in '{"n":8':
        parser = parser.add_character(ch)
    assert not set(".eE+") & set(parser.get_allowed_characters()) and "9" in parser.get_allowed_characters()
    parser = JsonSchemaParser(schema)
    for ch in '{"n":-0':
        parser = parser.add_character(ch)
    assert "." not in parser.get_allowed_characters()
    parser = JsonSchemaParser(schema)
    for ch in '{"x":8':  # a number keeps its decimal point and exponent
        parser = parser.add_character(ch)
    assert {".", "e"} <= set(parser.get_allowed_characters())


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_an_integer_field_parses_as_an_int(builtin, seed):
    schema = {"type": "object", "properties": {"degrees": {"type": "integer"}}, "required": ["degrees"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    result, text, _ = await _run(builtin, CallOptions(response_format=fmt, seed=seed), max_tokens=60)
    if result.finish_reason == "stop":
        assert isinstance(json.loads(text)["degrees"], int), text
    else:
        assert not set(".eE") & set(text), text


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _fan_out(width: int, levels: int) -> dict:
    """Definitions that each use the next one ``width`` times: small as text, ``width ** levels`` expanded."""
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * width} for i in range(levels)}
    defs[f"d{levels}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


REFUSED = [
    ({"type": "string", "pattern": "^([a-z]{1,100}){1,100}x$"}, "patterns are not supported"),
    ({"type": "object", "properties": {"p": {"type": "string", "pattern": "a+"}}}, "patterns are not supported"),
    ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patterns are not supported"),
    (_nested(17), "deeper than 16"),
    ({"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(2000)}}, "more than 2000 nodes"),
    (_fan_out(16, 3), "more than 2000 nodes"),
    ({"enum": [f"v{i}" for i in range(257)]}, "enum has 257 members"),
    ({"anyOf": [{"type": "integer"}] * 257}, "anyOf has 257 members"),
    ({"type": "string", "maxLength": 4097}, "maxLength is an integer from 0 to 4096"),
    ({"type": "array", "minItems": 10 ** 9}, "minItems is an integer"),
    ({"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
      "$ref": "#/$defs/n"}, "recursive"),
    ({"$defs": {"n": {"$ref": "#/$defs/n"}}, "$ref": "#/$defs/n"}, "recursive"),
    ({"$defs": {}, "$ref": "#/$defs/missing"}, "names no definition"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "never be satisfied: minLength 5 > maxLength 2"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "never be satisfied: minItems 3 > maxItems 1"),
    ({"type": "integer", "minimum": 10, "maximum": 1}, "never be satisfied: minimum 10 > maximum 1"),
    ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, "never be satisfied: exclusiveMinimum 1 >= maximum 1"),
    ({"enum": []}, "never be satisfied: an empty enum"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "never be satisfied: allOf"),
    ({"enum": [True, False]}, "all strings or all numbers"),
    ({"const": 'say "hi"'}, "quote"),
    ({"type": "object", "properties": {"x": {"type": "frobnicate"}}}, "type"),
    ({"type": "array", "items": [{"type": "integer"}]}, "not a list"),
    ([1], "is an object"),
]


@pytest.mark.parametrize("schema,match", REFUSED)
def test_a_costly_or_unsatisfiable_schema_is_refused_up_front(schema, match):
    """Checked before anything is built: the enforcer would compile a regex into an automaton a
    26-byte pattern makes exponential (minutes, GBs, on the model's thread), expand a recursive
    $ref forever, or log a traceback and end an unsatisfiable value early, invalid."""
    from node.provider.backends._constrained import check_schema

    with pytest.raises(BackendUnsupported, match=match):
        check_schema(schema)


@pytest.mark.parametrize("schema", [
    SCHEMA, _nested(16), _fan_out(6, 3), {"type": "string", "format": "date-time"},
    {"type": "string", "minLength": 2, "maxLength": 2}, {"enum": [f"v{i}" for i in range(256)]}, {"enum": [1, 2.5]},
    {"allOf": [{"type": "number"}, {"type": "integer"}]}, {"type": "string", "maxLength": 4096},
    {"$defs": {"p": {"type": "object", "properties": {"n": {"type": "integer"}}}}, "type": "object",
     "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"$ref": "#/$defs/p"}}}])
def test_a_reasonable_schema_passes_the_check(schema):
    from node.provider.backends._constrained import check_schema

    check_schema(schema)


async def test_a_pattern_is_refused_by_the_backend_before_anything_runs(builtin):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"p": {"type": "string", "pattern": "^([a-z]{1,50}){1,50}x$"}}}}}
    with pytest.raises(BackendUnsupported, match="patterns are not supported"):
        await builtin.count_prompt_tokens(USER, CallOptions(response_format=fmt))
    with pytest.raises(BackendUnsupported, match="patterns are not supported"):
        await _run(builtin, CallOptions(response_format=fmt))


async def test_a_constraint_step_over_its_time_fails_the_call(builtin, monkeypatch):
    from node.provider.backends import BackendError, _constrained

    monkeypatch.setattr(_constrained, "STEP_SECONDS", -1.0)  # every step is over its time
    pieces = []

    async def on_piece(text, tokens, **extras):
        pieces.append(text)

    with pytest.raises(BackendError, match="constrained decoding step took over"):
        await builtin.generate(USER, max_tokens=20, temperature_milli=0, top_p_milli=1000, stop=(),
                               on_piece=on_piece, options=CallOptions(response_format={"type": "json_object"}))
    assert pieces == []


def test_the_stop_flag_is_checked_inside_one_step(builtin):
    """Cancellation reaches into a step's search (not only between tokens)."""
    from node.provider.backends._constrained import Constraint, ConstraintStopped

    constraint, asked = Constraint(builtin._tokdata, schema={"type": "object"}), []

    def stop():
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(ConstraintStopped):
        constraint.allowed(stop)
    assert len(asked) == 3


def test_an_enforcer_that_gives_up_raises_instead_of_allowing_only_eos(builtin, monkeypatch):
    """lm-format-enforcer, on a state it cannot continue, logs a traceback and allows eos only:
    the output would end as a clean 'stop', invalid. Here it raises."""
    from node.provider.backends import _constrained

    monkeypatch.setattr(_constrained, "check_schema", lambda schema: None)  # past the up-front check
    constraint = _constrained.Constraint(builtin._tokdata, schema={"type": "string", "minLength": 5, "maxLength": 2})
    quote = builtin._tokenizer.encode('"', add_special_tokens=False)[-1]
    assert quote in constraint.allowed()
    constraint.feed(quote)
    with pytest.raises(_constrained.ConstraintFailed):
        constraint.allowed()


@pytest.mark.parametrize("temperature", [0, 1000])
async def test_a_call_the_enforcer_gives_up_on_ends_with_length_not_stop(builtin, monkeypatch, temperature):
    from node.provider.backends import _constrained

    monkeypatch.setattr(_constrained, "check_schema", lambda schema: None)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "minLength": 5, "maxLength": 2}}}
    result, text, _ = await _run(builtin, CallOptions(response_format=fmt, seed=1), max_tokens=20,
                                 temperature=temperature)
    assert result.finish_reason == "length" and text.strip() == '"'
