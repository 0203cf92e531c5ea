"""The embedded default model: a tiny random-weight Llama with a byte-level tokenizer and a
ChatML chat template, built on first use into a folder and then served like any local model
folder (``transformers:PATH``) — the loading code is the real one.

Its weights are random, so its words are noise; what it proves is the whole path: real
tokenization, real generation, exact token counts, streaming, metering. Generation is limited
to printable ASCII (``suppress_tokens`` in its generation config), so output is always valid text.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["BUILTIN_MODEL", "ensure_builtin_model"]

BUILTIN_MODEL = "inferswarm-tiny"
_MARKER = "inferswarm-builtin.json"
_VERSION = 1
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_logger = logging.getLogger(__name__)


def _build(folder: Path, seed: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    alphabet = ByteLevel.alphabet()  # the 256 byte symbols
    byte_of = {c: b for b, c in _byte_to_unicode().items()}
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for sym in sorted(alphabet, key=lambda s: byte_of[s]):
        vocab[sym] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    eos = vocab["<|im_end|>"]
    printable = {ord("\n")} | set(range(0x20, 0x7F))
    suppress = [i for tok, i in vocab.items() if tok not in _SPECIALS and byte_of[tok] not in printable]
    suppress += [vocab["<|endoftext|>"], vocab["<|im_start|>"]]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=None, eos_token_id=eos,
        pad_token_id=vocab["<|endoftext|>"], tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=vocab["<|endoftext|>"],
                                               suppress_tokens=suppress, do_sample=True, temperature=1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def ensure_builtin_model(models_dir: Path, seed: int = 1234) -> Path:
    """The builtin model's folder under ``models_dir``, built (atomically) if absent."""
    folder = models_dir / BUILTIN_MODEL
    marker = folder / _MARKER
    try:
        if json.loads(marker.read_text()).get("version") == _VERSION:
            return folder
    except (FileNotFoundError, ValueError):
        pass
    models_dir.mkdir(parents=True, exist_ok=True)
    _logger.warning("building the builtin model into %s (first use)", folder)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=models_dir))
    try:
        _build(tmp, seed)
        (tmp / _MARKER).write_text(json.dumps({"version": _VERSION, "seed": seed}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
