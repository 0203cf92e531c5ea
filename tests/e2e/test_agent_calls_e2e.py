"""Agent calls through an in-process swarm, with the library (``open_swarm``): an agent that also
provides — ``fast`` (an ``openai:`` backend in front of ``fast_upstream``, all chat features),
``plain`` (the same upstream, declared ``streaming`` only) and ``vectors`` (the same upstream as
an embeddings offer) — and a consumer that rents them.

What it shows: a tool call comes back in OpenAI's shape with ``finish_reason`` ``tool_calls`` and
a receipt whose output hash covers the calls; routing sends a call only where its features are
listed, and names the missing one otherwise (no money moves); an embeddings request of more
inputs than one call carries is split into calls, one receipt each, the vectors in order."""

from __future__ import annotations

import json

import pytest
import trio

import protocol
from node import open_swarm
from node._calls import CallOptions
from node.consumer import UnsupportedFeature
from tests.e2e.fast_upstream import EMBED_DIMS, embedding, fast_upstream

MINTED = 50_000_000
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


async def test_agent_calls_through_the_library(tmp_path):
    with fast_upstream() as upstream:
        async with open_swarm(tmp_path / "agent", passphrase="pw", escrow=True) as agent:
            await agent.offer("fast", backend=f"openai:{upstream}", input_price=100_000, output_price=200_000)
            await agent.offer("plain", backend=f"openai:{upstream}", input_price=100_000, output_price=200_000,
                              features=("streaming",))
            await agent.offer("vectors", backend=f"openai:{upstream}", input_price=10_000, output_price=0,
                              features=("embeddings",))
            async with open_swarm(tmp_path / "consumer", passphrase="pw", bootstrap=agent.addrs) as consumer:
                await agent.mint(consumer.peer_id, MINTED)
                with trio.fail_after(60):
                    for model in ("fast", "plain", "vectors"):
                        await consumer.wait_for(model)

                # a tool call, in OpenAI's shape, and the receipt's output hash covers it
                doc = await consumer.run("fast", ASK, tools=[WEATHER], max_tokens=64)
                choice = doc["choices"][0]
                assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
                (call,) = choice["message"]["tool_calls"]
                assert call["type"] == "function" and call["function"]["name"] == "get_weather"
                assert "city" in json.loads(call["function"]["arguments"])

                done = await consumer.service.renter.run("fast", ASK, max_tokens=64, temperature_milli=1000,
                                                         options=CallOptions(tools=(WEATHER,)))
                assert done.tool_calls and done.receipt.finish_reason == "stop" and done.finish_reason == "tool_calls"
                assert done.receipt.output_hash == protocol.call_output_hash(done.text, done.tool_calls)

                # the round trip: the tool's result goes back, the answer is text
                answer = await consumer.run("fast", ASK + [choice["message"], {
                    "role": "tool", "tool_call_id": call["id"], "content": "sunny"}], tools=[WEATHER], max_tokens=64)
                assert answer["choices"][0]["message"]["content"] == "the tool said sunny"
                assert answer["choices"][0]["finish_reason"] == "stop"

                # streamed pieces reach on_delta; the text still reaches on_text
                pieces, texts = [], []

                async def on_delta(d):
                    pieces.extend(d.tool_calls)

                async def on_text(t):
                    texts.append(t)

                streamed = await consumer.service.renter.run("fast", ASK, max_tokens=64, temperature_milli=1000,
                                                             options=CallOptions(tools=(WEATHER,)), on_delta=on_delta,
                                                             on_text=on_text)
                assert protocol.accumulate_tool_calls(pieces) == streamed.tool_calls and not texts
                plain_text = await consumer.service.renter.run("plain", ASK, max_tokens=8, temperature_milli=1000,
                                                               on_text=on_text)
                assert "".join(texts) == plain_text.text

                # routing by features: nobody lists tools for `plain`, nobody serves chat on `vectors`
                before = await consumer.balance(agent.peer_id)
                with pytest.raises(UnsupportedFeature) as caught:
                    await consumer.run("plain", ASK, tools=[WEATHER])
                assert caught.value.field == "tools" and str(caught.value) == "no provider of 'plain' supports tools"
                with pytest.raises(UnsupportedFeature):
                    await consumer.run("vectors", ASK)
                with pytest.raises(UnsupportedFeature):
                    await consumer.embed("fast", "a text")
                after = await consumer.balance(agent.peer_id)
                assert after["available"] == before["available"]

                # embeddings: 130 inputs are three calls on one session, one receipt each, in order
                texts = [f"text number {i} about {'cats' if i % 2 else 'stocks'}" for i in range(130)]
                got = await consumer.service.renter.embed("vectors", texts)
                assert got.dims == EMBED_DIMS and len(got.vectors) == 130 and len(got.receipts) == 3
                assert len({r.session_id for r in got.receipts}) == 1
                assert [r.call_seq for r in got.receipts] == [0, 1, 2]
                assert got.floats()[7] == pytest.approx(embedding(texts[7], EMBED_DIMS), abs=1e-6)
                assert got.cost == sum(protocol.call_cost(r.price, r.tokens_in, 0) for r in got.receipts)
                assert all(r.tokens_out == 0 for r in got.receipts)
                doc = await consumer.embed("vectors", ["one", "two"], encoding_format="base64")
                assert [d["index"] for d in doc["data"]] == [0, 1] and doc["receipt_ids"] == [doc["receipt_id"]]
                assert doc["usage"]["prompt_tokens"] == doc["usage"]["total_tokens"] > 0
