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

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import protocol

from ..consumer._held_sessions import UnknownSession
from ..consumer._renter import RentError
from ..consumer._routing import SORTS, Preferences
from ..consumer._session_client import CallRefused, SessionError, SessionRejected
from ..escrow._client import EscrowUnreachable
from ..escrow._ops import EscrowRefused
from ._openai import openai_routes
from ._reports import earnings, metrics_registry, stats

if TYPE_CHECKING:
    from .._node import NodeService

__all__ = ["build_app", "ApiError"]

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


def _error_of(exc: Exception) -> tuple[int, str, str, str | None] | None:
    """(status, message, type, code) of an exception the API reports, or None."""
    if isinstance(exc, ApiError):
        return exc.status, exc.message, exc.kind, exc.code
    if isinstance(exc, EscrowRefused):
        return 409, f"the escrow agent refused: {exc}", "escrow_error", exc.code
    if isinstance(exc, EscrowUnreachable):
        return 502, str(exc), "escrow_unreachable", None
    if isinstance(exc, RentError):
        return 404, str(exc), "no_provider", "no_provider"
    if isinstance(exc, (SessionRejected, CallRefused)):
        return 409, str(exc), "provider_refused", exc.reason
    if isinstance(exc, SessionError):
        return 502, str(exc), "provider_error", getattr(exc, "code", None)
    if isinstance(exc, protocol.SpendLimitReached):
        return 402, str(exc), "budget_exhausted", "spend_limit_reached"
    if isinstance(exc, UnknownSession):
        return 404, str(exc.args[0]), "invalid_request_error", "unknown_session"
    if isinstance(exc, (ValueError, TypeError)):
        return 400, str(exc), "invalid_request_error", None
    return None


class NDJSONStream:
    """An ASGI response that runs ``produce(emit)`` and sends each emitted document as one JSON
    line as soon as it is emitted (no generator holds a nursery open across a yield)."""

    def __init__(self, produce: Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]]) -> None:
        self.produce = produce

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache")]})

        async def emit(doc: Any) -> None:
            await send({"type": "http.response.body", "body": json.dumps(doc).encode() + b"\n", "more_body": True})

        try:
            await self.produce(emit)
        except Exception as exc:
            err = _error_of(exc)
            if err is None:
                raise
            await emit({"error": {"message": err[1], "type": err[2], "code": err[3]}, "status": err[0]})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _renting_routes(service: "NodeService") -> list[tuple[str, str, Handler]]:
    def call_args(d: dict[str, Any]) -> tuple[list[dict[str, str]], int, int]:
        messages = d.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content}")
        return messages, _field(d, "max_tokens", int, 256), _field(d, "temperature_milli", int, 1000)

    async def run(request: Request) -> Any:
        d = await body(request)
        if "messages" not in d:
            d["messages"] = [{"role": "user", "content": _field(d, "prompt", str)}]
        messages, max_tokens, temperature = call_args(d)
        provider = _field(d, "provider", str, None)
        prefs = Preferences(sort=_field(d, "sort", str, "cheapest"), only=(provider,) if provider else ())
        kwargs = dict(max_tokens=max_tokens, temperature_milli=temperature, prefs=prefs,
                      budget=_field(d, "budget", int, None), escrow=_field(d, "escrow", str, None),
                      tier=_field(d, "tier", str, ""))
        model = _field(d, "model", str)
        if not d.get("stream"):
            return await service.renter.run(model, messages, **kwargs)

        async def produce(emit: Callable[[Any], Awaitable[None]]) -> None:
            async def on_text(text: str) -> None:
                await emit({"delta": text})

            await emit({"result": await service.renter.run(model, messages, on_text=on_text, **kwargs)})

        return NDJSONStream(produce)

    async def open_session(request: Request) -> Any:
        d = await body(request)
        provider = _field(d, "provider", str, None)
        prefs = Preferences(sort=_field(d, "sort", str, "cheapest"), only=(provider,) if provider else ())
        return await service.sessions.open(_field(d, "model", str), budget=_field(d, "budget", int), prefs=prefs,
                                           escrow=_field(d, "escrow", str, None), tier=_field(d, "tier", str, ""),
                                           batch_calls=_field(d, "batch_calls", int, 0))

    async def session_call(request: Request) -> Any:
        sid = request.path_params["session_id"]
        d = await body(request)
        messages, max_tokens, temperature = call_args(d)
        if not d.get("stream"):
            return await service.sessions.call(sid, messages, max_tokens=max_tokens, temperature_milli=temperature)

        async def produce(emit: Callable[[Any], Awaitable[None]]) -> None:
            async def on_text(text: str) -> None:
                await emit({"delta": text})

            await emit({"result": await service.sessions.call(sid, messages, max_tokens=max_tokens,
                                                              temperature_milli=temperature, on_text=on_text)})

        return NDJSONStream(produce)

    async def close_session(request: Request) -> Any:
        return await service.sessions.close(request.path_params["session_id"])

    async def earnings_(request: Request) -> Any:
        q = request.query_params
        return await trio.to_thread.run_sync(earnings, service, q.get("period", "30d"), q.get("by", "model"))

    async def stats_(request: Request) -> Any:
        return await trio.to_thread.run_sync(stats, service)

    async def receipts(request: Request) -> Any:
        session = request.query_params.get("session")
        try:
            sid = bytes.fromhex(session) if session else None
        except ValueError as exc:
            raise ApiError(400, "session must be hex") from exc
        return await trio.to_thread.run_sync(service.receipts.list, sid)

    return [
        ("POST", "/api/v1/run", run),
        ("GET", "/api/v1/receipts", receipts),
        ("GET", "/api/v1/earnings", earnings_),
        ("GET", "/api/v1/stats", stats_),
        ("POST", "/api/v1/sessions", open_session),
        ("POST", "/api/v1/sessions/{session_id}/calls", session_call),
        ("DELETE", "/api/v1/sessions/{session_id}", close_session),
    ]


def build_app(service: "NodeService", token: str, openai_keyless: bool = False) -> Starlette:
    """The ASGI app of the control API, bound to one running node."""
    expected = f"Bearer {token}".encode()

    def endpoint(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
                return _error(401, "missing or wrong bearer token (see api.token in the node home)", "authentication_error")
            try:
                result = await fn(request)
            except Exception as exc:
                err = _error_of(exc)
                if err is None:
                    raise
                return _error(*err)
            return result if isinstance(result, NDJSONStream) else JSONResponse(result)

        return handler

    routes = _market_routes(service) + _escrow_routes(service) + _renting_routes(service)
    registry = metrics_registry(service)

    async def metrics(request: Request) -> Response:
        # readable without the token, as scrapers expect: counts and gauges only, no ids or secrets
        body = await trio.to_thread.run_sync(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route(path, endpoint(fn), methods=[method]) for method, path, fn in routes]
                     + openai_routes(service, token, openai_keyless) + [Route("/metrics", metrics, methods=["GET"])])
