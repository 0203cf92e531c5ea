"""The OpenAI-compatible face of the daemon: ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions`` (plain and ``stream: true`` server-sent events, with tools, JSON
output and logprobs), ``POST /v1/completions`` (legacy) and ``POST /v1/embeddings``
(``_openai_legacy``), so existing OpenAI clients and agent frameworks rent from the network
unchanged — point them at ``<api_url>/v1``. The request bodies are declared in ``_openai_models``
(what is read, refused or ignored, and why).

Beyond the OpenAI format: an optional ``provider`` object carries routing preferences —
``sort`` (cheapest | fastest | best_trust), ``max_price`` ({"input", "output"} in µc per 1K
tokens), ``only`` and ``ignore`` (peer ids), ``allow_fallbacks`` (default true) — and optional
top-level ``escrow`` (agent) and ``budget`` (µc for this call). Every response adds ``provider``
(who served it), ``cost`` (µc) and ``receipt_id``; streams send them on the chunk that carries
the ``finish_reason`` — and, as OpenAI does, ``usage`` in one more chunk (``choices: []``, with
them again) only when ``stream_options.include_usage`` asks for it: a client that indexes
``choices[0]`` on every chunk never meets an empty one it did not ask for.
A call is routed only to offers whose listed features hold what it needs (tools, json, logprobs,
completions, embeddings); when none does the answer is a 400 ``unsupported_feature`` naming the
field. Streamed tool calls arrive as OpenAI sends them: the first delta of an index carries its
``id``, ``type: "function"``, the function's ``name`` and ``""`` arguments, later ones pieces of
the arguments; the last chunk's ``finish_reason`` is ``tool_calls``.
Errors use OpenAI's shape ``{"error": {message, type, param, code}}`` with the status of
``_http.TABLE`` (the same as the control face's); ``param`` names the offending field.
Auth: the node's bearer token, or none when the daemon runs with ``--openai-keyless``, or (with
``--x402``) an x402 payment per chat completion from a caller without the token (``_x402``: a 402
with the requirements, then the request again with a signed EIP-3009 authorization) (the API
listens on loopback only, and ``_http.WebGuard`` refuses what a web page could send it: a foreign
``Host`` or ``Origin``, a body that is not JSON). Every field is bounded as the wire bounds it, and the
call is checked whole (``check_call``) before any channel opens: bad input costs nothing.
A streaming client that closes its connection mid-answer cancels the call: the provider stops,
and the receipt (``node receipts``) bills only what was streamed before the daemon saw it go.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .._calls import openai_logprobs
from .._errors import InvalidRequest
from ..consumer import Completion, Delta, RentError
from ..consumer._request_check import check_call
from ._http import Problem, SSEStream, check_bearer, checked_agent, endpoint, read_body
from ._openai_models import ChatMessage, ChatRequest, MaxPrice, ProviderPrefs
from ._x402 import PAYMENT_RESPONSE_HEADER, Paid, X402Gate, refundable

if TYPE_CHECKING:
    from .._node import Node

__all__ = ["openai_routes", "openai_shape", "ChatMessage", "ChatRequest", "MaxPrice", "ProviderPrefs"]


def openai_shape(p: Problem) -> dict[str, Any]:
    """OpenAI's error body for ``p``."""
    return {"error": {"message": p.message, "type": p.type, "param": p.param, "code": p.code}}


_shape = openai_shape


def created_now() -> int:
    """A response's ``created`` (Unix seconds)."""
    return int(time.time())


def milli(value: float | None, default: float) -> int:
    return int(round((default if value is None else value) * 1000))  # the wire carries integer thousandths


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.receipt.tokens_in, "completion_tokens": c.receipt.tokens_out,
            "total_tokens": c.receipt.tokens_in + c.receipt.tokens_out}


def paid(c: Completion) -> dict[str, Any]:
    """What this network adds to a response: who served it, its cost (µc) and its receipt."""
    return {"provider": c.provider, "cost": c.cost, "receipt_id": c.receipt_id}


def _completion(c: Completion, created: int) -> dict[str, Any]:
    """A chat completion in OpenAI's shape, plus who served it, its cost (µc) and its receipt."""
    choice = c.choice()
    choice.setdefault("logprobs", None)
    return {"id": "chatcmpl-" + c.id, "object": "chat.completion", "created": created, "model": c.model,
            "choices": [choice], "usage": usage(c), "system_fingerprint": None, **paid(c)}


