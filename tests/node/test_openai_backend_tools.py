"""The openai: backend passes an agent's call upstream unchanged and streams back what the upstream
sends — tool calls (streamed in pieces, parallel, or whole), schema-valid JSON, logprobs, legacy
completions, embeddings — and an upstream sending garbage or too much is one clean BackendError."""

from __future__ import annotations

import http.server
import json
import socketserver
import struct
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

import protocol
from node._calls import CallOptions
from node.provider.backends._base import BackendError, BackendUnsupported
from node.provider.backends._openai import OpenAIBackend, OpenAIEmbeddingBackend, open_openai, prompt_bound
from tests.e2e.fast_upstream import EMBED_DIMS, PROMPT_TOKENS, WORDS, embedding, fast_upstream, schema_instance, serving

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"},
                                                                          "days": {"type": "integer"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Pieces:
    """An ``on_piece`` that records everything it is handed."""

    def __init__(self) -> None:
        self.text, self.tokens, self.calls, self.logprobs, self.count = "", 0, [], [], 0

    async def __call__(self, text: str, tokens: int, *, tool_calls=(), logprobs=()) -> None:
        self.text += text
        self.tokens += tokens
        self.calls += list(tool_calls)
        self.logprobs += list(logprobs)
        self.count += 1


async def _generate(url: str, messages=USER, options=CallOptions(), max_tokens: int = 200, features=()):
    backend = open_openai(f"openai:{url}", None, "m", features)
    await backend.start()
    try:
        pieces = Pieces()
        gen = await backend.generate(messages, max_tokens=max_tokens, temperature_milli=0, top_p_milli=1000, stop=(),
                                     on_piece=pieces, options=options)
        return gen, pieces
    finally:
        await backend.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_parallel_tool_calls_stream_back_as_deltas_and_accumulate(stream):
    seen: list = []
    with fast_upstream(stream=stream, seen=seen) as url:
        gen, pieces = await _generate(url, options=CallOptions(tools=(WEATHER, TIME), tool_choice="auto", seed=7,
                                                               user="agent-1"))
    calls = protocol.accumulate_tool_calls(pieces.calls)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "w0", "days": 1} and json.loads(calls[1].arguments) == {"zone": "UTC"}
    assert calls[0].id == "call_0" and pieces.text == ""
    if stream:  # the arguments came in several pieces, each its own claim
        assert len([d for d in pieces.calls if d.index == 0]) > 2
    assert gen.finish_reason == "stop" and gen.tokens_out == pieces.tokens and gen.tokens_in == PROMPT_TOKENS
    path, body = seen[0]
    assert path == "/chat/completions" and body["tools"] == [WEATHER, TIME] and body["tool_choice"] == "auto"
    assert body["seed"] == 7 and body["user"] == "agent-1" and body["messages"] == USER


async def test_a_forced_tool_and_tool_turns_travel_unchanged():
    seen: list = []
    turns = USER + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_9", "name": "get_weather"}]
    choice = {"type": "function", "function": {"name": "get_time"}}
    with fast_upstream(seen=seen) as url:
        _, forced = await _generate(url, options=CallOptions(tools=(WEATHER, TIME), tool_choice=choice))
        gen, answer = await _generate(url, turns, CallOptions(tools=(WEATHER, TIME)))
    assert [c.name for c in protocol.accumulate_tool_calls(forced.calls)] == ["get_time"]
    assert seen[0][1]["tool_choice"] == choice
    assert seen[1][1]["messages"] == turns  # the assistant's calls and the tool's answer, as sent
    assert answer.text == "the tool said sunny" and not answer.calls


