"""The rules a hostile peer of an agent call meets on both machines (review of issue #15): tool
calls only as offered, ids and names once per call, logprobs no more than the tokens paid for,
an embedded input billed at most the context, finite vectors, a tools prompt bound that covers
a template's rendering, and JSON in a request that is the shape it claims."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest

import protocol
from protocol import ToolCall, ToolCallDelta, Turn
from tests.support import PROVIDER, Pair

WEATHER = protocol.Tool(name="get_weather", description="weather by city",
                        parameters=protocol.canonical_json({"type": "object",
                                                            "properties": {"city": {"type": "string"}}}))
TIME = protocol.Tool(name="get_time", parameters='{"type":"object"}')
USER = (Turn(role="user", content="weather in Paris?"),)
CALL = ToolCallDelta(index=0, id="call_1", name="get_weather", arguments="{}")


def _opened(**kw) -> Pair:
    pair = Pair(**kw)
    pair.open()
    return pair


def _provider_call(messages=USER, max_tokens: int = 64, **extras) -> Pair:
    pair = _opened()
    pair.consumer.request(messages, max_tokens, **extras)
    pair.to_provider()
    assert pair.provider.start_call(10, pair.now) is not None
    return pair


def _consumer_call(messages=USER, max_tokens: int = 64, **extras) -> Pair:
    pair = _opened()
    pair.consumer.request(messages, max_tokens, **extras)
    pair.consumer.outgoing()
    return pair


def _forged(pair: Pair, index: int = 0, text: str = "", tokens: int = 1, **fields) -> protocol.ChunkV2:
    return protocol.ChunkV2(session_id=pair.consumer.session_id, call_seq=pair.consumer.next_seq, index=index,
                            text=text, tokens=tokens, **fields)


def _both_refuse(extras: dict, chunks: list[tuple[ToolCallDelta, ...]], says: str, messages=USER) -> None:
    """The provider machine refuses to send the last of ``chunks`` (IllegalTransition) and the
    consumer refuses to take it (UnexpectedMessage); both take the ones before it."""
    pair = _provider_call(messages, **extras)
    for deltas in chunks[:-1]:
        pair.provider.chunk("", 2, tool_calls=deltas)
    with pytest.raises(protocol.IllegalTransition, match=says):
        pair.provider.chunk("", 2, tool_calls=chunks[-1])
    pair = _consumer_call(messages, **extras)
    for i, deltas in enumerate(chunks[:-1]):
        pair.consumer.receive(_forged(pair, i, tokens=2, tool_calls=deltas), pair.now)
    with pytest.raises(protocol.UnexpectedMessage, match=says):
        pair.consumer.receive(_forged(pair, len(chunks) - 1, tokens=2, tool_calls=chunks[-1]), pair.now)


# ---- #2: tool calls only as the call offered them --------------------------------------------------


@pytest.mark.parametrize("messages, extras", [
    (USER, dict(seed=1)),  # a v2 call without tools
    (USER, dict(tools=(WEATHER,), tool_choice="none")),
    ((), dict(prompt="once upon a time")),  # a legacy completion
], ids=["no tools", "tool_choice none", "completion prompt"])
def test_tool_calls_on_a_call_that_offered_none_are_refused_on_both_sides(messages, extras):
    rm = (ToolCallDelta(index=0, id="c", name="rm_rf_home", arguments='{"path":"/"}'),)
    _both_refuse(extras, [rm], "offered no tools", messages)


def test_a_tool_call_of_a_function_not_offered_is_refused_on_both_sides():
    other = (ToolCallDelta(index=0, id="c", name="rm_rf_home", arguments="{}"),)
    _both_refuse(dict(tools=(WEATHER, TIME)), [other], "not one of the tools offered")
    _both_refuse(dict(tools=(WEATHER, TIME), tool_choice="required"), [other], "not one of the tools offered")


def test_a_forced_call_must_call_exactly_the_forced_function():
    extras = dict(tools=(WEATHER, TIME), tool_choice="function:get_weather")
    _both_refuse(extras, [(ToolCallDelta(index=0, id="c", name="get_time"),)], "forces")
    pair = _provider_call(**extras)  # the forced one, twice in parallel, is fine
    pair.provider.chunk("", 2, tool_calls=(CALL, dataclasses.replace(CALL, index=1, id="call_2")))
    pair.provider.finish_call("stop", pair.now)
    settled = pair.to_consumer()[-1]
    assert [c.name for c in settled.tool_calls] == ["get_weather", "get_weather"]


def test_a_tool_call_must_begin_with_an_id():
    _both_refuse(dict(tools=(WEATHER,)), [(dataclasses.replace(CALL, id=""),)], "without an id")


# ---- #4: the id and name are given once, so every billed byte is shown ----------------------------


def test_a_later_delta_giving_the_id_or_name_again_is_refused_on_both_sides():
    again = [dict(id="call_1", name="get_weather"), dict(id="call_1"), dict(name="get_weather")]
    for repeat in again:
        later = (ToolCallDelta(index=0, arguments="{}", **repeat),)
        _both_refuse(dict(tools=(WEATHER,)), [(CALL,), later], "again")  # in a later chunk
        _both_refuse(dict(tools=(WEATHER,)), [(CALL, later[0])], "again")  # in the same chunk


def test_the_billed_bytes_of_tool_calls_are_the_bytes_settled():
    """r1.py(1): 320 deltas repeating a 64-byte id and name billed 2560 tokens for '{}'. Now an
    honest stream meters exactly the accumulated calls' bytes, and nothing else passes."""
    pair = _provider_call(tools=(WEATHER,), max_tokens=4096)
    sent = [(CALL,)] + [(ToolCallDelta(index=0, arguments="x"),)] * 20
    for deltas in sent:
        pair.provider.chunk("", 1, tool_calls=deltas)
    pair.provider.finish_call("stop", pair.now)
    settled = pair.to_consumer()[-1]
    (call,) = settled.tool_calls
    shown = len(call.id) + len(call.name) + len(call.arguments)
    assert sum(protocol.metered_bytes("", ds) for ds in sent) == shown
    assert settled.receipt.tokens_out <= shown + protocol.TOKEN_SLACK


