"""Backend selection and the transformers loader on a local folder (the one real models use)."""

from __future__ import annotations

import pytest

from node.provider.backends import BackendError, open_backend
from node.provider.backends._builtin_model import ensure_builtin_model
from tests.node.session_rig import _MODELS


async def test_transformers_path_loads_a_local_folder_and_counts_exactly(tmp_path):
    folder = ensure_builtin_model(_MODELS)
    backend = await open_backend(f"transformers:{folder}", tmp_path)
    messages = [{"role": "user", "content": "abc"}]
    # ChatML: "<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n" with one token per byte
    assert await backend.count_prompt_tokens(messages) == 1 + len("user\nabc") + 1 + 1 + 1 + len("assistant\n")
    pieces = []

    async def on_piece(text, tokens):
        pieces.append((text, tokens))

    result = await backend.generate(messages, max_tokens=10, temperature_milli=0, top_p_milli=1000, stop=(),
                                    on_piece=on_piece)
    assert result.tokens_out == sum(t for _, t in pieces) <= 10
    assert "".join(p for p, _ in pieces).isascii()


@pytest.mark.parametrize("spec,match", [("transformers:/no/such/folder", "no model folder"),
                                        ("llamacpp:/no/such.gguf", "no GGUF file|optional extra"),
                                        ("carrier-pigeon", "unknown backend"),
                                        ("openai:http://127.0.0.1:9/v1#missing", "no API key named")])
async def test_bad_backends_fail_clearly(tmp_path, spec, match):
    def no_keys(name):
        raise KeyError(name)

    with pytest.raises(BackendError, match=match):
        await open_backend(spec, tmp_path, "m", no_keys)


async def test_several_backends_load_the_same_model_folder_at_once():
    """The demo's three providers load the builtin model together: every load must succeed
    (transformers' loading context is process-wide; concurrent loads broke each other)."""
    import trio

    from node.provider.backends import TransformersBackend

    folder = ensure_builtin_model(_MODELS)
    backends = [TransformersBackend("builtin", folder) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for b in backends:
            nursery.start_soon(b.start)
    for b in backends:
        assert await b.count_prompt_tokens([{"role": "user", "content": "hi"}]) > 0


async def test_local_chat_backends_claim_their_features_and_count_tools(tmp_path):
    from node._calls import CallOptions
    from node.provider.backends import CHAT_FEATURES

    backend = await open_backend(f"transformers:{ensure_builtin_model(_MODELS)}", tmp_path)
    assert backend.kind == "chat" and backend.features() == CHAT_FEATURES
    messages = [{"role": "user", "content": "abc"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert await backend.count_prompt_tokens(messages, CallOptions()) == await backend.count_prompt_tokens(messages)
    assert await backend.count_prompt_tokens(messages, CallOptions(tools=(tool,))) > \
        await backend.count_prompt_tokens(messages)


async def test_a_slow_consumer_holds_the_model_back_and_a_cancel_stops_it(tmp_path):
    """More pieces than the hand-over buffer holds reach a slow consumer in full (the model waits);
    cancelling mid-stream returns at once, the worker thread ended."""
    import trio

    backend = await open_backend(f"transformers:{ensure_builtin_model(_MODELS)}", tmp_path)
    from node._calls import CallOptions

    got = []

    async def slow(text, tokens, **extras):
        got.append(tokens)
        await trio.sleep(0)

    # seed 5 runs to ~350 single-token pieces here, past the 256-piece hand-over buffer
    result = await backend.generate([{"role": "user", "content": "x"}], max_tokens=600, temperature_milli=1000,
                                    top_p_milli=1000, stop=(), on_piece=slow, options=CallOptions(seed=5))
    assert sum(got) == result.tokens_out

    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as nursery:
            async def cancel_soon(text, tokens, **extras):
                if len(got) > 3:
                    nursery.cancel_scope.cancel()
                got.append(tokens)

            got.clear()
            nursery.start_soon(lambda: backend.generate([{"role": "user", "content": "x"}], max_tokens=100000,
                                                        temperature_milli=1000, top_p_milli=1000, stop=(),
                                                        on_piece=cancel_soon, options=CallOptions(seed=2)))
    assert not scope.cancelled_caught and 3 < len(got) < 1000


class _CountingTokenizer:
    """The builtin model's tokenizer, counting the token ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tok, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kwargs)


@pytest.mark.parametrize("stop", [(), ("本 🙂 h",), ("zz", "wörld 日")])
def test_output_is_decoded_incrementally_whole_characters_and_cut_at_stop_strings(stop):
    """Each step decodes a few tokens, not the whole output (that was quadratic: 23 s of CPU at
    8192 tokens); the pieces still join to the exact text, never split a UTF-8 character, and
    end before the first stop string."""
    from transformers import AutoTokenizer

    from node.provider.backends._transformers import _Emitter

    tok = _CountingTokenizer(AutoTokenizer.from_pretrained(ensure_builtin_model(_MODELS), local_files_only=True))
    text = "héllo wörld 日本 🙂 " * 200
    ids = tok.tok.encode(text, add_special_tokens=False)
    pieces, generated = [], []
    emitter = _Emitter(tok, stop, None, pieces.append)
    for token in ids:
        generated.append(token)
        if emitter.step(generated, None):
            break
    emitter.finish(generated)
    out = "".join(p[0] for p in pieces)
    cuts = [text.find(s) for s in stop if s in text]
    assert out == (text[:min(cuts)] if cuts else text)
    assert not any("\ufffd" in p[0] for p in pieces)
    assert sum(p[1] for p in pieces) == len(generated)
    if not stop:
        assert len(generated) > 4000 and tok.decoded <= 40 * len(generated)  # decoding it all each step: ~n²/2
