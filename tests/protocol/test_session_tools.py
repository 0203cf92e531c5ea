"""v2 chat calls through both machines: tool-call deltas, logprobs, cancel mid tool call, v1 when
plain, and every dishonest variation the consumer refuses."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import ConsumerState, ToolCall, ToolCallDelta, Turn
from tests.support import PROVIDER, Pair

TOOL = protocol.Tool(name="get_weather", description="weather by city",
                     parameters=protocol.canonical_json({"type": "object", "properties": {"city": {"type": "string"}}}))
USER = (Turn(role="user", content="weather in Paris?"),)


def _start(pair: Pair, tokens_in: int = 10, **extras) -> int:
    extras.setdefault("tools", (TOOL,))
    pair.consumer.request(USER, 64, **extras)
    (ev,) = pair.to_provider()
    assert isinstance(ev, protocol.CallRequested)
    limit = pair.provider.start_call(tokens_in, pair.now)
    assert limit is not None
    return limit


def _settle(pair: Pair):
    events = pair.to_consumer()
    settled = events[-1]
    assert isinstance(settled, protocol.ReceiptSettled), events
    (countersigned,) = pair.to_provider()
    assert isinstance(countersigned, protocol.Countersigned)
    pair.to_consumer()
    return events, settled


def _resign(r, **changes):
    return protocol.sign(dataclasses.replace(r, provider_sig=b"", **changes), "provider_sig", PROVIDER)


def _opened() -> Pair:
    pair = Pair()
    pair.open()
    return pair


# ---- helpers ------------------------------------------------------------------------------------


def test_accumulate_tool_calls_first_id_and_name_win_arguments_concatenate():
    deltas = [ToolCallDelta(index=1, id="b", name="g", arguments="{"), ToolCallDelta(index=0, id="a", name="f"),
              ToolCallDelta(index=1, id="x", name="y", arguments="}"), ToolCallDelta(index=0, arguments="[]")]
    assert protocol.accumulate_tool_calls(deltas) == (ToolCall(id="a", name="f", arguments="[]"),
                                                      ToolCall(id="b", name="g", arguments="{}"))
    assert protocol.accumulate_tool_calls([]) == ()


def test_call_output_hash_is_v1s_without_tool_calls_and_covers_them_with():
    assert protocol.call_output_hash("hi") == protocol.output_hash("hi")
    one = protocol.call_output_hash("hi", (ToolCall(id="a", name="f", arguments="{}"),))
    assert one != protocol.output_hash("hi")
    assert one != protocol.call_output_hash("hi", (ToolCall(id="a", name="f", arguments="{ }"),))


def test_canonical_json_sorts_packs_and_refuses_nan():
    assert protocol.canonical_json({"b": 1, "a": ["é", 2]}) == '{"a":["é",2],"b":1}'
    with pytest.raises(ValueError):
        protocol.canonical_json({"x": float("nan")})


def test_request_token_bound_of_each_kind():
    v1 = protocol.Request(session_id=b"s" * 16, call_seq=0, messages=(protocol.ChatMessage(role="user", content="ab"),),
                          max_tokens=5)
    assert protocol.request_token_bound(v1) == protocol.prompt_token_bound([("user", "ab")]) == 16 + 8 + 4 + 2
    call = ToolCall(id="c1", name="f", arguments="{}")
    v2 = protocol.RequestV2(session_id=b"s" * 16, call_seq=0, max_tokens=5, tools=(protocol.Tool(name="f", parameters="{}"),),
                            messages=(Turn(role="assistant", content="", tool_calls=(call,)),
                                      Turn(role="tool", content="ok", name="f", tool_call_id="c1")),
                            response_format="json_schema", json_schema='{"name":"x"}')
    turns = (8 + 9 + 0 + 0 + 0 + (2 + 1 + 2)) + (8 + 4 + 2 + 1 + 2)
    tools = protocol.TOOLS_OVERHEAD + protocol.TOOL_OVERHEAD + 2 * (1 + 0 + 2)
    assert protocol.request_token_bound(v2) == 16 + turns + tools + len('{"name":"x"}')
    completion = protocol.RequestV2(session_id=b"s" * 16, call_seq=0, messages=(), max_tokens=5, prompt="once upon")
    assert protocol.request_token_bound(completion) == 16 + 9
    embed = protocol.EmbedRequest(session_id=b"s" * 16, call_seq=0, inputs=("ab", "ü"))
    assert protocol.request_token_bound(embed) == (8 + 2) + (8 + 2)
    assert protocol.request_token_bound(embed, max_context=9) == 9 + 9  # an input is at most the context
    assert protocol.request_token_bound(v2, max_context=9) == protocol.request_token_bound(v2)


# ---- round trips ----------------------------------------------------------------------------------


def test_a_plain_call_stays_v1_even_with_turns():
    pair = _opened()
    sent = pair.consumer.request(USER, 16)
    assert type(sent) is protocol.Request and sent.messages == (protocol.ChatMessage(role="user", content=USER[0].content),)
    (ev,) = pair.to_provider()
    assert type(ev.request) is protocol.Request
    pair.provider.start_call(5, pair.now)
    assert type(pair.provider.chunk("hi", 1)) is protocol.Chunk
    with pytest.raises(protocol.IllegalTransition, match="v2"):
        pair.provider.chunk("x", 1, tool_calls=(ToolCallDelta(index=0, id="a", name="f"),))


def test_any_extra_or_rich_turn_makes_it_v2():
    for extras in ({"seed": 7}, {"user": "u"}, {"logprobs": True}, {"response_format": "json_object"}):
        pair = _opened()
        assert type(pair.consumer.request(USER, 8, **extras)) is protocol.RequestV2
    pair = _opened()
    rich = (protocol.ChatMessage(role="user", content="q"), Turn(role="tool", content="42", tool_call_id="c1"))
    sent = pair.consumer.request(rich, 8)
    assert type(sent) is protocol.RequestV2 and sent.messages[0] == Turn(role="user", content="q")


def test_a_v2_call_with_tool_call_deltas_and_logprobs_settles_with_the_accumulated_calls():
    pair = _opened()
    _start(pair, logprobs=True, top_logprobs=2)
    lp = protocol.TokenLogprob(token="Let", neg_logprob_micro=120_000,
                               top=(protocol.TopLogprob(token="Let", neg_logprob_micro=120_000),))
    c0 = pair.provider.chunk("Let me check. ", 4, logprobs=(lp,))
    assert type(c0) is protocol.ChunkV2
    pair.provider.chunk("", 3, tool_calls=(ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"ci'),))
    pair.provider.chunk("", 4, tool_calls=(ToolCallDelta(index=0, arguments='ty":"Paris"}'),
                                           ToolCallDelta(index=1, id="call_2", name="get_weather", arguments="{}")))
    pair.provider.finish_call("stop", pair.now)
    events, settled = _settle(pair)
    assert [type(e) for e in events] == [protocol.ChunkReceived] * 3 + [protocol.ReceiptSettled]
    calls = (ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}'),
             ToolCall(id="call_2", name="get_weather", arguments="{}"))
    assert settled.tool_calls == calls and settled.text == "Let me check. "
    r = settled.receipt
    assert r.output_hash == protocol.call_output_hash("Let me check. ", calls)
    assert r.finish_reason == "stop" and r.tokens_out == 11
    assert pair.consumer.receipts == pair.provider.receipts


def test_tool_call_bytes_are_billable_text():
    """A call of tool calls alone (no text) bills the tokens its deltas' bytes allow, not TOKEN_SLACK."""
    pair = _opened()
    _start(pair)
    args = '{"city":"' + "x" * 60 + '"}'
    pair.provider.chunk("", 40, tool_calls=(ToolCallDelta(index=0, id="c", name="get_weather", arguments=args),))
    pair.provider.finish_call("stop", pair.now)
    _, settled = _settle(pair)
    assert settled.receipt.tokens_out == 40 > protocol.TOKEN_SLACK
    assert settled.text == "" and settled.tool_calls[0].arguments == args


