"""The ``openai:BASE_URL[#KEYNAME]`` backend: an upstream OpenAI-compatible server (vLLM,
llama.cpp server, Ollama, ``transformers serve``, a cloud API).

The API key lives encrypted in the keystore under KEYNAME; it is read when the backend starts,
sent only to BASE_URL in the Authorization header, and never logged, listed or passed on.
Prompt tokens are admitted at an upper bound (UTF-8 bytes plus per-message overhead: a
byte-level tokenizer never needs more) and billed at the server's own count when it reports
one; completion tokens are the server's count.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Sequence

import httpx

from ._base import Backend, BackendError, Generation, OnPiece

__all__ = ["OpenAIBackend"]

_logger = logging.getLogger(__name__)
_PER_MESSAGE = 8
_PER_PROMPT = 16


class OpenAIBackend(Backend):
    parallel = None  # the upstream server batches: as many as the offer allows

    def __init__(self, spec: str, base_url: str, model: str, api_key: str | None) -> None:
        self.spec = spec
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never the key
        return f"OpenAIBackend({self.base_url!r}, model={self.model!r}, key={'set' if self._headers else 'none'})"

    @classmethod
    def from_spec(cls, spec: str, api_key: Callable[[str], str] | None, model: str = "") -> "OpenAIBackend":
        rest = spec.split(":", 1)[1]
        base_url, _, key_name = rest.partition("#")
        key = None
        if key_name:
            if api_key is None:
                raise BackendError(f"backend needs API key {key_name!r} but no keystore is open")
            try:
                key = api_key(key_name)
            except KeyError as exc:
                raise BackendError(f"no API key named {key_name!r} in the keystore (add it with `node key add`)") from exc
        return cls(spec, base_url, model, key)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                         timeout=httpx.Timeout(300, connect=10))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def count_prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return _PER_PROMPT + sum(_PER_MESSAGE + len(m["content"].encode()) + len(m["role"]) for m in messages)

    async def generate(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece) -> Generation:
        if max_tokens <= 0:
            return Generation("length", 0)
        assert self._client is not None
        body: dict[str, Any] = {
            "model": self.model, "messages": list(messages), "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": temperature_milli / 1000, "top_p": top_p_milli / 1000,
        }
        if stop:
            body["stop"] = list(stop)
        finish, usage, pieces = "stop", None, 0
        try:
            async with self._client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:300].decode(errors="replace")
                    raise BackendError(f"upstream answered {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            pieces += 1
                            await on_piece(text, 0)
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {self.base_url} failed: {type(exc).__name__}") from exc
        except ValueError as exc:
            raise BackendError("upstream sent something that is not an OpenAI stream") from exc
        if not usage or "completion_tokens" not in usage:
            raise BackendError("upstream reported no token usage; it cannot be metered")
        tokens_out = int(usage["completion_tokens"])
        if tokens_out:
            await on_piece("", tokens_out)  # the exact count, from the server that did the work
        return Generation("length" if finish == "length" else "stop", tokens_out,
                          tokens_in=int(usage["prompt_tokens"]) if "prompt_tokens" in usage else None)
