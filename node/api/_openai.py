"""The OpenAI-compatible face of the daemon: ``GET /v1/models`` and ``POST /v1/chat/completions``
(plain and ``stream: true`` server-sent events), so existing OpenAI clients and agent frameworks
rent from the network unchanged — point them at ``<api_url>/v1``.

Beyond the OpenAI format: an optional ``provider`` object carries routing preferences —
``sort`` (cheapest | fastest | best_trust), ``max_price`` ({"input", "output"} in µc per 1K
tokens), ``only`` and ``ignore`` (peer ids), ``allow_fallbacks`` (default true) — and optional
top-level ``escrow`` (agent) and ``budget`` (µc for this call). Every response adds ``provider``
(who served it), ``cost`` (µc) and ``receipt_id``; streams send them in the final usage chunk.
Errors use OpenAI's shape ``{"error": {message, type, param, code}}`` with the status of
``_http.TABLE`` (the same as the control face's); ``param`` names the offending field.
Auth: the node's bearer token, or none when the daemon runs with ``--openai-keyless`` (the API
listens on loopback only, and ``_http.WebGuard`` refuses what a web page could send it: a foreign
``Host`` or ``Origin``, a body that is not JSON). Every field is bounded as the wire bounds it, and the
call is checked whole (``check_call``) before any channel opens: bad input costs nothing.
A streaming client that closes its connection mid-answer cancels the call: the provider stops,
and the receipt (``node receipts``) bills only what was streamed before the daemon saw it go.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Literal

from pydantic import AfterValidator, Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.routing import Route

from ..consumer import Completion, Preferences
from ..consumer._request_check import check_call
from ._http import (
    MAX_MESSAGES,
    Body,
    Budget,
    MaxTokens,
    ModelName,
    PeerId,
    PricePer1K,
    Problem,
    Sort,
    SSEStream,
    WireText,
    checked_agent,
    endpoint,
    read_body,
)

if TYPE_CHECKING:
    from .._node import Node

__all__ = ["openai_routes", "openai_shape"]

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def openai_shape(p: Problem) -> dict[str, Any]:
    """OpenAI's error body for ``p``."""
    return {"error": {"message": p.message, "type": p.type, "param": p.param, "code": p.code}}


_shape = openai_shape


# ---- the request body --------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ValueError("message content must be a string or a list of text parts")


_WIRE_TEXT = TypeAdapter(WireText)


def _wire_text(value: str) -> str:
    try:
        return _WIRE_TEXT.validate_python(value)
    except ValidationError as exc:
        raise ValueError(exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")) from None


def _stop(value: Any) -> tuple[str, ...]:
    stop = value or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(
            isinstance(s, str) and len(s.encode()) <= 64 for s in stop):
        raise ValueError("stop is a string or up to 4 strings, each at most 64 bytes")  # the wire's bounds
    return tuple(stop)


def _unsupported(what: str) -> AfterValidator:
    def check(value: Any) -> Any:
        if value:
            raise ValueError(f"{what} is not supported by this network yet")
        return value

    return AfterValidator(check)


def _one(value: int | None) -> int:
    if value not in (None, 1):
        raise ValueError("only n=1 is supported")
    return 1


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Any, AfterValidator(_text), AfterValidator(_wire_text)] = Field(
        None, validate_default=True)  # text, as one string of at most 1 MiB


class MaxPrice(Body):  # µc per 1K tokens
    input: PricePer1K | None = None
    output: PricePer1K | None = None


class ProviderPrefs(Body):
    """Routing preferences, beyond the OpenAI format."""

    sort: Sort = "cheapest"
    max_price: MaxPrice | None = None
    only: list[PeerId] | None = Field(None, max_length=256)
    ignore: list[PeerId] | None = Field(None, max_length=256)
    allow_fallbacks: bool = True

    def preferences(self) -> Preferences:
        price = self.max_price or MaxPrice()
        return Preferences(sort=self.sort, max_input_price=price.input, max_output_price=price.output,
                           only=tuple(self.only or ()), ignore=tuple(self.ignore or ()),
                           allow_fallbacks=self.allow_fallbacks)


