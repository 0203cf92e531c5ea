"""The llamacpp: backend (an optional extra that compiles for minutes): skipped when absent."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (optional extra) is not installed")
pytest.importorskip("gguf", reason="gguf is not installed")

from node.provider.backends import open_backend  # noqa: E402
from node.provider.backends._builtin_model import ensure_builtin_model  # noqa: E402
from tests.node.session_rig import _MODELS  # noqa: E402
from tests.node.tiny_gguf import write_tiny_gguf  # noqa: E402


async def test_llamacpp_generates_exactly_counted_tokens(tmp_path):
    path = write_tiny_gguf(ensure_builtin_model(_MODELS), tmp_path / "tiny.gguf")
    backend = await open_backend(f"llamacpp:{path}", tmp_path)
    messages = [{"role": "user", "content": "Hello"}]
    assert await backend.count_prompt_tokens(messages) > 5
    pieces: list[tuple[str, int]] = []

    async def on_piece(text: str, tokens: int) -> None:
        pieces.append((text, tokens))

    result = await backend.generate(messages, max_tokens=20, temperature_milli=800, top_p_milli=1000, stop=(),
                                    on_piece=on_piece)
    assert result.tokens_out == sum(t for _, t in pieces) <= 20
    assert result.finish_reason in ("stop", "length")
    "".join(p for p, _ in pieces).encode("utf-8")  # always valid text
    await backend.aclose()
