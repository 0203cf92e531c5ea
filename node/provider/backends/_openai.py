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

What a call asks beyond chat travels upstream unchanged: ``tools``, ``tool_choice``,
``response_format``, ``seed``, ``logprobs``/``top_logprobs``, ``user``, and the tool turns of the
conversation (assistant ``tool_calls``, ``tool`` messages, ``name``); a legacy ``prompt`` goes to
``/completions``. An offer lists what its upstream serves (``features()``: the operator's
declaration, else ``CHAT_FEATURES``); a call needing anything else is ``BackendUnsupported``
before anything is sent. An offer declaring ``embeddings`` is an ``OpenAIEmbeddingBackend``
(``open_openai`` chooses), served by ``/embeddings``.

Metering: prompt tokens are admitted at ``protocol.request_token_bound`` of the call (UTF-8 bytes
plus overheads: a byte-level tokenizer never needs more) and billed at the server's own count when
it reports one; completion tokens are the server's count: each streamed piece claims a token per
logprob it carries, else one (a server sends no text or tool call without a token), and the usage
at the end claims the rest (never past ``max_tokens``), so a call cancelled halfway has claimed
what it streamed. A cancelled ``generate`` closes the upstream stream at once (the upstream server
stops generating when its client goes away).

Bounds on what the upstream sends (``_openai_wire`` checks each piece): an answer's lines and
whole-JSON bodies are read up to ``_read_limit``; at most ``max_tokens`` tokens and
``completion_byte_limit(max_tokens)`` bytes (text and tool calls together) stream, in at most
``8 × max_tokens + 1024`` events; anything past that, or garbage, is one clean ``BackendError``.
An upstream that answers a streamed request with a whole JSON completion is read as one piece.
"""

from __future__ import annotations

import http
import json
import logging
import re
from typing import Any, Awaitable, Callable, Sequence

import httpx

import protocol

from ..._calls import CallOptions, request_fields
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
from ._commitment import upstream_commitment
from ._openai_wire import (
    ErrorEvent,
    Piece,
    ToolCallReader,
    chat_answer,
    chat_event,
    completion_event,
    embedding_rows,
    usage_counts,
)

__all__ = ["OpenAIBackend", "OpenAIEmbeddingBackend", "open_openai", "prompt_bound", "summarise_upstream_error",
           "redact"]

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


_NO_OPTIONS = CallOptions()
_MAX_READ = 32 << 20  # the most of one answer line (or whole JSON answer) held, whatever the call


def _read_limit(max_tokens: int) -> int:
    """The longest line (or whole JSON answer) read for a call of ``max_tokens``: its text, JSON's
    escaping and logprobs with their alternatives fit many times over."""
    return min(_MAX_READ, 64 * protocol.completion_byte_limit(max_tokens) + (1 << 20))


def prompt_bound(messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> int:
    """``protocol.request_token_bound`` of the call these OpenAI-shaped messages and options came
    from (the provider machine's own bound: the request's wire form is rebuilt to count it)."""
    fields = request_fields(messages, options)
    return protocol.request_token_bound(protocol.RequestV2(session_id=bytes(16), call_seq=0, max_tokens=0, **fields))


class _Upstream:
    """One upstream server: its base URL, the model it is asked for, the key (sent in the
    Authorization header only), the HTTP client, and bounded reads of its answers."""

    parallel = None  # the upstream server batches: as many as the offer allows
    spec: str

    def __init__(self, spec: str, base_url: str, model: str, api_key: str | None) -> None:
        self.spec = spec
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._secrets = (api_key,) if api_key else ()
        _LOG_FILTER.keys.update(self._secrets)
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never the key
        return (f"{type(self).__name__}({self.base_url!r}, model={self.model!r}, "
                f"key={'set' if self._headers else 'none'})")

    @classmethod
    def from_spec(cls, spec: str, api_key: Callable[[str], str] | None, model: str = "", **kwargs: Any) -> Any:
        """The backend for ``openai:BASE_URL[#KEYNAME]`` (not started).

        Raises:
            BackendError: the key is named but no keystore is open, or it holds no such key.
        """
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
        return cls(spec, base_url, model, key, **kwargs)

    def commitment(self) -> protocol.ModelCommitment | None:
        return upstream_commitment(self.model, self.base_url)

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

    async def _check(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise BackendError(summarise_upstream_error(response.status_code, response.reason_phrase,
                                                        await self._error_body(response), self._secrets))

    def _failed(self, exc: httpx.HTTPError) -> BackendError:
        """An HTTP failure, by its type only: its text may quote what was sent."""
        return BackendError(f"upstream {httpx.URL(self.base_url).host} failed: {type(exc).__name__}")

    def _error_event(self, data: str) -> BackendError:
        return BackendError(summarise_upstream_error(200, "with an error mid-stream", data.encode()[:_ERROR_BODY],
                                                     self._secrets))

    @staticmethod
    async def _body(response: httpx.Response, limit: int) -> bytes:
        """The whole body, refused past ``limit`` bytes."""
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) > limit:
                raise BackendError(f"upstream sent an answer over {limit} bytes")
        return bytes(body)

    @staticmethod
    async def _each_event(response: httpx.Response, limit: int, max_events: int,
                          handle: Callable[[str], Awaitable[None]]) -> None:
        """``await handle(data)`` for each ``data:`` line of a server-sent event stream, up to ``[DONE]``.

        Raises:
            BackendError: a line over ``limit`` bytes, more than ``max_events`` events, or one not UTF-8.
        """
        buf = bytearray()
        events = 0

        async def line(raw: bytes) -> bool:
            nonlocal events
            if not raw.startswith(b"data:"):
                return True
            try:
                data = raw[5:].strip().decode("utf-8")
            except UnicodeDecodeError:
                raise BackendError("upstream sent an event that is not UTF-8") from None
            if data == "[DONE]":
                return False
            events += 1
            if events > max_events:
                raise BackendError(f"upstream sent more than {max_events} events")
            await handle(data)
            return True

        async for piece in response.aiter_bytes():
            buf += piece
            while (end := buf.find(b"\n")) >= 0:
                raw = bytes(buf[:end]).rstrip(b"\r")
                del buf[:end + 1]
                if not await line(raw):
                    return
            if len(buf) > limit:
                raise BackendError(f"upstream sent an event line over {limit} bytes")
        await line(bytes(buf).rstrip(b"\r"))


class _Meter:
    """What one generation has streamed: the tokens it claimed and the bytes it sent, within the
    call's bounds, and each piece handed to ``on_piece``."""

    def __init__(self, on_piece: OnPiece, max_tokens: int) -> None:
        self.on_piece = on_piece
        self.max_tokens = max_tokens
        self.byte_limit = protocol.completion_byte_limit(max_tokens)
        self.claimed = 0
        self.bytes = 0

    async def put(self, piece: Piece) -> None:
        """Stream ``piece``: a token per logprob it carries, else one for any text or tool call.

        Raises:
            BackendError: it would pass ``max_tokens`` or the call's byte limit.
        """
        text, calls, logprobs = piece.text, piece.tool_calls, piece.logprobs
        if not (text or calls or logprobs):
            return
        tokens = max(len(logprobs), 1 if text or calls else 0)
        if self.claimed + tokens > self.max_tokens:
            raise BackendError(f"upstream sent more than the {self.max_tokens} tokens asked for")
        size = protocol.metered_bytes(text, calls)
        if self.bytes + size > self.byte_limit:
            raise BackendError(f"upstream sent more than {self.byte_limit} bytes for {self.max_tokens} tokens")
        self.claimed += tokens
        self.bytes += size
        extras: dict[str, Any] = {}
        if calls:
            extras["tool_calls"] = calls
        if logprobs:
            extras["logprobs"] = logprobs
        await self.on_piece(text, tokens, **extras)


class OpenAIBackend(_Upstream, Backend):
    """Chat (and legacy completions) through the upstream's ``/chat/completions`` (``/completions``)."""

    def __init__(self, spec: str, base_url: str, model: str, api_key: str | None,
                 features: Sequence[str] = ()) -> None:
        super().__init__(spec, base_url, model, api_key)
        self._features = tuple(features)

    def features(self) -> tuple[str, ...]:
        """The offer's declared features, else what OpenAI's API serves (``CHAT_FEATURES``)."""
        return self._features or CHAT_FEATURES

    async def count_prompt_tokens(self, messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> int:
        return prompt_bound(messages, options)

    def _refuse_unserved(self, options: CallOptions) -> None:
        missing = sorted(options.needs() - set(self.features()))
        if missing:
            raise BackendUnsupported(f"this upstream offer does not support {missing[0]}")
        if options.prompt is not None and (options.tools or options.json_schema() is not None):
            raise BackendUnsupported("a legacy completion (prompt) takes no tools and no response_format")

    def _request(self, messages: Sequence[dict[str, Any]], max_tokens: int, temperature_milli: int, top_p_milli: int,
              stop: Sequence[str], options: CallOptions) -> tuple[str, dict[str, Any]]:
        """The upstream path and JSON body of a call: every option as OpenAI names it, unchanged."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "stream": True,
                                "stream_options": {"include_usage": True},
                                "temperature": temperature_milli / 1000, "top_p": top_p_milli / 1000}
        if stop:
            body["stop"] = list(stop)
        if options.seed is not None:
            body["seed"] = options.seed
        if options.user:
            body["user"] = options.user
        if options.prompt is not None:
            body["prompt"] = options.prompt
            if options.logprobs:
                body["logprobs"] = options.top_logprobs  # the legacy API's count of alternatives
            return "/completions", body
        body["messages"] = [dict(m) for m in messages]
        if options.tools:
            body["tools"] = list(options.tools)
        if options.tool_choice is not None:
            body["tool_choice"] = options.tool_choice
        if options.response_format is not None:
            body["response_format"] = options.response_format
        if options.logprobs:
            body["logprobs"] = True
            if options.top_logprobs:
                body["top_logprobs"] = options.top_logprobs
        return "/chat/completions", body

    async def generate(self, messages: Sequence[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece,
                       options: CallOptions = _NO_OPTIONS) -> Generation:
        self._refuse_unserved(options)
        if max_tokens <= 0:
            return Generation("length", 0)
        assert self._client is not None
        path, body = self._request(messages, max_tokens, temperature_milli, top_p_milli, stop, options)
        legacy = options.prompt is not None
        top = options.top_logprobs if options.logprobs else None
        forced = options.forced_tool()
        offered = frozenset((t.get("function") or {}).get("name") for t in options.tools)
        calls = ToolCallReader(allowed=bool(options.tools) and options.tool_choice != "none"
                               and options.prompt is None,
                               names=offered if forced in (None, "*") else frozenset({forced}))
        meter = _Meter(on_piece, max_tokens)
        state: dict[str, Any] = {"finish": "stop", "usage": None}

        async def handle(data: str, whole: bool = False) -> None:
            try:
                if legacy:
                    usage, pieces = completion_event(data, top)
                else:
                    usage, pieces = (chat_answer if whole else chat_event)(data, calls, top)
            except ErrorEvent:
                raise self._error_event(data) from None
            state["usage"] = usage or state["usage"]
            for piece in pieces:
                await meter.put(piece)
                state["finish"] = piece.finish or state["finish"]

        limit = _read_limit(max_tokens)
        try:
            async with self._client.stream("POST", path, json=body) as response:
                await self._check(response)
                if response.headers.get("content-type", "").startswith("application/json"):  # it did not stream
                    raw = await self._body(response, limit)
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise BackendError("upstream sent an answer that is not UTF-8") from None
                    await handle(text, whole=True)
                else:
                    await self._each_event(response, limit, 8 * max_tokens + 1024, handle)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        tokens_in, tokens_out = usage_counts(state["usage"])
        tokens_out = min(tokens_out, max_tokens)  # never billed past what was asked, whatever it says
        if tokens_out > meter.claimed:
            await on_piece("", tokens_out - meter.claimed)  # the exact count, from the server that did the work
        finish = state["finish"]
        return Generation("length" if finish == "length" else "stop", max(tokens_out, meter.claimed),
                          tokens_in=tokens_in)


class OpenAIEmbeddingBackend(_Upstream, EmbeddingBackend):
    """Embeddings through the upstream's ``/embeddings`` (an offer declaring ``embeddings``).
    Input tokens are admitted at ``request_token_bound`` and billed at the server's count."""

    def __init__(self, spec: str, base_url: str, model: str, api_key: str | None,
                 features: Sequence[str] = ()) -> None:
        super().__init__(spec, base_url, model, api_key)

    async def count_input_tokens(self, texts: Sequence[str]) -> int:
        return sum(protocol.EMBED_INPUT_OVERHEAD + len(t.encode("utf-8")) for t in texts)

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> Embedded:
        if not 1 <= len(texts) <= protocol.MAX_EMBED_INPUTS:
            raise BackendUnsupported(f"an embeddings call takes 1 to {protocol.MAX_EMBED_INPUTS} inputs")
        if not 0 <= dimensions <= protocol.MAX_EMBED_DIMS:
            raise BackendUnsupported(f"dimensions is 0 to {protocol.MAX_EMBED_DIMS}")
        assert self._client is not None
        body: dict[str, Any] = {"model": self.model, "input": list(texts), "encoding_format": "float"}
        if dimensions:
            body["dimensions"] = dimensions
        limit = len(texts) * protocol.MAX_EMBED_DIMS * 32 + (64 << 10)  # JSON numbers, with room
        try:
            async with self._client.stream("POST", "/embeddings", json=body) as response:
                await self._check(response)
                raw = await self._body(response, limit)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        vectors, dims, tokens = embedding_rows(raw, len(texts), dimensions)
        bound = await self.count_input_tokens(texts)
        self.dims = dims
        return Embedded(vectors, dims, bound if tokens is None else min(tokens, bound))


def open_openai(spec: str, api_key: Callable[[str], str] | None, model: str = "",
                features: Sequence[str] = ()) -> Backend:
    """The (unstarted) backend of an ``openai:`` offer: embeddings when it declares ``embeddings``,
    else chat serving the declared ``features`` (none declared: ``CHAT_FEATURES``).

    Raises:
        BackendError: as ``from_spec``.
    """
    cls = OpenAIEmbeddingBackend if "embeddings" in features else OpenAIBackend
    return cls.from_spec(spec, api_key, model, features=tuple(features))
