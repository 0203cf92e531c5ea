"""node/_calls: an agent call's extras survive the trip OpenAI shape -> wire -> OpenAI shape, the
hash covers them, and shapes the wire cannot carry are one clear ValueError."""

from __future__ import annotations

import json

import pytest

import protocol
from node._calls import CallOptions, from_request, openai_logprobs, openai_tool_calls, request_fields

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]


def _request(messages, options):
    return protocol.RequestV2(session_id=bytes(16), call_seq=0, max_tokens=64, **request_fields(messages, options))


def test_needs_name_the_features_a_call_uses():
    assert CallOptions().needs() == frozenset()
    assert CallOptions(tools=(WEATHER,)).needs() == {"tools"}
    assert CallOptions(tools=(WEATHER,), tool_choice="none").needs() == frozenset()
    assert CallOptions(response_format={"type": "json_object"}).needs() == {"json"}
    assert CallOptions(response_format={"type": "text"}).needs() == frozenset()
    assert CallOptions(logprobs=True, prompt="Once").needs() == {"logprobs", "completions"}


def test_forced_tool_and_schema():
    assert CallOptions(tools=(WEATHER,), tool_choice="required").forced_tool() == "*"
    named = CallOptions(tools=(WEATHER,), tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.forced_tool() == "get_weather" and named.tool_named("get_weather")["name"] == "get_weather"
    assert CallOptions(tools=(WEATHER,), tool_choice="auto").forced_tool() is None
    assert CallOptions(response_format={"type": "json_object"}).json_schema() == {}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert CallOptions(response_format=fmt).json_schema() == {"type": "object"}


def test_round_trip_through_the_wire_keeps_every_extra():
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True}}
    options = CallOptions(tools=(WEATHER,), tool_choice={"type": "function", "function": {"name": "get_weather"}},
                          response_format=fmt, seed=7, logprobs=True, top_logprobs=3, user="u-1")
    request = _request(TURNS, options)
    back = protocol.decode(protocol.encode(request))
    messages, got = from_request(back)
    assert messages == [TURNS[0], TURNS[1], {"role": "assistant", "content": "", "tool_calls": TURNS[2]["tool_calls"]},
                        TURNS[3]]
    assert got == options


def test_json_text_travels_canonical_so_the_request_hash_is_stable():
    a = dict(WEATHER, function=dict(WEATHER["function"], parameters={"required": ["city"], "type": "object",
                                                                    "properties": {"city": {"type": "string"}}}))
    h1 = protocol.request_hash(_request(TURNS, CallOptions(tools=(WEATHER,))))
    h2 = protocol.request_hash(_request(TURNS, CallOptions(tools=(a,))))
    h3 = protocol.request_hash(_request(TURNS, CallOptions(tools=(WEATHER,), tool_choice="required")))
    assert h1 == h2 != h3


def test_a_v1_request_reads_as_plain_chat():
    v1 = protocol.Request(session_id=bytes(16), call_seq=0, max_tokens=8,
                          messages=(protocol.ChatMessage(role="user", content="hi"),))
    assert from_request(v1) == ([{"role": "user", "content": "hi"}], CallOptions())


@pytest.mark.parametrize("options, words", [
    (CallOptions(tool_choice="sometimes"), "tool_choice"),
    (CallOptions(tool_choice={"type": "function"}), "tool_choice"),
    (CallOptions(tools=({"type": "function"},)), "tool"),
    (CallOptions(response_format={"type": "yaml"}), "response_format"),
    (CallOptions(response_format={"type": "json_schema"}), "json_schema"),
])
def test_shapes_the_wire_cannot_carry_are_one_value_error(options, words):
    with pytest.raises(ValueError, match=words):
        request_fields(TURNS, options)


def test_results_in_openai_shape():
    calls = protocol.accumulate_tool_calls([
        protocol.ToolCallDelta(index=0, id="call_9", name="get_weather", arguments='{"ci'),
        protocol.ToolCallDelta(index=0, arguments='ty":"Oslo"}')])
    assert openai_tool_calls(calls) == [{"id": "call_9", "type": "function",
                                         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]
    lp = protocol.TokenLogprob(token="Hi", neg_logprob_micro=250_000,
                               top=(protocol.TopLogprob(token="Hi", neg_logprob_micro=250_000),))
    doc = openai_logprobs([lp])
    assert doc["content"][0]["logprob"] == -0.25 and doc["content"][0]["bytes"] == [72, 105]
    assert json.dumps(doc)  # plain JSON


@pytest.mark.parametrize("json_schema, tool_parameters", [
    ("[1]", ""),  # not an object
    ('{"name": "x", "schema": 5}', ""),  # a schema that is not an object
    ("[" * 70_000, ""),  # nested past the parser's recursion limit
    ("", "[1]"),  # tool parameters that are not an object
    ("", "{not json"),
])
def test_malformed_json_from_a_remote_consumer_is_one_value_error(json_schema, tool_parameters):
    """A provider reads these from a stranger's request: each is a ValueError (a free bad_request), never a
    TypeError, AttributeError or RecursionError that would break the session."""
    request = protocol.RequestV2(
        session_id=bytes(16), call_seq=0, max_tokens=8, messages=(protocol.Turn(role="user", content="hi"),),
        tools=(protocol.Tool(name="f", parameters=tool_parameters),) if tool_parameters else (),
        response_format="json_schema" if json_schema else "", json_schema=json_schema)
    with pytest.raises(ValueError):
        from_request(request)