@pytest.mark.parametrize("stream", [True, False])
async def test_json_schema_output_is_valid_against_the_schema(stream):
    schema = {"type": "object", "required": ["name", "tags"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "minLength": 3}, "tags": {"type": "array", "items": {
                  "$ref": "#/$defs/tag"}}}, "$defs": {"tag": {"type": "string", "enum": ["a", "b"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    seen: list = []
    with fast_upstream(stream=stream, seen=seen) as url:
        _, pieces = await _generate(url, options=CallOptions(response_format=fmt))
    assert json.loads(pieces.text) == {"name": "w0x", "tags": ["a"]}
    _validate(json.loads(pieces.text), schema)
    assert seen[0][1]["response_format"] == fmt


@pytest.mark.parametrize("stream", [True, False])
async def test_logprobs_come_back_as_integer_micro_nats(stream):
    with fast_upstream(stream=stream) as url:
        gen, pieces = await _generate(url, options=CallOptions(logprobs=True, top_logprobs=3))
    assert len(pieces.logprobs) == WORDS and pieces.tokens == WORDS == gen.tokens_out
    first = pieces.logprobs[0]
    assert first.token == "w0 " and first.neg_logprob_micro == 250_000
    assert [(t.token, t.neg_logprob_micro) for t in first.top] == [("t0", 1_000_000), ("t1", 2_000_000),
                                                                    ("t2", 3_000_000)]


async def test_a_legacy_prompt_goes_to_completions_with_logprobs():
    seen: list = []
    with fast_upstream(seen=seen) as url:
        gen, pieces = await _generate(url, [], CallOptions(prompt="Once upon", logprobs=True, top_logprobs=2),
                                      max_tokens=5)
    assert seen[0][0] == "/completions" and seen[0][1]["prompt"] == "Once upon" and seen[0][1]["logprobs"] == 2
    assert pieces.text == "w0 w1 w2 w3 w4 " and gen.finish_reason == "length" and gen.tokens_out == 5
    assert len(pieces.logprobs) == 5 and [t.token for t in pieces.logprobs[0].top] == ["t0", "t1"]


async def test_features_are_the_declared_ones_and_a_call_needing_another_is_refused():
    assert OpenAIBackend("openai:http://x", "http://x", "m", None).features() == (
        "streaming", "tools", "json", "logprobs", "completions")
    with fast_upstream() as url:
        with pytest.raises(BackendUnsupported, match="tools"):
            await _generate(url, options=CallOptions(tools=(WEATHER,)), features=("streaming",))
        with pytest.raises(BackendUnsupported, match="legacy"):
            await _generate(url, [], CallOptions(prompt="x", response_format={"type": "json_object"}))
    assert isinstance(open_openai("openai:http://x", None, "m", ("embeddings",)), OpenAIEmbeddingBackend)


async def test_prompt_bound_is_the_wire_bound_of_the_same_call():
    options = CallOptions(tools=(WEATHER,), response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}})
    bound = prompt_bound(USER, options)
    assert bound == prompt_bound(USER) + protocol.TOOLS_OVERHEAD + protocol.TOOL_OVERHEAD + 2 * (
        len("get_weather") + len(WEATHER["function"]["description"])
        + len(protocol.canonical_json(WEATHER["function"]["parameters"]))) \
        + len(protocol.canonical_json(options.response_format["json_schema"]))


@pytest.mark.parametrize("dimensions", [0, 8])
async def test_embeddings_come_back_as_float32_rows_billed_at_the_upstreams_count(dimensions):
    texts = ["the cat sat", "a dog ran far"]
    seen: list = []
    with fast_upstream(seen=seen) as url:
        backend = open_openai(f"openai:{url}", None, "emb", ("embeddings",))
        await backend.start()
        try:
            out = await backend.embed(texts, dimensions)
            assert await backend.count_input_tokens(texts) == sum(protocol.EMBED_INPUT_OVERHEAD + len(t) for t in texts)
        finally:
            await backend.aclose()
    dims = dimensions or EMBED_DIMS
    assert out.dims == dims == backend.dims and out.tokens_in == (3 + 1) + (4 + 1)
    rows = struct.unpack(f"<{2 * dims}f", out.vectors)
    assert rows[:dims] == pytest.approx(embedding(texts[0], dims)) and rows[dims:] == pytest.approx(embedding(texts[1], dims))
    assert seen[0] == ("/embeddings", {"model": "emb", "input": texts, "encoding_format": "float",
                                       **({"dimensions": dimensions} if dimensions else {})})
    with pytest.raises(BackendUnsupported):
        await backend.generate(USER, max_tokens=4, temperature_milli=0, top_p_milli=1000, stop=(), on_piece=Pieces())


def _validate(value: Any, schema: dict[str, Any]) -> None:
    """jsonschema's verdict, where the test extra installs it."""
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(value, schema)


def test_schema_instance_is_schema_valid():
    for tool in (WEATHER, TIME):
        params = tool["function"]["parameters"]
        _validate(schema_instance(params), params)


# ---- a hostile upstream ------------------------------------------------------------------------


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers every POST with ``server.answer`` (events, or a JSON document when ``server.json``)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        data, kind = self.server.answer, "application/json" if self.server.json else "text/event-stream"
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@contextmanager
def scripted(answer: bytes, as_json: bool = False) -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Scripted)
    server.answer, server.json = answer, as_json
    with serving(server) as url:
        yield url


def _sse(*events: Any) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events) \
        + b"data: [DONE]\n\n"


def _call(index: Any = 0, call_id: Any = "c", name: Any = "get_weather", args: Any = "{}") -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]}}]}


_USAGE = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


