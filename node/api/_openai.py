"""The OpenAI-compatible face of the daemon: ``GET /v1/models`` and ``POST /v1/chat/completions``
(plain and ``stream: true`` server-sent events), so existing OpenAI clients and agent frameworks
rent from the network unchanged — point them at ``<api_url>/v1``.

Beyond the OpenAI format: an optional ``provider`` object carries routing preferences —
``sort`` (cheapest | fastest | best_trust), ``max_price`` ({"input", "output"} in µc per 1K
tokens), ``only`` and ``ignore`` (peer ids), ``allow_fallbacks`` (default true) — and optional
top-level ``escrow`` (agent) and ``budget`` (µc for this call). Every response adds ``provider``
(who served it), ``cost`` (µc) and ``receipt_id``; streams send them in the final usage chunk.
Errors use OpenAI's shape ``{"error": {message, type, param, code}}`` with meaningful statuses.
Auth: the node's bearer token, or none when the daemon runs with ``--openai-keyless`` (the API
listens on loopback only).
"""

from __future__ import annotations

import hmac
import json
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import protocol

from ..consumer._renter import RentError
from ..consumer._routing import SORTS, Preferences
from ..consumer._session_client import SessionError
from ..escrow._client import EscrowUnreachable
from ..escrow._ops import EscrowRefused

if TYPE_CHECKING:
    from .._node import NodeService

