"""The daemon's local HTTP API (control face, ``/api/v1/…``), used by the ``node`` CLI.

Rules: loopback only; every request carries ``Authorization: Bearer <token>`` with the token
kept in the home (``api.token``, mode 0600), compared in constant time; errors are JSON
``{"error": {"message", "type", "code"}}`` with a meaningful status; amounts are integer µc.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from ._daemon import NodeService

__all__ = ["build_app", "ApiError"]

SORTS = ("cheapest", "fastest", "best_trust")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def build_app(service: "NodeService", token: str) -> Starlette:
    """The ASGI app of the control API, bound to one running node."""

    def endpoint(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong bearer token (see api.token in the node home)", "authentication_error")
            try:
                return JSONResponse(await fn(request))
            except ApiError as exc:
                return _error(exc.status, exc.message, exc.kind, exc.code)

        return handler

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    async def status(request: Request) -> Any:
        return service.status()

    async def offers(request: Request) -> Any:
        return [o.to_json() for o in service.offers()]

    async def add_offer(request: Request) -> Any:
        try:
            return service.add_offer(await body(request)).to_json()
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc

    async def remove_offer(request: Request) -> Any:
        model = request.path_params["model"]
        if not service.remove_offer(model):
            raise ApiError(404, f"no offer for model {model!r}", code="unknown_model")
        return {"removed": model}

    async def providers(request: Request) -> Any:
        sort = request.query_params.get("sort", "cheapest")
        if sort not in SORTS:
            raise ApiError(400, f"sort must be one of {', '.join(SORTS)}")
        return await service.providers(request.query_params.get("model") or None, sort)

    async def market(request: Request) -> Any:
        return service.market_stats()

    return Starlette(
        routes=[
            Route("/api/v1/status", endpoint(status), methods=["GET"]),
            Route("/api/v1/offers", endpoint(offers), methods=["GET"]),
            Route("/api/v1/offers", endpoint(add_offer), methods=["POST"]),
            Route("/api/v1/offers/{model:path}", endpoint(remove_offer), methods=["DELETE"]),
            Route("/api/v1/providers", endpoint(providers), methods=["GET"]),
            Route("/api/v1/market", endpoint(market), methods=["GET"]),
        ]
    )
