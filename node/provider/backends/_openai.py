"""The ``openai:BASE_URL[#KEYNAME]`` backend: an upstream OpenAI-compatible server (vLLM,
llama.cpp server, Ollama, ``transformers serve``, a cloud API).

The API key lives encrypted in the keystore under KEYNAME; it is read when the backend starts,
sent only to BASE_URL in the Authorization header, and never logged, listed or passed on.
An upstream's error is never passed on as it came (an upstream may echo the request's headers,
key included): ``BackendError`` carries a summary — the HTTP status and reason phrase, and the
upstream's own ``error.message`` cut to 200 characters with the key and anything that looks like
a credential (``Bearer …``, ``sk-…``, long hex or base64 runs) redacted; the raw body is read
only up to 64 KiB and logged nowhere. httpx and httpcore log upstream answers (status line,
reason phrase) themselves: a filter on their loggers redacts every key this module holds.
Prompt tokens are admitted at ``protocol.prompt_token_bound`` (UTF-8 bytes plus per-message overhead: a
byte-level tokenizer never needs more) and billed at the server's own count when it reports
one; completion tokens are the server's count: each streamed piece of text claims one token as
it comes (a server sends no text without a token), and the usage at the end claims the rest, so
a call cancelled halfway has claimed what it streamed. A cancelled ``generate`` closes the
upstream stream at once (the upstream server stops generating when its client goes away).
"""

from __future__ import annotations

import http
import json
import logging
import re
from typing import Any, Callable, Sequence

import httpx

import protocol

from ._base import Backend, BackendError, Generation, OnPiece

__all__ = ["OpenAIBackend", "summarise_upstream_error", "redact"]

_logger = logging.getLogger(__name__)
_ERROR_BODY = 64 * 1024  # bytes of an error body read, at most, to find its message
_REASON = 200  # characters of the upstream's reason passed on
_REDACTED = "[redacted]"
_TOKEN = r"[A-Za-z0-9._~+/=\-]"
_CREDENTIAL = re.compile(
    # a labelled secret: Bearer …, token=…, api_key: … (a value with a digit in it, not a word)
    rf"(?i)\b(?:bearer|basic|token|api[-_ ]?key|secret|password|x-api-key)\b\s*[:=]?\s*[\"']?"
    rf"(?={_TOKEN}*\d){_TOKEN}{{8,}}"
    r"|\b(?:sk|pk|rk|hf|gh[pousr]|xox[abp])[-_][A-Za-z0-9_\-]{8,}"  # prefixed keys: sk-…, hf_…, ghp_…
    r"|(?=[A-Za-z0-9+/_\-]{0,200}\d)[A-Za-z0-9+/_\-]{32,}={0,2}"  # a long base64(url) or hex run with a digit
)


def redact(text: str, secrets: Sequence[str] = (), keep: int = 1000) -> str:
    """The first ``keep`` characters of ``text``, with each of ``secrets`` (anywhere in ``text``) and
    anything that looks like a credential replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    return _CREDENTIAL.sub(_REDACTED, text[:keep])


class _RedactKeys(logging.Filter):
    """Redacts the keys of live backends from the records of the HTTP client's own loggers."""

    LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy")

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(key in text for key in self.keys):
            record.msg, record.args = redact(text, tuple(self.keys), keep=len(text)), None
        return True


_LOG_FILTER = _RedactKeys()
for _name in _RedactKeys.LOGGERS:
    logging.getLogger(_name).addFilter(_LOG_FILTER)


def summarise_upstream_error(status: int, reason_phrase: str, body: bytes, secrets: Sequence[str] = ()) -> str:
    """What may be said of an upstream's error answer: status, reason phrase, and its sanitised message.

    Args:
        body: the start of the answer's body; only a JSON ``error.message`` (or ``error`` as text, or
            ``message``) is taken from it, never the rest.
        secrets: strings to redact wherever they appear (the API key).
    """
    reason = ""
    try:
        doc = json.loads(body.decode("utf-8", errors="replace"))
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        found = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else doc.get("message")
        if isinstance(found, str):
            reason = " ".join(redact(found, secrets).split())  # one line: no forged log lines
    if len(reason) > _REASON:
        reason = reason[:_REASON - 1] + "…"
    try:
        phrase = http.HTTPStatus(status).phrase if status != 200 else reason_phrase  # the standard one, not theirs
    except ValueError:
        phrase = ""
    head = f"upstream answered {status} {redact(phrase, secrets)[:64]}".rstrip()
    return f"{head}: {reason}" if reason else head


