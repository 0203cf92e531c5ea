"""The OpenAI face's declared request bodies: what an agent sends is read into the call options
the wire carries, what cannot be served is refused with one line naming the field, and what we
do not read is ignored, as OpenAI ignores it."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from node.api._http import invalid_request
from node.api._openai_models import ChatRequest, CompletionRequest, EmbeddingsRequest

HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "the weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                                         "strict": True}}


def parse(cls, **body):
    return cls.model_validate_json(json.dumps(body))


def refusal(cls, **body):
    with pytest.raises(ValidationError) as caught:
        parse(cls, **body)
    err = invalid_request(caught.value)
    return err.field, str(err)


def test_an_agents_chat_request_becomes_call_options():
    q = parse(ChatRequest, model="m", messages=HI, tools=[TOOL], tool_choice="required", parallel_tool_calls=False,
              response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                      "strict": True}},
              logprobs=True, top_logprobs=3, seed=7, user="agent-1", max_completion_tokens=50, max_tokens=10,
              stream=True, stream_options={"include_usage": True},
              frequency_penalty=0.5, logit_bias={"1": 2}, metadata={"x": "y"}, store=False)  # ignored
    o = q.options()
    assert o.tools == (TOOL,) and o.tool_choice == "required" and o.forced_tool() == "*"
    assert o.response_format == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                        "strict": True}}
    assert o.json_schema() == {"type": "object"}
    assert (o.seed, o.logprobs, o.top_logprobs, o.user) == (7, True, 3, "agent-1")
    assert o.needs() == {"tools", "json", "logprobs"}
    assert q.limit() == 50  # max_completion_tokens wins


def test_a_named_tool_choice_and_text_format():
    q = parse(ChatRequest, model="m", messages=HI, tools=[TOOL], response_format={"type": "text"},
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    o = q.options()
    assert o.forced_tool() == "get_weather" and o.response_format is None and o.needs() == {"tools"}


def test_a_tool_round_trip_conversation_is_read_whole():
    q = parse(ChatRequest, model="m", tools=[TOOL], messages=HI + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "4 "}, {"type": "text",
                                                                                              "text": "degrees"}]},
        {"role": "developer", "content": "be brief", "name": "ops"}])
    wire = q.wire_messages()
    assert wire[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}
    assert wire[2] == {"role": "tool", "content": "4 degrees", "tool_call_id": "call_1"}
    assert wire[3] == {"role": "system", "content": "be brief", "name": "ops"}


@pytest.mark.parametrize("body,field,words", [
    ({"n": 2}, "n", "only n=1"),
    ({"functions": [{"name": "f"}]}, "functions", "send tools"),
    ({"top_logprobs": 2}, None, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ""),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "'nope'"),
    ({"tool_choice": "required"}, None, "needs tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", ""),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"d": "x" * 70000}}}]},
     "tools.0.function.parameters", "over the 65536"),
    ({"tools": [TOOL] * 129}, "tools", ""),
    ({"response_format": {"type": "xml"}}, "response_format", ""),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema", "missing"),
    ({"seed": -1}, "seed", ""),
    ({"user": "u" * 257}, "user", ""),
    ({"messages": [{"role": "tool", "content": "4 degrees"}]}, "messages.0", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, None, None),  # an empty list: fine
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "only text content parts"),
])
def test_what_cannot_be_served_is_refused_naming_the_field(body, field, words):
    full = {"model": "m", "messages": HI} | body
    if words is None:
        parse(ChatRequest, **full)
        return
    named, message = refusal(ChatRequest, **full)
    assert field is None or named == field, (named, message)
    assert words in message, message


def test_legacy_completions():
    q = parse(CompletionRequest, model="m", prompt=["Once upon a time"], logprobs=2, stop="\n", seed=1)
    o = q.options()
    assert (o.prompt, o.logprobs, o.top_logprobs, o.seed) == ("Once upon a time", True, 2, 1)
    assert o.needs() == {"completions", "logprobs"} and q.max_tokens == 16 and q.stop == ("\n",)
    for body, words in [({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"n": 2}, "n=1"),
                        ({"prompt": ["a", "b"]}, "one prompt"), ({"prompt": [1, 2, 3]}, "token-id"),
                        ({"prompt": [[1, 2]]}, "token-id"), ({"suffix": "end"}, "suffix"),
                        ({"logprobs": 6}, "logprobs")]:
        named, message = refusal(CompletionRequest, **({"model": "m", "prompt": "x"} | body))
        assert words in message, (body, message)


def test_embeddings_requests():
    q = parse(EmbeddingsRequest, model="minilm", input="one text")
    assert q.input == ("one text",) and q.encoding_format == "float" and q.dimensions is None
    q = parse(EmbeddingsRequest, model="minilm", input=["a", "b"], encoding_format="base64", dimensions=128)
    assert q.input == ("a", "b") and q.encoding_format == "base64" and q.dimensions == 128
    for body, field, words in [
        ({"input": [1, 2, 3]}, "input", "token-id inputs are not supported"),
        ({"input": [[1, 2], [3]]}, "input", "token-id inputs are not supported"),
        ({"input": []}, "input", "at least one"),
        ({"input": ["a"] * 2049}, "input", "over the 2048"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", ""),
        ({"input": "x", "dimensions": 0}, "dimensions", ""),
        ({"input": "x", "dimensions": 4000}, "dimensions", ""),
    ]:
        named, message = refusal(EmbeddingsRequest, **({"model": "minilm"} | body))
        assert named == field and words in message, (body, named, message)
