"""The backend interface: what the provider's session service asks of a model, and nothing
about how any one kind serves it.

A chat backend streams pieces through ``on_piece(text, tokens, *, tool_calls=(), logprobs=())``:
``tokens`` are the completion tokens the piece accounts for (exact), ``tool_calls`` the
``protocol.ToolCallDelta`` pieces it carries, ``logprobs`` one ``protocol.TokenLogprob`` per token
when the call asked for them. An option a backend cannot serve raises ``BackendUnsupported`` (one
line naming it) before anything is generated; the provider answers it as a bad request.
An embedding backend (``kind == "embeddings"``) serves ``embed`` instead of ``generate``.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Any, Protocol, Sequence

import protocol

from ..._calls import CallOptions
from ..._errors import LocalError

__all__ = ["Backend", "BackendError", "BackendUnsupported", "Embedded", "EmbeddingBackend", "Generation", "OnPiece",
           "CHAT_FEATURES", "MODEL_LOADING"]

# transformers builds a model under a process-wide context (weights first on the "meta" device):
# two loads in two threads at once break each other ("Cannot copy out of meta tensor; no data!",
# seen when the demo's providers loaded the builtin model, and MiniLM, together). Every backend
# that loads weights in-process holds this lock while it does: one load at a time.
MODEL_LOADING = threading.Lock()

#: what a local chat model serves (tools through its template, JSON by constrained decoding)
CHAT_FEATURES = ("streaming", "tools", "json", "logprobs", "completions")
_NO_OPTIONS = CallOptions()


class OnPiece(Protocol):
    """The streaming callback: ``await on_piece(text, tokens, tool_calls=..., logprobs=...)``."""

    async def __call__(self, text: str, tokens: int, *, tool_calls: Sequence[Any] = (),
                       logprobs: Sequence[Any] = ()) -> None: ...


class BackendError(LocalError):
    """The backend could not serve the request (load failure, upstream error)."""


class BackendUnsupported(BackendError):
    """The backend cannot serve an option the call asks for (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """How a generation ended: its finish reason, completion tokens, and the prompt count if the backend knows better."""

    finish_reason: str  # "stop" | "length"
    tokens_out: int
    tokens_in: int | None = None  # the backend's own prompt count, when it differs from the estimate


@dataclasses.dataclass(frozen=True)
class Embedded:
    """An embedding batch: ``len(texts) * dims`` float32 little-endian values, row-major."""

    vectors: bytes
    dims: int
    tokens_in: int


class Backend(abc.ABC):
    """One model served by this node."""

    spec: str
    #: "chat" (generate) or "embeddings" (embed)
    kind: str = "chat"

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

    def features(self) -> tuple[str, ...]:
        """The listing features (``protocol.FEATURES``) this backend serves."""
        return ("streaming",)

    def commitment(self) -> protocol.ModelCommitment | None:
        """The model this backend serves, as its listing commits to it (known once started;
        None: it cannot name one)."""
        return None

    def reproducible(self) -> bool:
        """Whether greedy decoding gives the same tokens on every run here (so a spot check can
        compare them exactly); False: compare top-k agreement instead."""
        return False

    @abc.abstractmethod
    async def count_prompt_tokens(self, messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> int:
        """Tokens the prompt will cost (exact, or an upper bound for upstream servers)."""

    @abc.abstractmethod
    async def generate(self, messages: Sequence[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece,
                       options: CallOptions = _NO_OPTIONS) -> Generation:
        """Generate at most ``max_tokens`` tokens, calling ``on_piece(text, tokens, ...)`` as output is ready.

        Raises:
            BackendUnsupported: an option of ``options`` this backend cannot serve (before generating).
            BackendError: the model failed.
        """


class EmbeddingBackend(Backend):
    """A sentence-embedding model: ``embed`` instead of ``generate``."""

    kind = "embeddings"
    #: the model's own vector size
    dims: int = 0

    def features(self) -> tuple[str, ...]:
        return ("embeddings",)

    async def count_prompt_tokens(self, messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> int:
        return await self.count_input_tokens([m.get("content") or "" for m in messages])

    async def generate(self, messages: Sequence[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece,
                       options: CallOptions = _NO_OPTIONS) -> Generation:
        raise BackendUnsupported(f"{self.spec} is an embeddings model: it does not generate text")

    @abc.abstractmethod
    async def count_input_tokens(self, texts: Sequence[str]) -> int:
        """The tokens embedding ``texts`` costs (the sum over texts, exact)."""

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> Embedded:
        """The normalised vectors of ``texts``.

        Raises:
            BackendUnsupported: ``dimensions`` is neither 0 nor the model's own size.
            BackendError: the model failed.
        """
