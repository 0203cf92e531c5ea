"""The node's HTTP faces, served by the daemon on loopback.

    _http      what both share: one table from errors to statuses, the bearer check, request
               bodies as declared models, streamed responses (NDJSON, server-sent events)
    _control   the control API under /api/v1/… that the CLI speaks (bearer token)
    _openai    the OpenAI-compatible /v1/models, /v1/models/{id} and /v1/chat/completions (tools,
               JSON output, logprobs; SSE when streaming)
    _openai_models   its request bodies, declared: what is read, refused or ignored, and why
    _openai_legacy   /v1/completions (legacy prompts) and /v1/embeddings
    _reports   earnings, stats and the Prometheus /metrics collector

Imported by nothing but the daemon (a test checks it).
"""

from ._control import build_app

__all__ = ["build_app"]