# ---- #3: logprobs no more than the tokens claimed ----------------------------------------------------


def _lps(n: int) -> tuple[protocol.TokenLogprob, ...]:
    top = tuple(protocol.TopLogprob(token="t" * 256, neg_logprob_micro=i) for i in range(20))
    return tuple(protocol.TokenLogprob(token="a", neg_logprob_micro=1, top=top) for _ in range(n))


def test_logprobs_past_the_claimed_tokens_and_slack_are_refused_on_both_sides():
    """r1.py(2): chunks of no text claiming no tokens carried 24.5 MB of logprobs for a 1-token bill."""
    extras = dict(logprobs=True, top_logprobs=20)
    slack = protocol.TOKEN_SLACK
    pair = _provider_call(max_tokens=4096, **extras)
    pair.provider.chunk("", 0, logprobs=_lps(slack))  # tokens that decode to nothing: up to the slack
    pair.provider.chunk("abc", 3, logprobs=_lps(3))
    with pytest.raises(protocol.IllegalTransition, match="claimed tokens"):
        pair.provider.chunk("", 0, logprobs=_lps(1))
    pair = _consumer_call(max_tokens=4096, **extras)
    pair.consumer.receive(_forged(pair, 0, tokens=0, logprobs=_lps(slack)), pair.now)
    pair.consumer.receive(_forged(pair, 1, text="abc", tokens=3, logprobs=_lps(3)), pair.now)
    with pytest.raises(protocol.UnexpectedMessage, match="claimed tokens"):
        pair.consumer.receive(_forged(pair, 2, tokens=0, logprobs=_lps(1)), pair.now)


def test_logprobs_stay_within_max_tokens_too():
    pair = _consumer_call(max_tokens=4, logprobs=True)
    with pytest.raises(protocol.UnexpectedMessage, match="over the 4"):
        pair.consumer.receive(_forged(pair, text="abcde", tokens=4, logprobs=_lps(5)), pair.now)
    pair = _provider_call(max_tokens=4, logprobs=True, top_logprobs=20)
    with pytest.raises(protocol.IllegalTransition, match="over the 4"):
        pair.provider.chunk("abcd", 4, logprobs=_lps(5))


def test_an_honest_stream_with_a_logprob_per_token_settles():
    pair = _provider_call(max_tokens=64, logprobs=True, top_logprobs=20)
    for piece in ("Hel", "lo", " wor", "ld"):
        pair.provider.chunk(piece, 1, logprobs=_lps(1))
    pair.provider.finish_call("stop", pair.now)
    assert pair.to_consumer()[-1].text == "Hello world"


# ---- #5: an embedded input bills at most the context -------------------------------------------------


def _resign(r, **changes):
    return protocol.sign(dataclasses.replace(r, provider_sig=b"", **changes), "provider_sig", PROVIDER)