class _ToolCallStream:
    """Wire tool-call pieces as OpenAI's streamed ``tool_calls`` deltas (the module's rules)."""

    def __init__(self) -> None:
        self._opened: set[int] = set()

    def deltas(self, pieces: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in pieces:
            if p.index not in self._opened:
                self._opened.add(p.index)
                out.append({"index": p.index, "id": p.id, "type": "function",
                            "function": {"name": p.name, "arguments": ""}})
            if p.arguments:
                out.append({"index": p.index, "function": {"arguments": p.arguments}})
        return out


def model_card(name: str, rows: list[Any]) -> dict[str, Any]:
    """A model as ``/v1/models`` lists it: OpenAI's fields, then what its providers offer
    (their count, the lowest prices, the longest context, every feature any of them lists)."""
    features = sorted({f for r in rows for f in r.offer.features})
    return {
        "id": name, "object": "model", "created": min(r.listing.issued_at for r in rows),
        "owned_by": "inferswarm",
        "providers": len(rows),
        "pricing": {"input": min(r.offer.price.input_per_1k for r in rows),
                    "output": min(r.offer.price.output_per_1k for r in rows),
                    "unit": "micro-credits per 1K tokens"},
        "context_length": max(r.offer.max_context for r in rows),
        "features": features,
        "kind": "embeddings" if features and set(features) <= {"embeddings"} else "chat",
    }


def openai_routes(service: "Node", token: str, keyless: bool, x402: bool = False) -> list[Route]:
    from ._openai_legacy import completions_route, embeddings_route

    gate = X402Gate(service.chain, service.wall_clock) if x402 else None

    def offered() -> dict[str, list[Any]]:
        me = service.identity.peer_id
        out = {}
        for name, rows in sorted(service.market.view.models(service.market.now()).items()):
            rows = [r for r in rows if r.listing.provider != me]
            if rows:
                out[name] = rows
        return out

    async def models(request: Request) -> Any:
        return {"object": "list", "data": [model_card(name, rows) for name, rows in offered().items()]}

    async def model(request: Request) -> Any:
        name = request.path_params["model_id"]
        rows = offered().get(name)
        if not rows:
            raise RentError(f"the model {name[:128]!r} does not exist: no provider this node knows offers it")
        return model_card(name, rows)

    async def chat(request: Request) -> Any:
        token_shown = "authorization" in request.headers
        if gate is not None and token_shown:
            check_bearer(request, token)  # before anything else, as on every other route
        q = await read_body(request, ChatRequest)
        model_name = q.model
        messages = q.wire_messages()
        options = q.options()
        created = created_now()
        check_call(messages, q.limit(), milli(q.temperature, 1.0), milli(q.top_p, 1.0), q.stop, options)  # before money
        kwargs = dict(max_tokens=q.limit(), temperature_milli=milli(q.temperature, 1.0),
                      top_p_milli=milli(q.top_p, 1.0), stop=q.stop, prefs=q.prefs(), budget=q.budget,
                      escrow=checked_agent(service.escrow, q.escrow) if q.escrow else None, options=options)
        payment: Paid | None = None
        if gate is not None and not token_shown:  # x402: paid before the call
            if q.budget is not None:
                raise InvalidRequest("a call paid with x402 has its payment as its budget: leave budget out", "budget")
            quote = await service.renter.quote(
                model_name, messages, max_tokens=q.limit(), temperature_milli=milli(q.temperature, 1.0),
                top_p_milli=milli(q.top_p, 1.0), stop=q.stop, prefs=q.prefs(), options=options)
            if quote > 0:  # a call that costs nothing (free providers) costs the node nothing either
                payment = await gate.collect(request, quote)
            kwargs["budget"] = quote
        paid_headers = {PAYMENT_RESPONSE_HEADER: payment.header} if payment is not None else {}
        if not q.stream:
            try:
                done = await service.renter.run(model_name, messages, **kwargs)
            except Exception as exc:
                if payment is not None and refundable(exc):
                    await gate.refund(payment)  # the call failed unpaid: the caller paid for nothing
                raise
            return JSONResponse(_completion(done, created), headers=paid_headers)
        chunk_id = "chatcmpl-" + str(created)

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "system_fingerprint": None, "choices": [choice]}

        async def produce(emit: Callable[[Any], Awaitable[None]]) -> None:
            started = False
            calls = _ToolCallStream()

            async def begin() -> None:
                nonlocal started
                if not started:
                    started = True
                    await emit(chunk({"role": "assistant", "content": ""}))

            async def on_delta(d: Delta) -> None:
                await begin()
                lps = openai_logprobs(d.logprobs) if d.logprobs and options.logprobs else None
                if d.text or lps is not None:
                    await emit(chunk({"content": d.text}, logprobs=lps))
                for piece in calls.deltas(d.tool_calls):
                    await emit(chunk({"tool_calls": [piece]}))

            try:
                done = await service.renter.run(model_name, messages, on_delta=on_delta, **kwargs)
            except Exception as exc:
                if payment is not None and not started and refundable(exc):
                    await gate.refund(payment)  # nothing was streamed nor paid: the caller paid for nothing
                raise
            await begin()
            await emit({**chunk({}, done.finish_reason), **paid(done)})
            if q.include_usage():
                await emit({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                            "model": model_name, "choices": [], "usage": usage(done), **paid(done)})

        # an error mid-stream: OpenAI's error body as the last event
        return SSEStream(produce, _shape, headers=paid_headers)

    auth = None if keyless else token
    return [Route("/v1/models", endpoint(models, _shape, None if x402 else auth), methods=["GET"]),
            Route("/v1/models/{model_id:path}", endpoint(model, _shape, None if x402 else auth), methods=["GET"]),
            # with x402 the handler checks the token itself: a request without one may pay instead
            Route("/v1/chat/completions", endpoint(chat, _shape, None if x402 else auth), methods=["POST"]),
            completions_route(service, endpoint, _shape, auth),
            embeddings_route(service, endpoint, _shape, auth)]
