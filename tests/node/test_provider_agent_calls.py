"""The provider's session service serves agent calls over the real session protocol (the in-memory
market of ``session_rig``): a v2 call's tool calls and logprobs reach the consumer and settle with
one receipt both sides hold; an embeddings call settles at tokens × price; calls the offer does not
serve are refused and cost nothing; closing a session mid-embed bills nothing."""

from __future__ import annotations

import json
import struct
from typing import Any, Sequence

import pytest
import trio

import protocol
from node._calls import CallOptions
from node.consumer._session_client import CallRefused
from node.provider._chunks import wire_pieces
from node.provider._offers import Offer
from node.provider.backends._base import (
    CHAT_FEATURES,
    Backend,
    BackendUnsupported,
    Embedded,
    EmbeddingBackend,
    Generation,
    OnPiece,
)
from tests.node.session_rig import ScriptedBackend, session_rig

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
USER = [{"role": "user", "content": "Weather in Paris and Rome?"}]
CHAT = Offer(model="m", backend="builtin", input_price=100_000, output_price=200_000, max_context=65_536)
EMB = Offer(model="e", backend="embeddings:builtin", input_price=50_000, output_price=0)


class AgentBackend(Backend):
    """A chat backend that calls every tool offered (arguments streamed in pieces, or one
    ``big_args``-byte argument), answers text otherwise, with a logprob per token when asked."""

    spec = "agent"

    def __init__(self, claims: Sequence[str] = CHAT_FEATURES, big_args: int = 0) -> None:
        self.claims, self.big_args = tuple(claims), big_args
        self.options: CallOptions | None = None

    def features(self) -> tuple[str, ...]:
        return self.claims

    async def count_prompt_tokens(self, messages, options=CallOptions()) -> int:
        return sum(len(m["content"]) for m in messages)

    async def generate(self, messages, *, max_tokens, temperature_milli, top_p_milli, stop, on_piece: OnPiece,
                       options=CallOptions()) -> Generation:
        self.options = options
        if options.seed == 13:
            raise BackendUnsupported("this model cannot honour a seed")
        if options.tools:
            sent = 0
            for index, city in enumerate(("Paris", "Rome")):
                args = json.dumps({"city": city if not self.big_args else "x" * self.big_args})
                await on_piece("", 1, tool_calls=(protocol.ToolCallDelta(index=index, id=f"call_{index}",
                                                                         name="get_weather"),))
                step = len(args) if self.big_args else 4  # a long argument comes in one piece
                for i in range(0, len(args), step):
                    tokens = max(1, step // 8)  # a token per 8 bytes: within 32 bytes per billed token
                    await on_piece("", tokens, tool_calls=(protocol.ToolCallDelta(index=index,
                                                                                  arguments=args[i:i + step]),))
                    sent += tokens
                sent += 1
            return Generation("stop", sent)
        for word in ("Hello", " world"):
            lps = (protocol.TokenLogprob(token=word, neg_logprob_micro=125_000, top=(
                protocol.TopLogprob(token="x", neg_logprob_micro=2_000_000),)),) if options.logprobs else ()
            await on_piece(word, 1, logprobs=lps)
        return Generation("stop", 2)


class Embedder(EmbeddingBackend):
    """Vectors of ``dims`` values (the text's length, then ones); a token per word and one per text.
    ``hang``: embedding waits until cancelled (``cancelled`` is then set)."""

    spec = "embeddings:scripted"

    def __init__(self, dims: int = 4, hang: bool = False) -> None:
        self.dims, self.hang = dims, hang
        self.started, self.cancelled = trio.Event(), trio.Event()

    async def count_input_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(t.split()) + 1 for t in texts)

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> Embedded:
        if dimensions and dimensions != self.dims:
            raise BackendUnsupported(f"this model embeds in {self.dims} dimensions only")
        self.started.set()
        if self.hang:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled.set()
                raise
        rows = b"".join(struct.pack(f"<{self.dims}f", float(len(t)), *([1.0] * (self.dims - 1))) for t in texts)
        return Embedded(rows, self.dims, await self.count_input_tokens(texts))


def _price(offer: Offer) -> protocol.Price:
    return offer.to_model_offer().price


def _held(rig: Any) -> list[str]:
    """The ids of the receipts the provider stored (counter-signed), in order."""
    return [row["receipt_id"] for row in rig.provider_service.receipts.list()]