def test_an_embedded_input_bills_at_most_the_context_on_both_sides():
    """r7.py: a 10 KB input was counter-signed at 10008 tokens under a context of 4096."""
    pair = _opened(max_context=4096)
    sent = pair.consumer.embed(("x" * 10_000, "short"))
    pair.to_provider()
    bound = protocol.request_token_bound(sent, max_context=4096)
    assert bound == 4096 + (8 + 5) < protocol.request_token_bound(sent)
    assert pair.provider.start_call(20_000, pair.now) == 0
    pair.provider.embed_result(2, bytes(16))
    receipt = pair.provider.finish_call("stop", pair.now)
    assert receipt.tokens_in == bound
    over = _resign(receipt, tokens_in=bound + 1, cost=protocol.call_cost(receipt.price, bound + 1, 0),
                   cumulative=protocol.call_cost(receipt.price, bound + 1, 0))
    (result,) = [m for m in pair.provider.outgoing() if isinstance(m, protocol.EmbedResult)]
    pair.consumer.receive(result, pair.now)
    with pytest.raises(protocol.ReceiptPriceMismatch, match=f"over the {bound}"):
        pair.consumer.receive(over, pair.now)


def test_a_final_count_over_the_admitted_one_bills_the_admitted_one():
    """An upstream's usage (or a tokenizer) counting more than the bound bills the bound, on an
    embeddings call (whose inputs are capped at the context) as on a chat call: the provider
    never produces a receipt the consumer refuses."""
    pair = _opened(max_context=4096)
    sent = pair.consumer.embed(("x" * 10_000,))
    pair.to_provider()
    pair.provider.start_call(10_008, pair.now)
    pair.provider.embed_result(1, bytes(4))
    pair.provider.finish_call("stop", pair.now, tokens_in=10_008)
    events = pair.to_consumer()
    assert events[-1].receipt.tokens_in == protocol.request_token_bound(sent, 4096) == 4096
    pair = _provider_call()
    pair.provider.chunk("ok", 1)
    pair.provider.finish_call("stop", pair.now, tokens_in=5000)
    assert pair.to_consumer()[-1].receipt.tokens_in == 10  # what start_call admitted


# ---- #6: vectors are finite ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_vector_is_refused_on_both_sides(bad):
    vectors = struct.pack("<4f", 0.5, bad, 0.0, 1.0)
    assert not protocol.finite_vectors(vectors) and protocol.finite_vectors(struct.pack("<2f", 3.4e38, -0.0))
    pair = _opened()
    pair.consumer.embed(("a", "b"))
    pair.to_provider()
    pair.provider.start_call(4, pair.now)
    with pytest.raises(protocol.InvalidMessage, match="NaN or an infinity"):
        pair.provider.embed_result(2, vectors)
    pair = _opened()
    sent = pair.consumer.embed(("a", "b"))
    pair.consumer.outgoing()
    forged = protocol.EmbedResult(session_id=sent.session_id, call_seq=sent.call_seq, dims=2, vectors=vectors)
    with pytest.raises(protocol.UnexpectedMessage, match="NaN or an infinity"):
        pair.consumer.receive(forged, pair.now)


# ---- #8: the tools prompt bound covers a template's spaced rendering --------------------------------


def _request(messages=USER, **fields) -> protocol.RequestV2:
    return protocol.RequestV2(session_id=b"s" * 16, call_seq=0, messages=messages, max_tokens=8, **fields)


def _tools_bound(tools) -> int:
    return protocol.request_token_bound(_request(tools=tools)) - protocol.request_token_bound(_request())


def _rendered(tool: protocol.Tool) -> int:
    """The bytes of one tool as a template writes it: OpenAI's wrapper, spaced JSON."""
    fn = {"name": tool.name, "description": tool.description,
          "parameters": json.loads(tool.parameters) if tool.parameters else {}}
    return len(json.dumps({"type": "function", "function": fn}, ensure_ascii=False).encode())


def test_the_tools_bound_is_the_preamble_and_per_tool_overhead_plus_twice_the_bytes():
    assert _tools_bound((WEATHER,)) == protocol.TOOLS_OVERHEAD + protocol.TOOL_OVERHEAD + 2 * (
        len(WEATHER.name) + len(WEATHER.description) + len(WEATHER.parameters))
    assert _tools_bound(()) == 0