class OpenAIBackend(Backend):
    parallel = None  # the upstream server batches: as many as the offer allows

    def __init__(self, spec: str, base_url: str, model: str, api_key: str | None) -> None:
        self.spec = spec
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._secrets = (api_key,) if api_key else ()
        _LOG_FILTER.keys.update(self._secrets)
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

    @staticmethod
    async def _error_body(response: httpx.Response) -> bytes:
        """At most ``_ERROR_BODY`` bytes of an error answer (an upstream may send any amount)."""
        body = b""
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) >= _ERROR_BODY:
                break
        return body[:_ERROR_BODY]

    async def count_prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return protocol.prompt_token_bound((m["role"], m["content"]) for m in messages)

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
        finish, usage, claimed = "stop", None, 0
        try:
            async with self._client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise BackendError(summarise_upstream_error(response.status_code, response.reason_phrase,
                                                                await self._error_body(response), self._secrets))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event_usage, pieces = self._event(data)
                    usage = event_usage or usage
                    for text, piece_finish in pieces:
                        if text:
                            claimed += 1  # at least one token; the usage at the end tells the rest
                            await on_piece(text, 1)
                        finish = piece_finish or finish
        except httpx.HTTPError as exc:  # its type only: its text may quote what was sent
            raise BackendError(f"upstream {httpx.URL(self.base_url).host} failed: {type(exc).__name__}") from None
        tokens_in, tokens_out = _counts(usage)
        if tokens_out > claimed:
            await on_piece("", tokens_out - claimed)  # the exact count, from the server that did the work
        return Generation("length" if finish == "length" else "stop", max(tokens_out, claimed), tokens_in=tokens_in)

    def _event(self, data: str) -> tuple[dict[str, Any] | None, list[tuple[str, str | None]]]:
        """One stream event: its usage (if any) and each choice's ``(text, finish_reason)``.

        Raises:
            BackendError: not an OpenAI event, or an error sent as an event of a 200 stream (summarised).
        """
        try:
            event = json.loads(data)
        except ValueError:
            raise BackendError("upstream sent something that is not an OpenAI stream") from None
        if not isinstance(event, dict):
            raise BackendError("upstream sent an event that is not an object")
        if event.get("error") is not None:
            raise BackendError(summarise_upstream_error(200, "with an error mid-stream", data.encode()[:_ERROR_BODY],
                                                        self._secrets))
        usage = event.get("usage")
        pieces = []
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            raise BackendError("upstream sent choices that are not a list")
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            text = (delta.get("content") if isinstance(delta, dict) else None) or ""
            finish = choice.get("finish_reason") if isinstance(choice, dict) else None
            if not isinstance(text, str) or not isinstance(finish, (str, type(None))):
                raise BackendError("upstream sent a choice that is not an OpenAI one")
            pieces.append((text, finish))
        return (usage if isinstance(usage, dict) else None), pieces


def _counts(usage: dict[str, Any] | None) -> tuple[int | None, int]:
    """``(prompt_tokens or None, completion_tokens)`` of an upstream's usage.

    Raises:
        BackendError: no usage, or counts that are not non-negative integers.
    """
    if not usage or "completion_tokens" not in usage:
        raise BackendError("upstream reported no token usage; it cannot be metered")
    counts = (usage.get("prompt_tokens"), usage["completion_tokens"])
    if not all(c is None or (type(c) is int and c >= 0) for c in counts) or counts[1] is None:
        raise BackendError("upstream reported token counts that are not counts")
    return counts[0], counts[1]
