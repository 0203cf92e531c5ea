"""Write the builtin tiny model as a GGUF file (for the llamacpp: backend's tests): the same
random weights and byte-level vocabulary, in llama.cpp's tensor names and metadata."""

from __future__ import annotations

import json
from pathlib import Path


def write_tiny_gguf(hf_folder: Path, out: Path) -> Path:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((hf_folder / "config.json").read_text())
    tokenizer = json.loads((hf_folder / "tokenizer.json").read_text())
    template = (hf_folder / "chat_template.jinja").read_text()
    weights = load_file(str(hf_folder / "model.safetensors"))
    specials = sorted((t["id"], t["content"]) for t in tokenizer["added_tokens"])
    n_special = len(specials)
    # llama.cpp's sentencepiece-style vocabulary with byte tokens: row 3+b of the embedding is byte b,
    # exactly as in the byte-level BPE vocabulary the model was built with
    tokens = [content for _, content in specials] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.CONTROL] * n_special + [gguf.TokenType.BYTE] * 256

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * len(tokens))
    w.add_add_space_prefix(False)
    w.add_eos_token_id(config["eos_token_id"])
    w.add_bos_token_id(config["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf_name, gg_name in names.items():
        w.add_tensor(gg_name, np.ascontiguousarray(weights[hf_name].astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