__all__ = ["openai_routes"]

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _translate(exc: Exception) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RentError):
        if exc.attempts:
            return OpenAIError(502, str(exc), "api_error", "providers_failed")
        return OpenAIError(404, str(exc), "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, protocol.SpendLimitReached):
        return OpenAIError(402, f"over budget: {exc}", "insufficient_quota", "budget_exceeded")
    if isinstance(exc, EscrowRefused):
        if exc.code == "insufficient_funds":
            return OpenAIError(402, f"not enough credits at the escrow agent: {exc}", "insufficient_quota",
                               "insufficient_funds")
        return OpenAIError(402, f"the escrow agent refused: {exc}", "insufficient_quota", exc.code)
    if isinstance(exc, EscrowUnreachable):
        return OpenAIError(503, str(exc), "api_error", "escrow_unreachable")
    if isinstance(exc, SessionError):
        return OpenAIError(502, str(exc), "api_error", getattr(exc, "reason", None) or getattr(exc, "code", None))
    if isinstance(exc, (ValueError, TypeError)):
        return OpenAIError(400, str(exc))
    raise exc


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise OpenAIError(400, "message content must be a string or a list of text parts", param="messages")


def _parse(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    model = d.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "model is required", param="model", code="missing_model")
    raw = d.get("messages")
    if not isinstance(raw, list) or not raw:
        raise OpenAIError(400, "messages must be a non-empty array", param="messages")
    messages = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise OpenAIError(400, "each message needs a role of system, developer, user, assistant or tool",
                              param="messages")
        messages.append({"role": _ROLES[m["role"]], "content": _text(m.get("content"))})
    if d.get("tools") or d.get("functions"):
        raise OpenAIError(400, "tool calling is not supported by this network yet", param="tools")
    if d.get("n", 1) != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n")
    max_tokens = d.get("max_completion_tokens", d.get("max_tokens", 256))
    if type(max_tokens) is not int or max_tokens < 1:
        raise OpenAIError(400, "max_tokens must be a positive integer", param="max_tokens")

    def milli(name: str, default: float, top: float) -> int:
        value = d.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
            raise OpenAIError(400, f"{name} must be a number from 0 to {top}", param=name)
        return int(round(value * 1000))  # the wire carries integer thousandths

    stop = d.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise OpenAIError(400, "stop is a string or up to 4 strings", param="stop")
    p = d.get("provider") or {}
    if not isinstance(p, dict):
        raise OpenAIError(400, "provider must be an object", param="provider")
    max_price = p.get("max_price") or {}
    try:
        prefs = Preferences(
            sort=p.get("sort", "cheapest"),
            max_input_price=max_price.get("input"),
            max_output_price=max_price.get("output"),
            only=tuple(p.get("only") or ()),
            ignore=tuple(p.get("ignore") or ()),
            allow_fallbacks=bool(p.get("allow_fallbacks", True)),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OpenAIError(400, f"provider preferences: {exc} (sort is one of {', '.join(SORTS)})",
                          param="provider") from exc
    budget = d.get("budget")
    if budget is not None and (type(budget) is not int or budget < 1):
        raise OpenAIError(400, "budget is a positive integer of micro-credits", param="budget")
    escrow = d.get("escrow")
    if escrow is not None and not isinstance(escrow, str):
        raise OpenAIError(400, "escrow is a peer id", param="escrow")
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "prefs": prefs, "budget": budget,
            "escrow": escrow, "temperature_milli": milli("temperature", 1.0, 2.0), "top_p_milli": milli("top_p", 1.0, 1.0),
            "stop": tuple(stop), "stream": bool(d.get("stream", False))}


def _completion(doc: dict[str, Any], created: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + doc["id"].removeprefix("isw-"),
        "object": "chat.completion",
        "created": created,
        "model": doc["model"],
        "choices": doc["choices"],
        "usage": doc["usage"],
        "system_fingerprint": None,
        "provider": doc["provider"],
        "cost": doc["cost"]["amount"],
        "receipt_id": doc["cost"]["receipt_id"],
    }


class _SSE:
    """Server-sent events from ``produce(emit)``; an error after the headers goes out as an
    ``error`` event (OpenAI's streaming behaviour), then ``[DONE]``."""

    def __init__(self, produce: Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]]) -> None:
        self.produce = produce

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})

        async def emit(doc: Any) -> None:
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(doc).encode() + b"\n\n",
                        "more_body": True})

        try:
            await self.produce(emit)
        except Exception as exc:
            await emit(_translate(exc).body())
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def openai_routes(service: "NodeService", token: str, keyless: bool) -> list[Route]:
    expected = f"Bearer {token}".encode()

    def guarded(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
        async def handler(request: Request) -> Any:
            try:
                if not keyless and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
                    raise OpenAIError(401, "missing or wrong API key (the node's api.token, as a bearer token)",
                                      "authentication_error", "invalid_api_key")
                result = await fn(request)
            except Exception as exc:
                err = _translate(exc)
                return JSONResponse(err.body(), status_code=err.status)
            return result if isinstance(result, (_SSE, Response)) else JSONResponse(result)

        return handler

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
        try:
            raw = json.loads(await request.body())
        except ValueError as exc:
            raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
        q = _parse(raw)
        created = int(time.time())
        kwargs = dict(max_tokens=q["max_tokens"], temperature_milli=q["temperature_milli"], prefs=q["prefs"],
                      budget=q["budget"], escrow=q["escrow"], top_p_milli=q["top_p_milli"], stop=q["stop"])
        if not q["stream"]:
            return _completion(await service.renter.run(q["model"], q["messages"], **kwargs), created)
        chunk_id = "chatcmpl-" + str(created)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": q["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        async def produce(emit: Callable[[Any], Awaitable[None]]) -> None:
            started = False

            async def on_text(text: str) -> None:
                nonlocal started
                if not started:
                    started = True
                    await emit(chunk({"role": "assistant", "content": ""}))
                await emit(chunk({"content": text}))

            doc = await service.renter.run(q["model"], q["messages"], on_text=on_text, **kwargs)
            if not started:
                await emit(chunk({"role": "assistant", "content": ""}))
            await emit(chunk({}, doc["choices"][0]["finish_reason"]))
            await emit({"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": q["model"],
                        "choices": [], "usage": doc["usage"], "provider": doc["provider"],
                        "cost": doc["cost"]["amount"], "receipt_id": doc["cost"]["receipt_id"]})

        return _SSE(produce)

    return [Route("/v1/models", guarded(models), methods=["GET"]),
            Route("/v1/chat/completions", guarded(chat), methods=["POST"])]
