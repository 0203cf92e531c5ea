"""The embedded default model: a tiny random-weight Llama with a byte-level tokenizer and a
ChatML chat template (with Hermes-format tools), built on first use into a folder and then served like any local model
folder (``transformers:PATH``) — the loading code is the real one.

Building is atomic and safe across processes: the model is built in a temporary folder beside
its final place and renamed into it, with its marker file written last, under an OS lock on
``MODELS_DIR/.inferswarm-tiny.lock`` held only while building. A folder without a valid marker
(an older version, a folder cut short by a kill) is never loaded: it is rebuilt. Two processes
asking at once both end with the one good folder; the second waits for the first and builds nothing.

Its weights are random (drawn from ``seed``: another seed is another model), so its words are noise; what it proves is the whole path: real
tokenization, real generation, exact token counts, streaming, metering. Generation is limited
to printable ASCII (``suppress_tokens`` in its generation config), so output is always valid text.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["BUILTIN_MODEL", "ensure_builtin_model"]

BUILTIN_MODEL = "inferswarm-tiny"
_MARKER = "inferswarm-builtin.json"
_VERSION = 3  # 2: the chat template renders tools (Hermes format); 3: weights drawn wide enough to differ
# The weights' spread: at transformers' default (0.02) the logits are nearly flat and the tied
# embeddings make greedy decoding repeat the prompt's last token, so two seeds' models answer
# alike; at 0.3 each seed is a model of its own (greedy outputs differ, as do the distributions),
# which is what a spot check telling one model from another needs.
_INIT_RANGE = 0.3
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with tools in the Hermes / Qwen2.5 format (see _tool_format): the tools as JSON inside
# <tools></tools> in the system turn, calls as <tool_call> JSON, results as a tool turn. Without
# tools it renders plain ChatML.
_CHAT_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}
    {{- '# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + ((tool.function if tool.function is defined else tool) | tojson(separators=(',', ':'))) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within '
        '<tool_call></tool_call>:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        '</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (tools and loop.first and message['role'] == 'system') %}
        {{- '<|im_start|>' + message['role'] + '\n' }}
        {%- if message['role'] == 'tool' %}
            {{- '<tool_response>\n' + message['content'] + '\n</tool_response>' }}
        {%- else %}
            {{- message['content'] or '' }}
        {%- endif %}
        {%- if message['role'] == 'assistant' and message['tool_calls'] %}
            {%- for call in message['tool_calls'] %}
                {%- set fn = call.function if call.function is defined else call %}
                {%- if not loop.first or message['content'] %}{{- '\n' }}{%- endif %}
                {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + (fn.arguments | tojson) + '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
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
        pad_token_id=vocab["<|endoftext|>"], tie_word_embeddings=True, initializer_range=_INIT_RANGE,
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


def _recipe(seed: int) -> dict[str, object]:
    """What the built bytes depend on: this recipe's version, the seed, and the libraries that draw
    and write the weights (another transformers release writes another ``config.json``, so another
    commitment). A folder built under another recipe is rebuilt, so every node that builds the
    builtin model with the same libraries holds the same bytes."""
    from importlib.metadata import PackageNotFoundError, version

    made: dict[str, object] = {"version": _VERSION, "seed": seed}
    for package in ("torch", "transformers", "tokenizers"):
        try:
            made[package] = version(package)
        except PackageNotFoundError:
            made[package] = None
    return made


def _is_built(folder: Path, seed: int) -> bool:
    """The folder holds a complete build of this recipe (its marker is written last)."""
    try:
        return json.loads((folder / _MARKER).read_text()) == _recipe(seed)
    except (OSError, ValueError, AttributeError):
        return False


def ensure_builtin_model(models_dir: Path, seed: int = 1234) -> Path:
    """The builtin model's folder under ``models_dir``, built (atomically) if absent or incomplete.

    Safe to call from several threads and processes at once: one builds, the others wait on the
    build lock and then find the finished folder.

    Raises:
        OSError: ``models_dir`` cannot be written.
    """
    folder = models_dir / BUILTIN_MODEL
    if _is_built(folder, seed):
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{BUILTIN_MODEL}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if _is_built(folder, seed):  # another process built it while this one waited
            return folder
        _clear_leftovers(models_dir)
        _logger.warning("building the builtin model into %s (first use)", folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_MODEL}.build-", dir=models_dir))
        try:
            _build(tmp, seed)
            (tmp / _MARKER).write_text(json.dumps(_recipe(seed)))
            if folder.exists() or folder.is_symlink():  # incomplete or outdated: out of the way first
                old = models_dir / f".{BUILTIN_MODEL}.old-{os.getpid()}"
                os.replace(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _clear_leftovers(models_dir: Path) -> None:
    """Remove what killed builds left (temporary folders, folders set aside); called under the lock."""
    for prefix in (f".{BUILTIN_MODEL}.build-", f".{BUILTIN_MODEL}.old-", ".build-"):
        for path in models_dir.glob(prefix + "*"):
            shutil.rmtree(path, ignore_errors=True)
