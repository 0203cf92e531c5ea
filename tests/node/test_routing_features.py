"""Routing by what a call needs: an offer serves a call only when its listed features hold every
one the call needs; embeddings calls go only to embeddings offers and chat never to an
embeddings-only one; when no offer can serve, the refusal names the missing feature and the
request field that asked for it. The checks before money moves: a v2 call is built and encoded
whole, and an embeddings request is split into calls of at most ``MAX_EMBED_INPUTS`` inputs and
one frame each."""

from __future__ import annotations

import random

import pytest

import protocol
from node._calls import CallOptions
from node._errors import InvalidRequest
from node.consumer._request_check import check_call, embed_batches
from node.consumer._routing import Preferences, UnsupportedFeature, missing_feature, rank, serves
from node.consumer._trust import ProviderStats
from tests.support import identity

A, B, C = (identity(f"feat-{n}").peer_id for n in "abc")
AGENT = identity("feat-agent").peer_id
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
HI = [{"role": "user", "content": "hi"}]


def row(peer, features):
    listing = protocol.Listing(provider=peer, addrs=(), seq=1, issued_at=1, expires_at=2, provider_type="self_hosted",
                               models=(), escrow_agents=(AGENT,), hardware=protocol.Hardware())
    offer = protocol.ModelOffer(name="m", price=protocol.Price(input_per_1k=100, output_per_1k=100), max_context=4096,
                                features=features)
    return listing, offer


ROWS = [row(A, ("streaming",)), row(B, ("streaming", "tools", "json")), row(C, ("embeddings",))]


def chosen(options=CallOptions(), kind: str | None = "chat", rows=ROWS):
    return [c.provider for c in rank(rows, Preferences(), prompt_tokens=10, max_tokens=10,
                                     stats=lambda p: ProviderStats(p), agent_for=lambda lst: AGENT,
                                     rng=random.Random(0), needs=options.needs(), kind=kind)]


def test_a_plain_chat_goes_to_any_chat_offer_never_to_an_embeddings_one():
    assert sorted(chosen()) == sorted([A, B])


def test_a_call_with_tools_goes_only_to_offers_listing_tools():
    assert chosen(CallOptions(tools=(TOOL,))) == [B]
    assert chosen(CallOptions(tools=(TOOL,), response_format={"type": "json_object"})) == [B]
    # tools that the call tells the model not to use need nothing
    assert sorted(chosen(CallOptions(tools=(TOOL,), tool_choice="none"))) == sorted([A, B])


def test_an_embeddings_call_goes_only_to_embeddings_offers():
    assert chosen(kind="embeddings") == [C]
    assert sorted(chosen(kind=None)) == sorted([A, B, C])  # a listing of the model's providers: every kind
    both = row(A, ("streaming", "embeddings"))
    assert serves(both[1], frozenset(), "embeddings") and serves(both[1], frozenset(), "chat")


