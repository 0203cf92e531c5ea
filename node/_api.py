"""The daemon's local HTTP API (control face, ``/api/v1/…``), used by the ``node`` CLI.

Rules: loopback only; every request carries ``Authorization: Bearer <token>`` with the token
kept in the home (``api.token``, mode 0600), compared in constant time; errors are JSON
``{"error": {"message", "type", "code"}}`` with a meaningful status (400 bad input, 401 no
token, 404 unknown, 409 refused by an escrow agent, 502 agent unreachable); amounts are µc.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._escrow_ops import EscrowRefused
from ._escrow_service import EscrowUnreachable

if TYPE_CHECKING:
    from ._daemon import NodeService

__all__ = ["build_app", "ApiError"]

SORTS = ("cheapest", "fastest", "best_trust")
Handler = Callable[[Request], Awaitable[Any]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


async def body(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    value = data.get(name, default)
    if value is ...:
        raise ApiError(400, f"missing field {name!r}")
    if value is not None and value is not default and (type(value) is not kind):
        raise ApiError(400, f"field {name!r} must be {kind.__name__}")
    return value


def _market_routes(service: "NodeService") -> list[tuple[str, str, Handler]]:
    async def status(request: Request) -> Any:
        return service.status()

    async def offers(request: Request) -> Any:
        return [o.to_json() for o in service.offers()]

    async def add_offer(request: Request) -> Any:
        return service.add_offer(await body(request)).to_json()

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

    return [
        ("GET", "/api/v1/status", status),
        ("GET", "/api/v1/offers", offers),
        ("POST", "/api/v1/offers", add_offer),
        ("DELETE", "/api/v1/offers/{model:path}", remove_offer),
        ("GET", "/api/v1/providers", providers),
        ("GET", "/api/v1/market", market),
    ]


def _escrow_routes(service: "NodeService") -> list[tuple[str, str, Handler]]:
    ops = service.escrow

    def agent(data: dict[str, Any] | Any) -> str | None:
        value = data.get("escrow")
        if value is not None and type(value) is not str:
            raise ApiError(400, "escrow must be a peer id or a /p2p/ address")
        return value or None

    async def balance(request: Request) -> Any:
        return await ops.balance(agent(request.query_params))

    async def budgets(request: Request) -> Any:
        return await ops.budgets(agent(request.query_params))

    async def channel(request: Request) -> Any:
        return await ops.channel(agent(request.query_params), request.path_params["channel_id"])

    async def mint(request: Request) -> Any:
        d = await body(request)
        return await ops.mint(agent(d), _field(d, "to", str), _field(d, "amount", int))

    async def withdraw(request: Request) -> Any:
        d = await body(request)
        return await ops.withdraw(agent(d), _field(d, "amount", int))

    async def open_(request: Request) -> Any:
        d = await body(request)
        return await ops.open(agent(d), _field(d, "provider", str), _field(d, "amount", int),
                              _field(d, "expires_s", int), _field(d, "budget_id", str, None))

    async def claim(request: Request) -> Any:
        d = await body(request)
        return await ops.claim(agent(d), _field(d, "receipt", str))

    async def close(request: Request) -> Any:
        d = await body(request)
        return await ops.close(agent(d), _field(d, "channel_id", str), _field(d, "receipt", str, None),
                               _field(d, "partial", str, None), bool(d.get("sign_only", False)))

    async def refund(request: Request) -> Any:
        d = await body(request)
        return await ops.refund(agent(d), _field(d, "channel_id", str))

    async def budget_create(request: Request) -> Any:
        d = await body(request)
        whitelist = _field(d, "whitelist", list)
        if not all(isinstance(w, str) for w in whitelist):
            raise ApiError(400, "whitelist is a list of peer ids")
        return await ops.budget_create(agent(d), _field(d, "amount", int), whitelist,
                                       _field(d, "per_session_limit", int), _field(d, "expires_s", int))

    async def budget_refund(request: Request) -> Any:
        d = await body(request)
        return await ops.budget_refund(agent(d), _field(d, "budget_id", str))

    return [
        ("GET", "/api/v1/wallet/balance", balance),
        ("POST", "/api/v1/wallet/withdraw", withdraw),
        ("GET", "/api/v1/escrow/channels/{channel_id}", channel),
        ("POST", "/api/v1/escrow/mint", mint),
        ("POST", "/api/v1/escrow/open", open_),
        ("POST", "/api/v1/escrow/claim", claim),
        ("POST", "/api/v1/escrow/close", close),
        ("POST", "/api/v1/escrow/refund", refund),
        ("GET", "/api/v1/escrow/budgets", budgets),
        ("POST", "/api/v1/escrow/budgets", budget_create),
        ("POST", "/api/v1/escrow/budgets/refund", budget_refund),
    ]


def build_app(service: "NodeService", token: str) -> Starlette:
    """The ASGI app of the control API, bound to one running node."""
    expected = f"Bearer {token}".encode()

    def endpoint(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
                return _error(401, "missing or wrong bearer token (see api.token in the node home)", "authentication_error")
            try:
                return JSONResponse(await fn(request))
            except ApiError as exc:
                return _error(exc.status, exc.message, exc.kind, exc.code)
            except EscrowRefused as exc:
                return _error(409, f"the escrow agent refused: {exc}", "escrow_error", exc.code)
            except EscrowUnreachable as exc:
                return _error(502, str(exc), "escrow_unreachable")
            except (ValueError, TypeError) as exc:
                return _error(400, str(exc), "invalid_request_error")

        return handler

    routes = _market_routes(service) + _escrow_routes(service)
    return Starlette(routes=[Route(path, endpoint(fn), methods=[method]) for method, path, fn in routes])
