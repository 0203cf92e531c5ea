"""The backend interface: what the provider's session service asks of a model, and nothing
about how any one kind serves it."""

from __future__ import annotations

import abc
import dataclasses
from typing import Awaitable, Callable, Sequence

from ..._errors import LocalError

__all__ = ["Backend", "BackendError", "Generation", "OnPiece"]

OnPiece = Callable[[str, int], Awaitable[None]]


class BackendError(LocalError):
    """The backend could not serve the request (load failure, upstream error)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """How a generation ended: its finish reason, completion tokens, and the prompt count if the backend knows better."""

    finish_reason: str  # "stop" | "length"
    tokens_out: int
    tokens_in: int | None = None  # the backend's own prompt count, when it differs from the estimate


class Backend(abc.ABC):
    """One model served by this node."""

    spec: str

    async def start(self) -> None:
        """Load what the backend needs (in a worker thread)."""

    async def aclose(self) -> None:
        """Release what ``start`` took."""

    #: generations this backend runs at once (None: as many as the offer's max_concurrent)
    parallel: int | None = 1

    def footprint_mb(self) -> int | None:
        """Memory one loaded copy of the model needs, if known (for deriving concurrency)."""
        return None

    def on_gpu(self) -> bool:
        return False

    @abc.abstractmethod
    async def count_prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        """Tokens the prompt will cost (exact, or an upper bound for upstream servers)."""

    @abc.abstractmethod
    async def generate(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece) -> Generation:
        """Generate at most ``max_tokens`` tokens, calling ``on_piece(text, tokens)`` as text is ready.

        Raises:
            BackendError: the model failed.
        """