class ChatRequest(Body):
    """What this network reads of OpenAI's chat completion request (the rest is ignored)."""

    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: Annotated[Any, _unsupported("tool calling")] = None
    functions: Annotated[Any, _unsupported("tool calling")] = None
    n: Annotated[int | None, AfterValidator(_one)] = 1
    max_completion_tokens: MaxTokens | None = None  # wins over max_tokens; neither: 256
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: Annotated[Any, AfterValidator(_stop)] = Field(None, validate_default=True)
    stream: bool | None = False
    provider: ProviderPrefs | None = None
    escrow: str | None = None  # the agent to pay through (a peer id)
    budget: Budget | None = None  # µc this call may cost

    def limit(self) -> int:
        return next((v for v in (self.max_completion_tokens, self.max_tokens) if v is not None), 256)


def _milli(value: float | None, default: float) -> int:
    return int(round((default if value is None else value) * 1000))  # the wire carries integer thousandths


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.receipt.tokens_in, "completion_tokens": c.receipt.tokens_out,
            "total_tokens": c.receipt.tokens_in + c.receipt.tokens_out}


def _completion(c: Completion, created: int) -> dict[str, Any]:
    """A chat completion in OpenAI's shape, plus who served it, its cost (µc) and its receipt."""
    return {
        "id": "chatcmpl-" + c.id,
        "object": "chat.completion",
        "created": created,
        "model": c.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.finish_reason}],
        "usage": _usage(c),
        "system_fingerprint": None,
        "provider": c.provider,
        "cost": c.cost,
        "receipt_id": c.receipt_id,
    }


def openai_routes(service: "Node", token: str, keyless: bool) -> list[Route]:
    async def models(request: Request) -> Any:
        data = []
        for name, rows in sorted(service.market.view.models(service.market.now()).items()):
            rows = [r for r in rows if r.listing.provider != service.identity.peer_id]
            if not rows:
                continue
            data.append({
                "id": name, "object": "model", "created": min(r.listing.issued_at for r in rows),
                "owned_by": "inferswarm",
                "providers": len(rows),
                "pricing": {"input": min(r.offer.price.input_per_1k for r in rows),
                            "output": min(r.offer.price.output_per_1k for r in rows),
                            "unit": "micro-credits per 1K tokens"},
                "context_length": max(r.offer.max_context for r in rows),
            })
        return {"object": "list", "data": data}

    async def chat(request: Request) -> Any:
        q = await read_body(request, ChatRequest)
        model = q.model
        messages = [{"role": _ROLES[m.role], "content": m.content} for m in q.messages]
        created = int(time.time())
        check_call(messages, q.limit(), _milli(q.temperature, 1.0), _milli(q.top_p, 1.0), q.stop)  # before any money
        kwargs = dict(max_tokens=q.limit(), temperature_milli=_milli(q.temperature, 1.0),
                      top_p_milli=_milli(q.top_p, 1.0), stop=q.stop,
                      prefs=(q.provider or ProviderPrefs()).preferences(), budget=q.budget,
                      escrow=checked_agent(service.escrow, q.escrow) if q.escrow else None)
        if not q.stream:
            return _completion(await service.renter.run(model, messages, **kwargs), created)
        chunk_id = "chatcmpl-" + str(created)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        async def produce(emit: Callable[[Any], Awaitable[None]]) -> None:
            started = False

            async def on_text(text: str) -> None:
                nonlocal started
                if not started:
                    started = True
                    await emit(chunk({"role": "assistant", "content": ""}))
                await emit(chunk({"content": text}))

            done = await service.renter.run(model, messages, on_text=on_text, **kwargs)
            if not started:
                await emit(chunk({"role": "assistant", "content": ""}))
            await emit(chunk({}, done.finish_reason))
            await emit({"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(done), "provider": done.provider,
                        "cost": done.cost, "receipt_id": done.receipt_id})

        return SSEStream(produce, _shape)  # an error mid-stream: OpenAI's error body as the last event

    auth = None if keyless else token
    return [Route("/v1/models", endpoint(models, _shape, auth), methods=["GET"]),
            Route("/v1/chat/completions", endpoint(chat, _shape, auth), methods=["POST"])]