@pytest.mark.parametrize("options,field,words", [
    (CallOptions(tools=(TOOL,)), "tools", "supports tools"),
    (CallOptions(logprobs=True), "logprobs", "supports logprobs"),
    (CallOptions(prompt="Once upon"), "prompt", "supports completions"),
    (CallOptions(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
     "response_format", "supports json"),
])
def test_no_offer_with_the_feature_is_a_refusal_naming_it(options, field, words):
    refusal = missing_feature("m", ROWS[:1], options.needs())
    assert isinstance(refusal, UnsupportedFeature) and isinstance(refusal, InvalidRequest)
    assert (refusal.field, refusal.code) == (field, "unsupported_feature")
    assert str(refusal) == f"no provider of 'm' {words}"
    assert missing_feature("m", ROWS, frozenset({"tools"})) is None  # B lists it
    assert missing_feature("m", [], options.needs()) is None  # nobody offers m: why_none says so


def test_the_wrong_kind_of_model_is_named():
    chat_only = missing_feature("m", ROWS[:2], frozenset(), "embeddings")
    assert chat_only is not None and "serves embeddings" in str(chat_only) and chat_only.field == "model"
    embeddings_only = missing_feature("m", ROWS[2:], frozenset())
    assert embeddings_only is not None and "embeddings model" in str(embeddings_only)


def test_features_split_across_offers_are_no_offer_with_both():
    rows = [row(A, ("tools",)), row(B, ("logprobs",))]
    refusal = missing_feature("m", rows, frozenset({"tools", "logprobs"}))
    assert refusal is not None and "together" in str(refusal)


# ---- the checks before money moves -------------------------------------------------------------


def test_a_plain_call_is_checked_as_a_v1_request_and_an_agent_call_as_v2():
    assert isinstance(check_call(HI, 8, 1000, 1000, ()), protocol.Request)
    request = check_call(HI, 8, 1000, 1000, (), CallOptions(tools=(TOOL,), tool_choice="auto"))
    assert isinstance(request, protocol.RequestV2) and request.tools[0].name == "get_weather"
    assert request.tools[0].parameters == protocol.canonical_json(TOOL["function"]["parameters"])
    turns = HI + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"}]
    request = check_call(turns, 8, 1000, 1000, (), CallOptions(tools=(TOOL,)))
    assert request.messages[1].tool_calls[0].arguments == '{"city":"Oslo"}'
    assert request.messages[2].tool_call_id == "call_1"
    # the bound on what the prompt may be billed covers the tools and the calls
    assert protocol.request_token_bound(request) > protocol.request_token_bound(check_call(HI, 8, 1000, 1000, ()))


def test_a_legacy_prompt_is_a_v2_request_without_messages():
    request = check_call([], 8, 1000, 1000, (), CallOptions(prompt="Once upon a time"))
    assert isinstance(request, protocol.RequestV2) and request.prompt == "Once upon a time" and not request.messages


@pytest.mark.parametrize("options,field", [
    (CallOptions(tools=(TOOL,), tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (CallOptions(tool_choice="required"), "tool_choice"),
    (CallOptions(tools=(TOOL,) * 129), "tools"),
    (CallOptions(logprobs=True, top_logprobs=21), "top_logprobs"),
    (CallOptions(response_format={"type": "xml"}), "response_format"),
])
def test_an_agent_call_out_of_the_wires_bounds_is_the_callers_400(options, field):
    with pytest.raises(InvalidRequest) as caught:
        check_call(HI, 8, 1000, 1000, (), options)
    assert caught.value.field == field, caught.value


def test_a_tool_schema_over_one_frame_is_too_large():
    tools = tuple({"type": "function", "function": {"name": f"f{i}", "parameters": {"description": "x" * 60000}}}
                  for i in range(20))
    with pytest.raises(protocol.MessageTooLarge):
        check_call(HI, 8, 1000, 1000, (), CallOptions(tools=tools))


def test_embeddings_inputs_are_split_into_calls_that_fit():
    assert embed_batches(["a"]) == [("a",)]
    many = [f"text {i}" for i in range(protocol.MAX_EMBED_INPUTS * 2 + 1)]
    batches = embed_batches(many)
    assert [len(b) for b in batches] == [protocol.MAX_EMBED_INPUTS, protocol.MAX_EMBED_INPUTS, 1]
    assert [t for b in batches for t in b] == many  # in order, none lost
    big = ["x" * 400_000] * 5  # 2 MB: over one frame together, so split by size
    sized = embed_batches(big)
    assert len(sized) == 3 and [t for b in sized for t in b] == big


@pytest.mark.parametrize("inputs,dimensions,field", [
    ([], 0, "input"),
    (["a", 7], 0, "input.1"),
    (["x" * ((1 << 20) + 1)], 0, "input.0"),
    (["a"], protocol.MAX_EMBED_DIMS + 1, "dimensions"),
])
def test_bad_embeddings_inputs_are_refused_before_money_moves(inputs, dimensions, field):
    with pytest.raises(InvalidRequest) as caught:
        embed_batches(inputs, dimensions)
    assert caught.value.field == field
