"""The OpenAI face's answers have OpenAI's exact shapes, with a renter that answers at once (no
network): tool calls whole and streamed (the first delta of an index names id, type and function
with empty arguments; later ones only argument pieces), logprobs as floats, legacy completions,
embeddings as floats and as base64 of float32 LE, and the options each route hands the renter."""

from __future__ import annotations

import base64
import json
import struct
import types

from starlette.testclient import TestClient

import protocol
from node.api import build_app
from node.consumer import Completion, Delta, Embeddings
from tests.support import identity

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ASK = [{"role": "user", "content": "weather?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = protocol.ToolCall(id="call_0", name="get_weather", arguments='{"city":"Oslo"}')
LP = protocol.TokenLogprob(token="Hi", neg_logprob_micro=250_000,
                           top=(protocol.TopLogprob(token="Hi", neg_logprob_micro=250_000),))


def _receipt(tokens_in=5, tokens_out=3, cost=7):
    return protocol.Receipt(
        session_id=b"s" * 16, call_seq=0, model="m", provider=identity("shape-p").peer_id,
        consumer=identity("shape-c").peer_id, agent=identity("shape-a").peer_id, channel_id=b"c" * 16,
        input_hash=bytes(32), output_hash=bytes(32), tokens_in=tokens_in, tokens_out=tokens_out,
        finish_reason="stop", price=protocol.Price(input_per_1k=1, output_per_1k=1), cost=cost, cumulative=cost,
        prev_hash=bytes(32), issued_at=1)


def _app(deltas, done_kwargs, seen):
    async def run(model, messages, **kwargs):
        seen.append((model, messages, kwargs))
        if kwargs.get("on_delta") is not None:
            for d in deltas:
                await kwargs["on_delta"](d)
        return Completion(id="ab", provider="p", model=model, receipt=_receipt(), latency_ms=1, **done_kwargs)

    async def embed(model, inputs, **kwargs):
        seen.append((model, inputs, kwargs))
        vectors = tuple(struct.pack("<3f", i, 0.5, -1.0) for i in range(len(inputs)))
        return Embeddings(id="cd", provider="p", model=model, dims=3, vectors=vectors,
                          receipts=(_receipt(4, 0, 1), _receipt(2, 0, 1)), latency_ms=1)

    service = types.SimpleNamespace(escrow=None, renter=types.SimpleNamespace(run=run, embed=embed))
    return TestClient(build_app(service, TOKEN), backend="trio", base_url="http://127.0.0.1")


TOOL_DELTAS = [Delta("", (protocol.ToolCallDelta(index=0, id="call_0", name="get_weather", arguments='{"ci'),)),
               Delta("", (protocol.ToolCallDelta(index=0, arguments='ty":"Oslo"}'),))]


def test_a_tool_call_whole():
    seen = []
    client = _app([], dict(text="", finish_reason="tool_calls", tool_calls=(CALL,)), seen)
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "m", "messages": ASK, "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice == {"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}}
    options = seen[0][2]["options"]
    assert options.tools == (TOOL,) and options.tool_choice == "required"


def test_tool_calls_streamed_as_openai_streams_them():
    client = _app(TOOL_DELTAS, dict(text="", finish_reason="tool_calls", tool_calls=(CALL,)), [])
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "m", "messages": ASK, "tools": [TOOL],
                                                                "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["tool_calls"] for d in deltas[1:-1]] == [
        [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": ""}}],
        [{"index": 0, "function": {"arguments": '{"ci'}}],
        [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]]
    assert deltas[-1] == {} and events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 8 and events[-1]["cost"] == 7
    assert r.text.rstrip().endswith("data: [DONE]")


def test_usage_chunk_only_when_asked():
    client = _app(TOOL_DELTAS, dict(text="", finish_reason="tool_calls", tool_calls=(CALL,)), [])
    for stream_options, with_usage in ((None, False), ({"include_usage": False}, False),
                                       ({"include_usage": True}, True)):
        body = {"model": "m", "messages": ASK, "tools": [TOOL], "stream": True}
        if stream_options is not None:
            body["stream_options"] = stream_options
        r = client.post("/v1/chat/completions", headers=AUTH, json=body)
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert all(e["choices"] for e in events[:-1])  # a client may index choices[0] on every chunk
        finish = events[-2] if with_usage else events[-1]
        assert finish["choices"][0]["finish_reason"] == "tool_calls" and finish["cost"] == 7  # the receipt, always
        assert (events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 8) is with_usage


def test_logprobs_whole_and_streamed():
    client = _app([Delta("Hi", (), (LP,))], dict(text="Hi", finish_reason="stop", logprobs=(LP,)), [])
    body = {"model": "m", "messages": ASK, "logprobs": True, "top_logprobs": 1}
    whole = client.post("/v1/chat/completions", headers=AUTH, json=body).json()["choices"][0]["logprobs"]
    assert whole["content"] == [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
                                 "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}]}]
    r = client.post("/v1/chat/completions", headers=AUTH, json=body | {"stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    (piece,) = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert piece["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.25


def test_legacy_completions():
    seen = []
    client = _app([Delta("Hi", (), (LP,)), Delta(" there")], dict(text="Hi there", finish_reason="length",
                                                                  logprobs=(LP,)), seen)
    doc = client.post("/v1/completions", headers=AUTH, json={"model": "m", "prompt": "Say", "logprobs": 1}).json()
    assert doc["object"] == "text_completion" and doc["choices"][0]["text"] == "Hi there"
    assert doc["choices"][0]["logprobs"] == {"tokens": ["Hi"], "token_logprobs": [-0.25],
                                             "top_logprobs": [{"Hi": -0.25}], "text_offset": [0]}
    model, messages, kwargs = seen[0]
    assert messages == [] and kwargs["options"].prompt == "Say" and kwargs["max_tokens"] == 16
    r = client.post("/v1/completions", headers=AUTH, json={"model": "m", "prompt": ["Say"], "stream": True,
                                                           "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "Hi there"
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["choices"] == []


def test_embeddings_as_floats_and_base64():
    seen = []
    client = _app([], {}, seen)
    doc = client.post("/v1/embeddings", headers=AUTH, json={"model": "e", "input": ["a", "b"], "dimensions": 3}).json()
    assert [d["embedding"] for d in doc["data"]] == [[0.0, 0.5, -1.0], [1.0, 0.5, -1.0]]
    assert doc["usage"] == {"prompt_tokens": 6, "total_tokens": 6} and doc["cost"] == 2
    assert doc["receipt_ids"][-1] == doc["receipt_id"] and len(doc["receipt_ids"]) == 2
    assert seen[0][1] == ("a", "b") and seen[0][2]["dimensions"] == 3
    b64 = client.post("/v1/embeddings", headers=AUTH, json={"model": "e", "input": "a",
                                                            "encoding_format": "base64"}).json()
    assert struct.unpack("<3f", base64.b64decode(b64["data"][0]["embedding"])) == (0.0, 0.5, -1.0)