async def test_a_v2_call_with_tool_calls_settles_with_matching_receipts():
    backend = AgentBackend()
    async with session_rig({"m": CHAT}, {"m": backend}, tag="agent-tools") as rig:
        async with rig.session(await rig.open_channel(cap=1_000_000), model="m") as session:
            result = await session.call(USER, 100, options=CallOptions(tools=(WEATHER,), tool_choice="auto"))
        assert backend.options is not None and backend.options.tools == (WEATHER,)
        assert [(c.id, c.name, json.loads(c.arguments)) for c in result.tool_calls] == [
            ("call_0", "get_weather", {"city": "Paris"}), ("call_1", "get_weather", {"city": "Rome"})]
        r = result.receipt
        assert result.finish_reason == "tool_calls" and r.finish_reason == "stop"
        assert r.output_hash == protocol.call_output_hash("", result.tool_calls)
        assert r.cost == protocol.call_cost(_price(CHAT), r.tokens_in, r.tokens_out) and r.tokens_out > 0
        assert _held(rig) == [protocol.receipt_hash(r).hex()]


async def test_logprobs_and_long_tool_arguments_cross_in_chunks_that_fit_a_frame():
    big = 150_000  # over a chunk's worth of arguments: continued in deltas of the same index
    cheap = Offer(model="m", backend="builtin", input_price=1, output_price=1, max_context=65_536)
    async with session_rig({"m": cheap}, {"m": AgentBackend(big_args=big)}, tag="agent-big") as rig:
        async with rig.session(await rig.open_channel(cap=1_000_000), model="m") as session:
            called = await session.call(USER, 60_000, options=CallOptions(tools=(WEATHER,)))
            said = await session.call(USER, 10, options=CallOptions(logprobs=True, top_logprobs=1))
    assert [len(json.loads(c.arguments)["city"]) for c in called.tool_calls] == [big, big]
    assert said.text == "Hello world" and [(t.token, t.neg_logprob_micro) for t in said.logprobs] == [
        ("Hello", 125_000), (" world", 125_000)]
    assert said.logprobs[0].top[0].token == "x"


def test_wire_pieces_cut_a_piece_to_frame_sized_chunks():
    delta = protocol.ToolCallDelta(index=3, id="c", name="f", arguments="é" * 200_000)  # 400 KB
    lps = tuple(protocol.TokenLogprob(token="t", neg_logprob_micro=1) for _ in range(130))
    pieces = wire_pieces("x" * 300_000, 7, (delta,) * 20, lps)
    assert sum(p[1] for p in pieces) == 7 and pieces[0][1] == 7
    assert "".join(p[0] for p in pieces) == "x" * 300_000
    assert sum(len(p[3]) for p in pieces) == 130 and all(len(p[3]) <= 64 for p in pieces)
    assert protocol.accumulate_tool_calls(d for p in pieces for d in p[2]) == (
        protocol.ToolCall(id="c", name="f", arguments="é" * 200_000 * 20),)
    for text, tokens, deltas, logprobs in pieces:
        chunk = protocol.ChunkV2(session_id=bytes(16), call_seq=1, index=0, text=text, tokens=tokens,
                                 tool_calls=deltas, logprobs=logprobs)
        assert len(protocol.encode(chunk)) < protocol.DEFAULT_MAX_MESSAGE // 2
    assert wire_pieces("", 2) == [("", 2, (), ())]


async def test_an_embeddings_call_settles_at_its_input_tokens_times_the_price():
    texts = ("the cat sat", "a dog")
    async with session_rig({"e": EMB}, {"e": Embedder()}, tag="agent-embed") as rig:
        async with rig.session(await rig.open_channel(cap=1_000_000), model="e") as session:
            result = await session.embed(texts)
            again = await session.embed(("one",), dimensions=4)
        r = result.receipt
        assert result.dims == 4 and struct.unpack("<8f", result.vectors)[::4] == (11.0, 5.0)
        assert r.tokens_in == 4 + 3 and r.tokens_out == 0
        assert r.cost == protocol.call_cost(_price(EMB), 7, 0) == 350
        assert r.output_hash == protocol.embedding_hash(4, result.vectors)
        assert again.receipt.tokens_in == 2
        assert _held(rig) == [protocol.receipt_hash(x).hex() for x in (r, again.receipt)]


async def test_calls_the_offer_does_not_serve_are_refused_and_cost_nothing():
    offers = {"m": CHAT, "s": Offer(model="s", backend="builtin", input_price=1, output_price=1), "e": EMB}
    backends: dict[str, Backend] = {"m": AgentBackend(), "s": ScriptedBackend(), "e": Embedder()}
    async with session_rig(offers, backends, tag="agent-refuse") as rig:
        async with rig.session(await rig.open_channel(cap=1_000_000), model="s") as plain:  # claims streaming only
            with pytest.raises(CallRefused, match="does not support tools") as refused:
                await plain.call(USER, 10, options=CallOptions(tools=(WEATHER,)))
            assert refused.value.reason == "bad_request"
            with pytest.raises(CallRefused, match="does not support logprobs"):
                await plain.call(USER, 10, options=CallOptions(logprobs=True))
            with pytest.raises(CallRefused, match="serves chat, not embeddings"):
                await plain.embed(("x",))
            assert (await plain.call(USER, 10)).text == "Hello world"  # the session serves on
        async with rig.session(await rig.open_channel(cap=1_000_000), model="m") as agent:
            with pytest.raises(CallRefused, match="cannot honour a seed"):
                await agent.call(USER, 10, options=CallOptions(seed=13))
        async with rig.session(await rig.open_channel(cap=1_000_000), model="e") as emb:
            with pytest.raises(CallRefused, match="serves embeddings, not chat"):
                await emb.call(USER, 10)
            with pytest.raises(CallRefused, match="4 dimensions only"):
                await emb.embed(("x",), dimensions=8)
            assert (await emb.embed(("x",))).dims == 4
        assert len(_held(rig)) == 2  # the plain call and the last embedding; nothing for the refusals


