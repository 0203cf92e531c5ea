"""What a cheating provider runs: a backend that serves model B while it names model A.

``Impostor(serves=B, claims=A)`` generates (and counts, embeds, scores) with backend B but
reports A's ``commitment()`` and ``reproducible()`` flag, so its listing and AcceptV2 name A's
weights. ``open_impostor(home_a, home_b)`` builds two builtin models with other seeds (A: 1234,
the default; B: 99) and returns the started impostor and the honest backend A (for checking).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import protocol
from node._calls import CallOptions
from node.provider.backends import Backend, Generation, OnPiece, TransformersBackend, ensure_builtin_model

__all__ = ["Impostor", "open_impostor", "SEED_A", "SEED_B"]

SEED_A = 1234
SEED_B = 99
_NO_OPTIONS = CallOptions()


class Impostor(Backend):
    """Serves ``serves`` under the commitment and reproducible flag of ``claims``."""

    def __init__(self, serves: Backend, claims: Backend) -> None:
        self.serves = serves
        self.claims = claims
        self.spec = claims.spec
        self.kind = serves.kind
        self.parallel = serves.parallel

    async def start(self) -> None:
        await self.serves.start()

    async def aclose(self) -> None:
        await self.serves.aclose()

    def commitment(self) -> protocol.ModelCommitment | None:
        return self.claims.commitment()

    def reproducible(self) -> bool:
        return self.claims.reproducible()

    def features(self) -> tuple[str, ...]:
        return self.serves.features()

    def footprint_mb(self) -> int | None:
        return self.serves.footprint_mb()

    def on_gpu(self) -> bool:
        return self.serves.on_gpu()

    async def count_prompt_tokens(self, messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> int:
        return await self.serves.count_prompt_tokens(messages, options)

    async def generate(self, messages: Sequence[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece,
                       options: CallOptions = _NO_OPTIONS) -> Generation:
        return await self.serves.generate(messages, max_tokens=max_tokens, temperature_milli=temperature_milli,
                                          top_p_milli=top_p_milli, stop=stop, on_piece=on_piece, options=options)

    async def topk_agreement(self, *args: Any, **kwargs: Any) -> tuple[int, int, int]:
        return await self.serves.topk_agreement(*args, **kwargs)  # type: ignore[attr-defined]

    async def count_input_tokens(self, texts: Sequence[str]) -> int:
        return await self.serves.count_input_tokens(texts)  # type: ignore[attr-defined]

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> Any:
        return await self.serves.embed(texts, dimensions)  # type: ignore[attr-defined]


def builtin_folder(models_dir: Path, seed: int) -> Path:
    """A builtin model built with ``seed`` under ``models_dir`` (one folder per seed)."""
    return ensure_builtin_model(models_dir / f"seed-{seed}", seed=seed)


async def open_impostor(models_dir: Path) -> tuple[Impostor, TransformersBackend]:
    """A started impostor (serves the builtin model of seed ``SEED_B``, claims ``SEED_A``'s) and
    the started honest backend of ``SEED_A`` it claims to be. The caller closes both."""
    honest = TransformersBackend("builtin", builtin_folder(models_dir, SEED_A))
    await honest.start()
    impostor = Impostor(TransformersBackend("builtin", builtin_folder(models_dir, SEED_B)), honest)
    await impostor.start()
    return impostor, honest