def test_a_cancel_mid_tool_call_bills_the_prefix_and_its_partial_call():
    pair = _opened()
    _start(pair)
    pair.provider.chunk("", 2, tool_calls=(ToolCallDelta(index=0, id="c", name="get_weather", arguments='{"ci'),))
    pair.provider.chunk("", 2, tool_calls=(ToolCallDelta(index=0, arguments='ty":'),))
    pair.to_consumer()
    pair.consumer.cancel(1)
    (ev,) = pair.to_provider()
    assert isinstance(ev, protocol.CallCancelled)
    pair.provider.finish_call("stop", pair.now)
    _, settled = _settle(pair)
    partial = (ToolCall(id="c", name="get_weather", arguments='{"ci'),)
    assert settled.cancelled and settled.tool_calls == partial
    assert settled.receipt.output_hash == protocol.call_output_hash("", partial)
    size = protocol.metered_bytes("", (ToolCallDelta(index=0, id="c", name="get_weather", arguments='{"ci'),))
    assert settled.receipt.tokens_out == protocol.cancelled_output_tokens(2, size)
    assert settled.receipt.finish_reason == protocol.CANCELLED_FINISH


def test_a_completion_prompt_call_travels_as_v2():
    pair = _opened()
    pair.consumer.request((), 8, prompt="Once upon a time")
    (ev,) = pair.to_provider()
    assert ev.request.prompt == "Once upon a time" and ev.request.messages == ()
    pair.provider.start_call(4000, pair.now)
    pair.provider.chunk(" there", 1)
    pair.provider.finish_call("length", pair.now)
    _, settled = _settle(pair)
    assert settled.receipt.tokens_in == protocol.request_token_bound(ev.request)  # billed the bound, not 4000