async def test_closing_the_session_mid_embed_stops_the_wait_and_bills_nothing():
    backend = Embedder(hang=True)
    async with session_rig({"e": EMB}, {"e": backend}, tag="agent-embed-close") as rig:
        channel = await rig.open_channel(cap=1_000_000)
        async with rig.session(channel, model="e") as session:
            with trio.move_on_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.embed, ("never",))
                    await backend.started.wait()
                    assert rig.provider_service.queues["e"].running == 1  # it holds a slot like a chat call
                    nursery.cancel_scope.cancel()  # the caller gives up: the session closes
        with trio.fail_after(30):
            await backend.cancelled.wait()
        assert _held(rig) == []
        debt: Any = rig.provider_service.book.on_channel(channel.channel_id)
        assert all(d.owed == 0 for d in debt)


# ---- offers and listings -----------------------------------------------------------------------


def test_offers_declare_features_within_protocol_features_and_kinds_do_not_mix():
    assert EMB.kind == "embeddings" and EMB.to_model_offer().features == ("embeddings",)
    assert CHAT.kind == "chat" and CHAT.to_model_offer().features == CHAT_FEATURES
    upstream = Offer(model="u", backend="openai:http://h/v1#k", input_price=1, output_price=0, features=["embeddings"])
    assert upstream.kind == "embeddings" and upstream.to_json()["features"] == ["embeddings"]
    assert "features" not in CHAT.to_json()  # an offer declaring nothing keeps its config as it was
    assert Offer(**upstream.to_json()) == upstream
    assert Offer(model="l", backend="llamacpp:/m.gguf", input_price=1, output_price=1).to_model_offer().features == (
        "streaming", "completions")
    for bad, message in [
        (dict(backend="builtin", features=("telepathy",)), "not one of"),
        (dict(backend="builtin", features=("embeddings",)), "only an embeddings: or openai:"),
        (dict(backend="embeddings:builtin", features=("tools",)), "serves only embeddings"),
        (dict(backend="openai:http://h", features=("embeddings", "tools")), "serves only embeddings"),
        (dict(backend="builtin", features=("tools", "tools")), "once"),
        (dict(backend="builtin", features="tools"), "list of feature names"),
        (dict(backend="embeddings:"), "is not one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            Offer(model="x", input_price=1, output_price=1, **bad)


def test_a_config_offer_declares_features(tmp_path):
    from node._config import ConfigError, load_config

    path = tmp_path / "config.toml"
    path.write_text('[[offers]]\nmodel = "minilm"\nbackend = "embeddings:builtin"\ninput_price = 20000\n'
                    'output_price = 0\n\n[[offers]]\nmodel = "gpt"\nbackend = "openai:https://api.example/v1#k"\n'
                    'input_price = 1\noutput_price = 2\nfeatures = ["streaming", "tools"]\n')
    offers = load_config(path).offers
    assert [o.features for o in offers] == [(), ("streaming", "tools")] and offers[0].kind == "embeddings"
    path.write_text('[[offers]]\nmodel = "gpt"\nbackend = "builtin"\ninput_price = 1\noutput_price = 2\n'
                    'features = ["tools", "mind-reading"]\n')
    with pytest.raises(ConfigError, match="mind-reading"):
        load_config(path)


async def test_the_listing_names_what_the_loaded_backend_serves():
    offers = {"m": CHAT, "n": Offer(model="n", backend="builtin", input_price=1, output_price=1,
                                    features=("streaming", "tools", "json")), "e": EMB}
    backends: dict[str, Backend] = {"m": AgentBackend(claims=("streaming", "tools")),
                                    "n": AgentBackend(), "e": Embedder()}
    async with session_rig(offers, backends, tag="agent-listing") as rig:
        store = rig.provider_service.storefront
        assert store.features(CHAT) == CHAT_FEATURES  # not loaded yet: what a builtin model serves
        for offer in offers.values():
            await store.backend_for(offer)
        by_name = {o.model: store.listed(o).features for o in offers.values()}
        assert by_name == {"m": ("streaming", "tools"), "n": ("streaming", "tools", "json"), "e": ("embeddings",)}
