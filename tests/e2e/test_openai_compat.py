"""The gateway as agents drive it: the official ``openai`` client (sync, async, streaming, tools,
JSON output, legacy completions, embeddings) and LangChain's ``ChatOpenAI`` doing a tool-using
turn, against real daemons: an escrow agent, a provider selling ``fast`` (an ``openai:``
backend in front of ``fast_upstream``, which emits tool calls), ``tiny`` (the builtin model:
forced tool calls and JSON by constrained decoding) and ``minilm`` (``embeddings:builtin``, the
real all-MiniLM-L6-v2), and a consumer whose OpenAI face the clients talk to."""

from __future__ import annotations

import asyncio
import json
import math
import struct

import httpx
import pytest

import protocol
from tests.e2e.daemons import Daemon, poll, start_market
from tests.e2e.fast_upstream import fast_upstream

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
MINILM_PRICE = 20_000  # µc per 1K input tokens (0.02 credits)


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-compat")
    started: list[Daemon] = []
    with fast_upstream() as upstream:
        try:
            agent, provider, consumer, aid = start_market(tmp, started, mint="50")
            provider.cli("offer", "add", "--model", "fast", "--backend", f"openai:{upstream}", "--input-price", "0.10",
                         "--output-price", "0.20", "--max-context", "8192")
            poll(lambda: json.loads(consumer.cli("providers", "--model", "fast", "--json").stdout), 30,
                 "the listing of fast")
            token = (tmp / "consumer" / "api.token").read_text().strip()
            yield consumer, provider, aid, token
        finally:
            for d in started:
                d.stop()


@pytest.fixture(scope="module")
def minilm(market):
    """The provider sells the real all-MiniLM-L6-v2 too (``embeddings:builtin``)."""
    consumer, provider, _, _ = market
    provider.cli("offer", "add", "--model", "minilm", "--backend", "embeddings:builtin", "--input-price", "0.02",
                 "--output-price", "0", "--max-context", "512")
    poll(lambda: json.loads(consumer.cli("providers", "--model", "minilm", "--json").stdout), 30,
         "the listing of minilm")
    return market


def _client(market) -> "openai.OpenAI":
    consumer, _, _, token = market
    return openai.OpenAI(base_url=consumer.info["api_url"] + "/v1", api_key=token, max_retries=0, timeout=120)


def _http(market) -> httpx.Client:
    consumer, _, _, token = market
    return httpx.Client(base_url=consumer.info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=120)


def test_sync_client_chat_and_stream(market):
    client = _client(market)
    done = client.chat.completions.create(model="fast", messages=ASK, max_completion_tokens=20, seed=1, user="me")
    assert done.choices[0].message.content.startswith("w0") and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens > 0 and done.model_extra["cost"] > 0
    chunks = list(client.chat.completions.create(model="fast", messages=ASK, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_async_client(market):
    consumer, _, _, token = market

    async def main():
        client = openai.AsyncOpenAI(base_url=consumer.info["api_url"] + "/v1", api_key=token, max_retries=0)
        done = await client.chat.completions.create(model="fast", messages=ASK, max_tokens=20)
        stream = await client.chat.completions.create(model="fast", messages=ASK, max_tokens=20, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        models = await client.models.list()
        await client.close()
        return done, text, models

    done, text, models = asyncio.run(main())
    assert done.choices[0].message.content == text
    assert {"fast", "tiny"} <= {m.id for m in models.data}


def test_models_list_features_and_one_model(market):
    client = _client(market)
    fast = client.models.retrieve("fast")
    assert fast.id == "fast" and "tools" in fast.model_extra["features"] and fast.model_extra["context_length"] == 8192
    assert client.models.retrieve("tiny").model_extra["kind"] == "chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def _round_trip(client, first) -> None:
    """Send the assistant's tool calls and each call's result back; the model answers in text."""
    message = first.choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": "4 degrees and rain"} for c in message.tool_calls]
    final = client.chat.completions.create(model="fast", tools=[WEATHER], max_tokens=40, messages=ASK + [
        message.model_dump(exclude_none=True)] + results)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "the tool said 4 degrees and rain"
    assert not final.choices[0].message.tool_calls


def test_tool_round_trip(market):
    client = _client(market)
    first = client.chat.completions.create(model="fast", messages=ASK, tools=[WEATHER], tool_choice="auto",
                                           max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert "city" in json.loads(call.function.arguments)
    _round_trip(client, first)


def test_streamed_tool_calls_arrive_as_openai_sends_them(market):
    with _http(market) as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "fast", "messages": ASK, "tools": [WEATHER], "max_tokens": 64, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    pieces = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert pieces[0]["id"] and pieces[0]["type"] == "function" and pieces[0]["function"] == {
        "name": "get_weather", "arguments": ""}
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in pieces[1:])
    assert len(pieces) > 2  # the arguments come in several pieces
    assert "city" in json.loads("".join(p["function"]["arguments"] for p in pieces))
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "tool_calls"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls" and events[-1]["cost"] > 0 \
        and len(events[-1]["receipt_id"]) == 64  # no usage chunk: include_usage was not asked


def test_streamed_tool_round_trip_with_the_client(market):
    client = _client(market)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model="fast", messages=ASK, tools=[WEATHER], max_tokens=64,
                                                stream=True):
        if not chunk.choices:
            continue
        for piece in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": piece.id, "name": piece.function.name, "arguments": ""})
            call["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["get_weather"]
    (call,) = calls.values()
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]}
    final = client.chat.completions.create(model="fast", tools=[WEATHER], max_tokens=40, stream=True, messages=ASK + [
        assistant, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}])
    assert "".join(c.choices[0].delta.content or "" for c in final if c.choices) == "the tool said sunny"