deltas_strategy = st.lists(st.tuples(st.text(max_size=6), st.lists(st.tuples(
    st.integers(0, 2), st.text("abc", min_size=1, max_size=3), st.text('{}":x', max_size=8)),
    max_size=2)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(deltas_strategy, st.integers(0, 8))
def test_any_split_of_text_and_tool_call_deltas_is_countersigned(pieces, cut):
    pair = _opened()
    _start(pair)
    sent, begun = [], set()
    for text, ds in pieces:
        deltas = []
        for i, cid, a in ds:  # a call's first delta gives its id and function, later ones neither
            first = i not in begun
            deltas.append(ToolCallDelta(index=i, id=cid if first else "", name="get_weather" if first else "",
                                        arguments=a))
            begun.add(i)
        deltas = tuple(deltas)
        tokens = max(1, -(-protocol.metered_bytes(text, deltas) // protocol.MAX_BYTES_PER_TOKEN))  # an honest count
        pair.provider.chunk(text, tokens, tool_calls=deltas)
        sent.append((text, deltas))
    pair.to_consumer()
    cut = min(cut, len(sent))
    cancelled = cut < len(sent)
    if cancelled:
        pair.consumer.cancel(cut)
        pair.to_provider()
    pair.provider.finish_call("stop", pair.now)
    _, settled = _settle(pair)
    kept = sent[:cut] if cancelled else sent
    calls = protocol.accumulate_tool_calls(d for _, ds in kept for d in ds)
    assert settled.text == "".join(t for t, _ in kept) and settled.tool_calls == calls
    assert settled.receipt.output_hash == protocol.call_output_hash(settled.text, calls)
    assert pair.consumer.receipts == pair.provider.receipts and pair.consumer.state is ConsumerState.READY


# ---- what the consumer refuses --------------------------------------------------------------------


def _forged_chunk(pair: Pair, cls=protocol.ChunkV2, **fields):
    base = dict(session_id=pair.consumer.session_id, call_seq=pair.consumer.next_seq, index=0, text="x", tokens=1)
    return cls(**{**base, **fields})


def test_a_v1_chunk_on_a_v2_call_and_a_v2_chunk_on_a_v1_call_are_refused():
    pair = _opened()
    _start(pair)
    with pytest.raises(protocol.UnexpectedMessage, match="call_chunk v1 on a call_request v2"):
        pair.consumer.receive(_forged_chunk(pair, protocol.Chunk), pair.now)
    pair = _opened()
    pair.consumer.request(USER, 8)
    with pytest.raises(protocol.UnexpectedMessage, match="call_chunk v2 on a call_request v1"):
        pair.consumer.receive(_forged_chunk(pair), pair.now)


def test_tool_call_bytes_count_against_the_byte_limit():
    pair = _opened()
    pair.consumer.request(USER, 2, tools=(TOOL,))  # at most 64 bytes of text and tool calls
    big = (ToolCallDelta(index=0, id="c", name="get_weather", arguments="x" * 53),)
    with pytest.raises(protocol.UnexpectedMessage, match="bytes of text and tool calls"):
        pair.consumer.receive(_forged_chunk(pair, text="", tool_calls=big), pair.now)


def test_a_receipt_whose_hash_ignores_the_tool_calls_is_refused():
    pair = _opened()
    _start(pair)
    chunk = pair.provider.chunk("ok", 1, tool_calls=(ToolCallDelta(index=0, id="c", name="get_weather", arguments="{}"),))
    receipt = pair.provider.finish_call("stop", pair.now)
    pair.provider.outgoing()
    pair.consumer.receive(chunk, pair.now)
    with pytest.raises(protocol.ReceiptHashMismatch, match="text and tool calls"):
        pair.consumer.receive(_resign(receipt, output_hash=protocol.output_hash("ok")), pair.now)


def test_a_receipt_billing_too_few_tokens_for_the_tool_call_bytes_is_refused():
    """Tool-call bytes count for the 32 bytes per token rule too: a provider cannot stream a
    megabyte of arguments for one token."""
    pair = _opened()
    pair.consumer.request(USER, 64, tools=(TOOL,))
    args = "x" * 100
    chunk = _forged_chunk(pair, text="", tokens=1,
                          tool_calls=(ToolCallDelta(index=0, id="c", name="get_weather", arguments=args),))
    pair.consumer.receive(chunk, pair.now)
    call = ToolCall(id="c", name="get_weather", arguments=args)
    r = _forged_receipt(pair, tokens_out=1, output_hash=protocol.call_output_hash("", (call,)))
    with pytest.raises(protocol.ReceiptPriceMismatch, match="bytes per token"):
        pair.consumer.receive(r, pair.now)


def _forged_receipt(pair: Pair, tokens_in: int = 5, tokens_out: int = 0, output_hash: bytes = bytes(32)):
    c = pair.consumer
    cost = protocol.call_cost(c.price, tokens_in, tokens_out)
    r = protocol.Receipt(session_id=c.session_id, call_seq=c.next_seq, model=c.model, provider=c.provider,
                         consumer=c.me, agent=c.channel.agent, channel_id=c.channel.channel_id,
                         input_hash=protocol.request_hash(c._request), output_hash=output_hash, tokens_in=tokens_in,
                         tokens_out=tokens_out, finish_reason="stop", price=c.price, cost=cost,
                         cumulative=c.cumulative + cost, prev_hash=c.last_hash, issued_at=pair.now)
    return protocol.sign(r, "provider_sig", PROVIDER)


def test_a_v2_receipt_over_the_request_token_bound_is_refused():
    pair = _opened()
    sent = pair.consumer.request(USER, 8, tools=(TOOL,))
    bound = protocol.request_token_bound(sent)
    assert bound > protocol.TOOLS_OVERHEAD
    pair.consumer.receive(_forged_chunk(pair, text="ok", tokens=1), pair.now)
    ok_hash = protocol.output_hash("ok")
    with pytest.raises(protocol.ReceiptPriceMismatch, match=f"over the {bound}"):
        pair.consumer.receive(_forged_receipt(pair, bound + 1, 1, ok_hash), pair.now)


def test_the_provider_bills_at_most_the_v2_bound():
    pair = _opened()
    _start(pair, tokens_in=4000)
    pair.provider.chunk("ok", 1)
    receipt = pair.provider.finish_call("stop", pair.now)
    assert receipt.tokens_in == protocol.request_token_bound(pair.consumer._request)
    _settle(pair)


def test_logprobs_the_call_did_not_ask_for_are_refused_on_both_sides():
    pair = _opened()
    _start(pair)
    lp = (protocol.TokenLogprob(token="a", neg_logprob_micro=1),)
    with pytest.raises(protocol.IllegalTransition, match="did not ask"):
        pair.provider.chunk("a", 1, logprobs=lp)
    pair = _opened()
    pair.consumer.request(USER, 8, tools=(TOOL,))
    with pytest.raises(protocol.UnexpectedMessage, match="did not ask"):
        pair.consumer.receive(_forged_chunk(pair, logprobs=lp), pair.now)
    pair = _opened()
    pair.consumer.request(USER, 8, logprobs=True, top_logprobs=1)
    two = (protocol.TokenLogprob(token="a", neg_logprob_micro=1, top=(protocol.TopLogprob(token="a", neg_logprob_micro=1),
                                                                      protocol.TopLogprob(token="b", neg_logprob_micro=9))),)
    with pytest.raises(protocol.UnexpectedMessage, match="top logprobs"):
        pair.consumer.receive(_forged_chunk(pair, logprobs=two), pair.now)


@pytest.mark.parametrize("extras, says", [
    (dict(prompt="p"), "without messages"),
    (dict(tool_choice="required", tools=()), "needs tools"),
    (dict(tool_choice="function:nope"), "not one of the tools"),
    (dict(tool_choice="sometimes"), "is not none"),
    (dict(response_format="json_schema"), "json_schema"),
    (dict(json_schema='{"name":"x"}'), "json_schema"),
])
def test_a_malformed_v2_request_is_refused_by_the_consumer_and_the_provider(extras, says):
    extras = {"tools": (TOOL,), **extras}
    pair = _opened()
    with pytest.raises(protocol.InvalidMessage, match=says):
        pair.consumer.request(USER, 8, **extras)
    assert pair.consumer.state is ConsumerState.READY and not pair.consumer.outgoing()  # nothing changed
    pair = _opened()
    forged = protocol.RequestV2(session_id=pair.consumer.session_id, call_seq=0, messages=USER, max_tokens=8, **extras)
    assert pair.provider.receive(forged, pair.now) == []
    (error,) = pair.provider.outgoing()
    assert isinstance(error, protocol.CallError) and error.reason == "bad_request" and says in error.detail
    assert pair.provider.state is protocol.ProviderState.READY


def test_a_whole_v2_receipt_crossing_the_cancel_is_replaced_by_the_prefix_receipt():
    pair = _opened()
    _start(pair)
    first = (ToolCallDelta(index=0, id="c", name="get_weather", arguments='{"a'),)
    pair.provider.chunk("", 2, tool_calls=first)
    pair.to_consumer()
    pair.consumer.cancel()  # after one chunk
    pair.provider.chunk("", 2, tool_calls=(ToolCallDelta(index=0, arguments='":1}'),))
    whole = pair.provider.finish_call("stop", pair.now)  # finished before it read the Cancel
    events = pair.to_consumer()
    assert not any(isinstance(e, protocol.ReceiptSettled) for e in events)
    (ev,) = pair.to_provider()
    assert isinstance(ev, protocol.CallCancelled)
    _, settled = _settle(pair)
    assert settled.cancelled and settled.tool_calls == (ToolCall(id="c", name="get_weather", arguments='{"a'),)
    assert settled.receipt.tokens_out < whole.tokens_out


def test_a_tool_call_that_begins_without_a_name_is_refused_on_both_sides():
    pair = _opened()
    _start(pair)
    with pytest.raises(protocol.IllegalTransition, match="without the function's name"):
        pair.provider.chunk("", 1, tool_calls=(ToolCallDelta(index=0, id="c", arguments="{}"),))
    pair = _opened()
    pair.consumer.request(USER, 8, tools=(TOOL,))
    named = _forged_chunk(pair, tool_calls=(ToolCallDelta(index=0, id="c", name="get_weather"),))
    pair.consumer.receive(named, pair.now)
    later = _forged_chunk(pair, index=1, tool_calls=(ToolCallDelta(index=0, arguments="{}"),
                                                     ToolCallDelta(index=1, arguments="{}")))
    with pytest.raises(protocol.UnexpectedMessage, match="without the function's name"):
        pair.consumer.receive(later, pair.now)