def test_a_tools_spaced_rendering_grows_at_most_twice_its_wire_bytes():
    """A template writes each tool inside OpenAI's wrapper as spaced JSON: past the wrapper's
    fixed part (TOOL_OVERHEAD), the rendering grows by at most twice the tool's wire bytes."""
    props = {f"p{i}": {"type": "integer", "enum": [1, 2], "description": "a, b: c"} for i in range(30)}
    tool = protocol.Tool(name="f", description="does f", parameters=protocol.canonical_json(
        {"type": "object", "properties": props}))
    empty = protocol.Tool(name="f")
    grown = _rendered(tool) - _rendered(empty)
    assert grown <= 2 * (len(tool.description) + len(tool.parameters) - len("{}"))


def test_128_tools_stay_within_the_bound():
    """r4.py: with the builtin template, 128 bare tools counted 2265 prompt tokens against a bound
    of 1968, and 128 tools of 30 properties 102873 against 100784."""
    bare = tuple(protocol.Tool(name=f"f{i}") for i in range(128))
    messages = protocol.request_token_bound(_request((Turn(role="user", content="hi"),)))  # r4's prompt
    assert messages + _tools_bound(bare) >= 2265
    props = {f"p{i}": {"type": "integer"} for i in range(30)}
    params = protocol.canonical_json({"type": "object", "properties": props})
    tools = tuple(protocol.Tool(name=f"f{i}", parameters=params) for i in range(128))
    assert messages + _tools_bound(tools) >= 102873
    # even one token per byte of each tool's spaced rendering is billable
    assert sum(_rendered(t) for t in tools) <= _tools_bound(tools) - protocol.TOOLS_OVERHEAD


# ---- #9: a request's JSON is the shape it claims -------------------------------------------------------


def _deep(levels: int) -> dict:
    """A schema nesting ``levels`` JSON objects."""
    schema: dict = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("fields, says", [
    (dict(json_schema="[1]"), "not a JSON object"),
    (dict(json_schema='{"schema":5}'), "string name and an object schema"),
    (dict(json_schema='{"name":"x","schema":5}'), "string name and an object schema"),
    (dict(json_schema='{"name":5,"schema":{}}'), "string name and an object schema"),
    (dict(json_schema='{"name":"x"}'), "string name and an object schema"),
    (dict(json_schema="{nope"), "not JSON"),
    (dict(json_schema="[" * 65536), "deeper than 32"),
    (dict(json_schema=protocol.canonical_json({"name": "x", "schema": _deep(32)})), "deeper than 32"),
    (dict(tools=(protocol.Tool(name="f", parameters="[1]"),)), "not a JSON object"),
    (dict(tools=(protocol.Tool(name="f", parameters="5"),)), "not a JSON object"),
    (dict(tools=(protocol.Tool(name="f", parameters='{"a":' * 13000),)), "deeper than 32"),
    (dict(tools=(protocol.Tool(name="f", parameters=protocol.canonical_json(_deep(33))),)), "deeper than 32"),
])
def test_malformed_json_in_a_v2_request_is_refused_by_both_machines(fields, says):
    if "json_schema" in fields:
        fields = dict(fields, response_format="json_schema")
    pair = _opened()
    with pytest.raises(protocol.InvalidMessage, match=says):
        pair.consumer.request(USER, 8, **fields)
    assert not pair.consumer.outgoing()
    forged = protocol.RequestV2(session_id=pair.consumer.session_id, call_seq=0, messages=USER, max_tokens=8, **fields)
    assert pair.provider.receive(forged, pair.now) == []
    (error,) = pair.provider.outgoing()
    assert isinstance(error, protocol.CallError) and error.reason == "bad_request" and says in error.detail


def test_json_nesting_up_to_32_levels_is_taken():
    ok = _request(response_format="json_schema", json_schema=protocol.canonical_json({"name": "x", "schema": _deep(31)}),
                  tools=(protocol.Tool(name="f", parameters=protocol.canonical_json(_deep(32))),))
    assert protocol.request_problem(ok) == ""
    assert protocol.request_problem(_request(tools=(protocol.Tool(name="f"),))) == ""  # no parameters: fine


def test_a_settled_forced_call_keeps_its_name():
    """A sanity check that a whole honest forced call still settles with the accumulated call."""
    pair = _provider_call(tools=(WEATHER,), tool_choice="function:get_weather")
    pair.provider.chunk("", 3, tool_calls=(dataclasses.replace(CALL, arguments='{"city":'),))
    pair.provider.chunk("", 3, tool_calls=(ToolCallDelta(index=0, arguments='"Paris"}'),))
    pair.provider.finish_call("stop", pair.now)
    settled = pair.to_consumer()[-1]
    assert settled.tool_calls == (ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}'),)