def test_a_local_model_makes_a_forced_tool_call(market):
    client = _client(market)
    # random weights write a free string until they run out of tokens: the city is one of a list
    cities = {"type": "function", "function": {**WEATHER["function"], "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris"]}}, "required": ["city"],
        "additionalProperties": False}}}
    done = client.chat.completions.create(model="tiny", messages=ASK, tools=[cities], max_tokens=400, seed=3,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)  # constrained decoding: valid against the schema
    assert arguments == {"city": arguments["city"]} and arguments["city"] in ("Oslo", "Paris")


def test_json_output(market):
    client = _client(market)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "degrees": {"type": "integer"}},
              "required": ["city", "degrees"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    for model in ("fast", "tiny"):
        done = client.chat.completions.create(model=model, messages=ASK, response_format=fmt, max_tokens=400, seed=7)
        value = json.loads(done.choices[0].message.content)
        assert set(value) == {"city", "degrees"} and isinstance(value["city"], str) \
            and isinstance(value["degrees"], int), (model, value)
    for seed in (1, 2, 3):  # random weights under a constraint: an object, or cut by max_tokens (honest "length")
        done = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                              max_tokens=400, seed=seed)
        text, finish = done.choices[0].message.content, done.choices[0].finish_reason
        assert finish == "length" or isinstance(json.loads(text), dict), (seed, finish, text)
        assert text.lstrip().startswith("{"), text


def test_logprobs_and_legacy_completions(market):
    client = _client(market)
    done = client.chat.completions.create(model="fast", messages=ASK, max_tokens=4, logprobs=True, top_logprobs=2)
    content = done.choices[0].logprobs.content
    assert content and content[0].logprob == -0.25 and len(content[0].top_logprobs) == 2
    legacy = client.completions.create(model="fast", prompt="Once upon a time", max_tokens=3, logprobs=1)
    assert legacy.choices[0].text == "w0 w1 w2 " and legacy.choices[0].finish_reason == "length"
    assert legacy.choices[0].logprobs.token_logprobs[0] == -0.25
    streamed = client.completions.create(model="fast", prompt="Once upon a time", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "w0 w1 w2 "
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fast", prompt="x", echo=True)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_on_the_real_minilm(minilm):
    market = minilm
    consumer, provider, _, token = market
    client = _client(market)
    card = client.models.retrieve("minilm")
    assert card.model_extra["features"] == ["embeddings"] and card.model_extra["kind"] == "embeddings"
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    done = client.embeddings.create(model="minilm", input=texts)  # the client asks base64 and decodes it
    vectors = [d.embedding for d in done.data]
    assert [len(v) for v in vectors] == [384] * 3
    assert _cos(vectors[0], vectors[1]) > _cos(vectors[0], vectors[2]) + 0.2
    doc = done.model_extra
    assert doc["cost"] == math.ceil(done.usage.prompt_tokens * MINILM_PRICE / 1000) and doc["cost"] > 0
    with _http(market) as http:
        receipt = http.get(f"/api/v1/receipts/{doc['receipt_id']}").json()
        floats = http.post("/v1/embeddings", json={"model": "minilm", "input": texts[0]}).json()
        tokens = http.post("/v1/embeddings", json={"model": "minilm", "input": [[1, 2, 3]]})
        chat = http.post("/v1/chat/completions", json={"model": "minilm", "messages": ASK})
    r = protocol.decode(bytes.fromhex(receipt["encoded"]), expect=(protocol.Receipt,))
    protocol.verify(r, "provider_sig", protocol.public_key_from_peer_id(provider.info["peer_id"]))
    protocol.verify(r, "consumer_sig", protocol.public_key_from_peer_id(consumer.info["peer_id"]))
    assert (r.tokens_in, r.tokens_out, r.cost) == (done.usage.prompt_tokens, 0, doc["cost"])
    assert doc["receipt_ids"] == [doc["receipt_id"]]
    assert _cos(floats["data"][0]["embedding"], vectors[0]) > 0.9999
    struct.pack("<384f", *floats["data"][0]["embedding"])  # plain floats
    assert tokens.status_code == 400 and "token-id" in tokens.json()["error"]["message"]
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "unsupported_feature"


def test_langchain_tool_turn(market):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"4 degrees in {city}"

    consumer, _, _, token = market
    llm = langchain_openai.ChatOpenAI(model="fast", base_url=consumer.info["api_url"] + "/v1", api_key=token,
                                      max_tokens=64, max_retries=0, timeout=120)
    with_tools = llm.bind_tools([get_weather])
    history = [HumanMessage("What is the weather in Oslo?")]
    ai = with_tools.invoke(history)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    history.append(ai)
    for call in ai.tool_calls:
        history.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = with_tools.invoke(history)
    assert final.content.startswith("the tool said 4 degrees in") and not final.tool_calls
