"""Inference backends: generate a stream of text pieces with exact token counts, and count
prompt tokens. Model compute never runs on the trio event loop (worker threads).

    _base            Backend, EmbeddingBackend (the interfaces), Generation, Embedded, OnPiece (the
                     streaming callback), BackendError, BackendUnsupported (an option it cannot serve)
    _builtin_model   the embedded tiny model, built into a folder on first use
    _transformers    transformers:PATH and builtin (CUDA when torch sees a GPU)
    _tool_format     Hermes <tool_call> tool calls: template input, parsing the output as it streams
    _constrained     JSON / JSON-schema / forced tool call constrained decoding (lm-format-enforcer)
    _embeddings      embeddings:builtin (all-MiniLM-L6-v2, shipped in a package) and embeddings:PATH
    _openai          openai:BASE_URL[#KEYNAME]: an upstream server (chat, or embeddings when the offer
                     declares them); the key stays in the keystore
    _openai_wire     what an upstream sends, read and bounded (tool calls, logprobs, embeddings)
    _llamacpp        llamacpp:PATH: a GGUF file through llama-cpp-python (optional extra)
    _factory         open_backend(SPEC): the only module that knows every kind
    _commitment      the commitment a backend names when it loads: model files hashed (weights and
                     tokenizer apart) or an upstream's id

Each backend imports only ``_base`` and ``_commitment``; torch and transformers are imported by the backends
that need them, when they load.
"""

from ._base import (
    CHAT_FEATURES,
    Backend,
    BackendError,
    BackendUnsupported,
    Embedded,
    EmbeddingBackend,
    Generation,
    OnPiece,
)
from ._builtin_model import BUILTIN_MODEL, ensure_builtin_model
from ._factory import open_backend
from ._transformers import TransformersBackend

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnsupported",
    "BUILTIN_MODEL",
    "CHAT_FEATURES",
    "Embedded",
    "EmbeddingBackend",
    "ensure_builtin_model",
    "Generation",
    "OnPiece",
    "open_backend",
    "TransformersBackend",
]
