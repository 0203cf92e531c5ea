"""The OpenAI face's other two paid endpoints: ``POST /v1/completions`` (legacy: continue a raw
prompt; routed only to offers listing ``completions``) and ``POST /v1/embeddings`` (routed only to
offers listing ``embeddings``; priced per 1K input tokens, one doubly-signed receipt per call of at
most ``protocol.MAX_EMBED_INPUTS`` inputs, all on one session with one provider).

Responses are OpenAI's shapes plus ``provider``, ``cost`` (µc) and ``receipt_id``; embeddings add
``receipt_ids`` (every call's, in order; ``receipt_id`` is the last). ``encoding_format: base64``
(the official client's default) sends each vector as the base64 of its float32 little-endian
bytes, exactly as the provider's result carried them. A legacy completion's ``logprobs: N`` is
answered in the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.routing import Route

from ..consumer import Completion, Delta
from ..consumer._request_check import check_call
from ._http import Shape, SSEStream, checked_agent, read_body
from ._openai import created_now, milli, paid, usage
from ._openai_models import CompletionRequest, EmbeddingsRequest

if TYPE_CHECKING:
    from .._node import Node

__all__ = ["completions_route", "embeddings_route", "legacy_logprobs"]


def legacy_logprobs(lps: Sequence[Any], offset: int = 0) -> dict[str, Any]:
    """``protocol.TokenLogprob``s in the legacy completions shape (``offset``: the text before them)."""
    tokens, values, tops, offsets = [], [], [], []
    for t in lps:
        tokens.append(t.token)
        values.append(-t.neg_logprob_micro / 1_000_000)
        tops.append({o.token: -o.neg_logprob_micro / 1_000_000 for o in t.top})
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def completions_route(service: "Node", endpoint: Callable[..., Any], shape: Shape, auth: str | None) -> Route:
    async def completions(request: Request) -> Any:
        q = await read_body(request, CompletionRequest)
        options = q.options()
        created = created_now()
        temp, top_p = milli(q.temperature, 1.0), milli(q.top_p, 1.0)
        check_call([], q.max_tokens, temp, top_p, q.stop, options)  # before any money moves
        kwargs = dict(max_tokens=q.max_tokens, temperature_milli=temp, top_p_milli=top_p, stop=q.stop,
                      prefs=q.prefs(), budget=q.budget,
                      escrow=checked_agent(service.escrow, q.escrow) if q.escrow else None, options=options)

        def lps_of(c: Completion) -> Any:
            return legacy_logprobs(c.logprobs) if c.logprobs is not None else None

        if not q.stream:
            done = await service.renter.run(q.model, [], **kwargs)
            return {"id": "cmpl-" + done.id, "object": "text_completion", "created": created, "model": done.model,
                    "choices": [{"text": done.text, "index": 0, "logprobs": lps_of(done),
                                 "finish_reason": done.finish_reason}],
                    "usage": usage(done), **paid(done)}
        chunk_id = "cmpl-" + str(created)

        def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            return {"id": chunk_id, "object": "text_completion", "created": created, "model": q.model,
                    "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}

        async def produce(emit: Callable[[Any], Awaitable[None]]) -> None:
            sent = 0

            async def on_delta(d: Delta) -> None:
                nonlocal sent
                lps = legacy_logprobs(d.logprobs, sent) if d.logprobs and options.logprobs else None
                sent += len(d.text)
                if d.text or lps is not None:
                    await emit(chunk(d.text, logprobs=lps))

            done = await service.renter.run(q.model, [], on_delta=on_delta, **kwargs)
            await emit({**chunk("", done.finish_reason), **paid(done)})
            if q.include_usage():
                await emit({"id": chunk_id, "object": "text_completion", "created": created, "model": q.model,
                            "choices": [], "usage": usage(done), **paid(done)})

        return SSEStream(produce, shape)

    return Route("/v1/completions", endpoint(completions, shape, auth), methods=["POST"])


def embeddings_route(service: "Node", endpoint: Callable[..., Any], shape: Shape, auth: str | None) -> Route:
    async def embeddings(request: Request) -> Any:
        q = await read_body(request, EmbeddingsRequest)
        done = await service.renter.embed(q.model, q.input, dimensions=q.dimensions or 0, prefs=q.prefs(),
                                          budget=q.budget,
                                          escrow=checked_agent(service.escrow, q.escrow) if q.escrow else None)
        return done.to_json(q.encoding_format)

    return Route("/v1/embeddings", endpoint(embeddings, shape, auth), methods=["POST"])
