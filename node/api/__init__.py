"""The node's HTTP faces, served by the daemon on loopback.

    _http      what both share: one table from errors to statuses, the bearer check, request
               bodies as declared models, streamed responses (NDJSON, server-sent events)
    _control   the control API under /api/v1/… that the CLI speaks (bearer token)
    _openai    the OpenAI-compatible /v1/models and /v1/chat/completions (SSE when streaming)
    _reports   earnings, stats and the Prometheus /metrics collector

Imported by nothing but the daemon (a test checks it).
"""

from ._control import build_app

__all__ = ["build_app"]