@pytest.mark.parametrize("answer, as_json, message", [
    (_sse(_call(name="f" * 65), _USAGE), False, "over 64 bytes"),
    (_sse(_call(call_id="i" * 65), _USAGE), False, "over 64 bytes"),
    (_sse(_call(name=""), _USAGE), False, "names no function"),
    (_sse(_call(index=128), _USAGE), False, "index outside"),
    (_sse(_call(index="0"), _USAGE), False, "not an OpenAI one"),
    (_sse(_call(args=7), _USAGE), False, "not text"),
    (_sse(_call(args="x" * 40_000), _USAGE), False, "bytes for"),  # over 32 bytes per token of max_tokens
    (_sse(*[_call(index=i % 2, args="{}") for i in range(300)], _USAGE), False, "tokens asked for"),
    (_sse({"choices": [{"index": 0, "delta": {"tool_calls": "nope"}}]}, _USAGE), False, "not a list"),
    (_sse(b"{not json", _USAGE), False, "not an OpenAI stream"),
    (_sse({"choices": [{"index": 0, "delta": {"content": 5}}]}, _USAGE), False, "not text"),
    (b"data: " + b"x" * (3 << 20), False, "line over"),
    (json.dumps({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"tool_calls": [
        {"id": "c", "function": {"name": "f" * 100, "arguments": "{}"}}]}}]}).encode(), True, "over 64 bytes"),
    (b"[1, 2]", True, "not an object"),
    (_sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]}), False, "no token usage"),
])
async def test_garbage_or_oversized_tool_calls_are_a_clean_backend_error(answer, as_json, message):
    with scripted(answer, as_json) as url:
        with pytest.raises(BackendError, match=message) as err:
            await _generate(url, options=CallOptions(tools=(WEATHER,)), max_tokens=200)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


async def test_tool_calls_nobody_offered_are_refused_and_unasked_logprobs_dropped():
    with scripted(_sse(_call(), _USAGE)) as url:
        with pytest.raises(BackendError, match="offered no tools"):
            await _generate(url)
    lp = {"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [
        {"token": "a", "logprob": -1.0, "top_logprobs": []}]}}]}
    with scripted(_sse(lp, _USAGE)) as url:
        _, pieces = await _generate(url)
    assert pieces.text == "a" and pieces.logprobs == []


@pytest.mark.parametrize("doc, message", [
    ({"data": [{"index": 0, "embedding": [0.1, 0.2]}]}, "exactly 2 rows"),
    ({"data": [{"index": 0, "embedding": [0.1, 0.2]}, {"index": 0, "embedding": [0.1, 0.2]}]}, "indices"),
    ({"data": [{"index": 0, "embedding": [0.1, 0.2]}, {"index": 1, "embedding": [0.1]}]}, "different sizes"),
    ({"data": [{"index": 0, "embedding": [0.1, "x"]}, {"index": 1, "embedding": [0.1, 0.2]}]}, "finite number"),
    ({"data": [{"index": 0, "embedding": [1e39, 0.0]}, {"index": 1, "embedding": [0.1, 0.2]}]}, "float32"),
    ({"data": [{"index": 0, "embedding": [0.0] * 3073}, {"index": 1, "embedding": [0.1]}]}, "1 to 3072"),
    ({"data": [{"index": 0, "embedding": "!!"}, {"index": 1, "embedding": [0.1]}]}, "base64"),
    ({"data": [{"index": 0, "embedding": [0.1]}, {"index": 1, "embedding": [0.1]}], "usage": {"prompt_tokens": -1}},
     "not counts"),
])
async def test_a_garbage_embeddings_answer_is_a_clean_backend_error(doc, message):
    with scripted(json.dumps(doc).encode(), as_json=True) as url:
        backend = open_openai(f"openai:{url}", None, "emb", ("embeddings",))
        await backend.start()
        try:
            with pytest.raises(BackendError, match=message):
                await backend.embed(["a", "b"])
        finally:
            await backend.aclose()


# ---- through a session: an openai: provider in front of the test upstream ------------------------


async def test_tool_calls_and_embeddings_from_an_upstream_settle_through_a_session():
    from node.provider._offers import Offer
    from tests.node.session_rig import session_rig

    with fast_upstream() as url:
        chat = Offer(model="m", backend=f"openai:{url}", input_price=100_000, output_price=200_000)
        emb = Offer(model="e", backend=f"openai:{url}", input_price=20_000, output_price=0, features=("embeddings",))
        backends = {"m": open_openai(chat.backend, None, "m", chat.features),
                    "e": open_openai(emb.backend, None, "e", emb.features)}
        async with session_rig({"m": chat, "e": emb}, backends, tag="openai-agent") as rig:
            async with rig.session(await rig.open_channel(cap=1_000_000), model="m") as session:
                called = await session.call(USER, 100, options=CallOptions(tools=(WEATHER,)))
                turns = USER + [{"role": "assistant", "content": "", "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in called.tool_calls]}, {"role": "tool", "content": "sunny", "tool_call_id": "call_0"}]
                answered = await session.call(turns, 100, options=CallOptions(tools=(WEATHER,)))
            async with rig.session(await rig.open_channel(cap=1_000_000), model="e") as session:
                embedded = await session.embed(("the cat sat", "a dog"))
        for b in backends.values():
            await b.aclose()
    assert called.finish_reason == "tool_calls" and [c.name for c in called.tool_calls] == ["get_weather"]
    assert json.loads(called.tool_calls[0].arguments) == {"city": "w0", "days": 1}
    assert called.receipt.tokens_in == PROMPT_TOKENS  # the upstream's count, under the admitted bound
    assert answered.text == "the tool said sunny" and answered.finish_reason == "stop"
    r = embedded.receipt
    assert embedded.dims == EMBED_DIMS and r.tokens_in == 4 + 3 and r.tokens_out == 0
    assert r.cost == protocol.call_cost(emb.to_model_offer().price, 7, 0)
