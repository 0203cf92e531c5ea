"""The daemon's local HTTP API (control face, ``/api/v1/…``), used by the ``node`` CLI.

Rules: loopback only; every request passes ``_http.WebGuard`` (loopback ``Host``, no foreign
``Origin``, JSON bodies of at most 2 MiB) and carries ``Authorization: Bearer <token>`` with the
token kept in the home (``api.token``, mode 0600), compared in constant time; every POST body is a
declared model below, bounded as the wire is, and a call is checked whole (``check_call``) before
any channel opens; errors are JSON ``{"error": {"message", "type", "code"}}`` with the status of
``_http.TABLE`` (the same as the OpenAI face's); amounts are µc.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Literal

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, ConfigDict, Field
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import protocol

from .._config import save_accept_escrow
from .._errors import InvalidRequest, NotFound
from .._receipts import FORFEITED, PAID, receipt_json
from ..consumer._request_check import check_call
from ..consumer._results import CancelledCall
from ..consumer._routing import SORTS, Preferences
from ..escrow._ops import _decode_hex, _hex_id
from ..provider import Offer
from ._http import (
    MAX_MESSAGES,
    Amount,
    Body,
    Budget,
    Handler,
    MaxTokens,
    ModelName,
    NDJSONStream,
    PeerId,
    Problem,
    RunningCalls,
    Sort,
    WebGuard,
    WireText,
    checked_agent,
    endpoint,
    read_body,
)
from ._openai import openai_routes, openai_shape
from ._reports import earnings, metrics_registry, stats

if TYPE_CHECKING:
    from .._node import Node

__all__ = ["build_app"]

Routes = list[tuple[str, str, Handler]]
OnText = Callable[[str], Awaitable[None]]


def _shape(p: Problem) -> dict[str, Any]:
    return {"error": {"message": p.message, "type": p.type, "code": p.code}}


def _stream_error(p: Problem) -> dict[str, Any]:
    return _shape(p) | {"status": p.status}  # the status line went out before the error happened


async def _body(request: Request, model: type[Body]) -> Any:
    return await read_body(request, model, empty=b"{}")  # no body at all reads as {}


def _cancelled(cost: CancelledCall | None) -> dict[str, Any]:
    """The last line of a cancelled call's stream: what it cost (null: no provider was called yet)."""
    return {"cancelled": cost.to_json() if cost is not None else None}


def _streamed(call: Callable[[OnText], Awaitable[Any]], calls: RunningCalls) -> NDJSONStream:
    """``call(on_text)`` as NDJSON: first ``{"call": {"id"}}`` (what ``POST /api/v1/calls/{id}/cancel``
    takes), each piece of text as ``{"delta"}`` when it arrives, then ``{"result"}``; a cancelled
    call ends with ``{"cancelled": ...}`` instead, saying what it cost."""

    async def produce(emit: Callable[[Any], Awaitable[None]]) -> None:
        async def on_text(text: str) -> None:
            await emit({"delta": text})

        await emit({"result": (await call(on_text)).to_json()})

    return NDJSONStream(produce, _stream_error, calls=calls, started_event=lambda call_id: {"call": {"id": call_id}},
                        cancelled_event=_cancelled)


# ---- request bodies ----------------------------------------------------------------------------

_OFFER = {f.name: f.default for f in dataclasses.fields(Offer)}  # Offer's own defaults, stated once


class TierBody(Body):
    model_config = ConfigDict(extra="forbid")

    name: str
    input_price: int
    output_price: int
    max_concurrent: int
    priority: int = 1


class OfferBody(Body):
    """``Offer``'s fields; its own checks (ranges, backend spec, tier names) run when it is built."""

    model_config = ConfigDict(extra="forbid")  # as Offer(**fields) refuses a field it does not know

    model: str
    backend: str
    input_price: int
    output_price: int
    max_context: int = _OFFER["max_context"]
    min_charge: int = _OFFER["min_charge"]
    rate_limit: int = _OFFER["rate_limit"]
    max_concurrent: int = _OFFER["max_concurrent"]
    tiers: list[TierBody] = []
    batch_min_calls: int = _OFFER["batch_min_calls"]
    batch_discount_permille: int = _OFFER["batch_discount_permille"]
    features: list[str] = []  # declared features (protocol.FEATURES); empty: what the backend serves


def _id(value: str) -> str:
    try:
        _hex_id(value, "an id")
    except InvalidRequest as exc:  # a ValueError is what lets pydantic name the field
        raise ValueError(str(exc)) from exc
    return value


def _message_hex(cls: type) -> AfterValidator:
    def check(value: str) -> str:
        try:
            _decode_hex(value, cls, "the value")
        except InvalidRequest as exc:  # a ValueError is what lets pydantic name the field
            raise ValueError(str(exc)) from exc
        return value

    return AfterValidator(check)


HexId = Annotated[str, AfterValidator(_id)]  # a channel or budget id: 32 hex digits
ReceiptHex = Annotated[str, _message_hex(protocol.Receipt)]
CloseHex = Annotated[str, _message_hex(protocol.EscrowClose)]
Seconds = Annotated[int, Field(ge=1, le=1 << 32)]  # a lifetime; now + it stays inside the wire's u64


class Escrowed(Body):
    escrow: str | None = None  # the agent: a peer id or a /p2p/ address; none or "": this node's own


class MintBody(Escrowed):
    to: PeerId
    amount: Amount


class WithdrawBody(Escrowed):
    amount: Amount


class OpenBody(Escrowed):
    provider: PeerId
    amount: Amount
    expires_s: Seconds
    budget_id: HexId | None = None


class ClaimBody(Escrowed):
    receipt: ReceiptHex


class CloseBody(Escrowed):
    channel_id: HexId
    receipt: ReceiptHex | None = None
    partial: CloseHex | None = None
    sign_only: bool = False


class ChannelBody(Escrowed):
    channel_id: HexId


class BudgetBody(Escrowed):
    amount: Amount
    whitelist: list[PeerId]
    per_session_limit: Amount
    expires_s: Seconds


class BudgetIdBody(Escrowed):
    budget_id: HexId


class AcceptBody(Body):
    agent: PeerId  # an escrow agent this node's offers accept (or stop accepting, with ``remove``)
    remove: bool = False


Tier = Literal["", "basic", "premium", "enterprise"]  # protocol.TIERS, or "": the offer's own


class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]  # the roles the wire carries
    content: WireText


class CallBody(Body):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: MaxTokens = 256
    temperature_milli: Annotated[int, Field(ge=0, le=2000)] = 1000
    stream: bool = False


class RunBody(CallBody):
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)  # or ``prompt``
    prompt: WireText | None = None  # one user message
    model: ModelName
    provider: str | None = None  # rent from this provider only
    sort: Sort = "cheapest"
    budget: Budget | None = None
    escrow: str | None = None
    tier: Tier = ""
    channel: HexId | None = None  # an open channel of this node's to pay from (``escrow``: its agent)


class SessionBody(Body):
    model: ModelName
    provider: str | None = None
    sort: Sort = "cheapest"
    budget: Budget
    escrow: str | None = None
    tier: Tier = ""
    batch_calls: Annotated[int, Field(ge=0, le=1 << 20)] = 0  # the wire's bound on a declared batch
    channel: HexId | None = None  # an open channel of this node's to pay from (``escrow``: its agent)


# ---- routes ------------------------------------------------------------------------------------


def _market_routes(service: "Node") -> Routes:
    async def status(request: Request) -> Any:
        return service.status()

    async def offers(request: Request) -> Any:
        return [o.to_json() for o in service.offers()]

    async def add_offer(request: Request) -> Any:
        d = await _body(request, OfferBody)
        try:
            return (await service.add_offer(d.model_dump())).to_json()
        except ValueError as exc:  # Offer refused a value, or the storefront is full (Node.add_offer's contract)
            raise InvalidRequest(str(exc)) from exc

    async def remove_offer(request: Request) -> Any:
        model = request.path_params["model"]
        if not service.remove_offer(model):
            raise NotFound(f"no offer for model {model!r}")
        return {"removed": model}

    async def providers(request: Request) -> Any:
        sort = request.query_params.get("sort", "cheapest")
        if sort not in SORTS:
            raise InvalidRequest(f"sort must be one of {', '.join(SORTS)}", "sort")
        return [row.to_json() for row in await service.providers(request.query_params.get("model") or None, sort)]

    async def market(request: Request) -> Any:
        return service.market_stats()

    async def evidence(request: Request) -> Any:
        return service.evidence(request.query_params.get("provider") or None)

    async def market_figures(request: Request) -> Any:
        model = request.query_params.get("model") or ""
        if not model:
            raise InvalidRequest("name the model (model=NAME)", "model")
        return await service.market_figures(model, _count(request.query_params.get("hours"), "hours", 24, 1, 720))

    async def advice(request: Request) -> Any:
        return await service.advice(_count(request.query_params.get("hours"), "hours", 24, 1, 720))

    return [
        ("GET", "/api/v1/status", status),
        ("GET", "/api/v1/offers", offers),
        ("POST", "/api/v1/offers", add_offer),
        ("DELETE", "/api/v1/offers/{model:path}", remove_offer),
        ("GET", "/api/v1/providers", providers),
        ("GET", "/api/v1/market", market),
        ("GET", "/api/v1/evidence", evidence),
        ("GET", "/api/v1/market/prices", market_figures),
        ("GET", "/api/v1/advise", advice),
    ]


def _escrow_routes(service: "Node") -> Routes:
    ops = service.escrow

    def agent(d: Escrowed) -> str | None:
        return checked_agent(ops, d.escrow or None)

    def query_agent(request: Request) -> str | None:
        return checked_agent(ops, request.query_params.get("escrow") or None)

    async def balance(request: Request) -> Any:
        return (await ops.balance(query_agent(request))).to_json()

    async def budgets(request: Request) -> Any:
        return [b.to_json() for b in await ops.budgets(query_agent(request))]

    async def channel(request: Request) -> Any:
        channel_id = request.path_params["channel_id"]
        return (await ops.channel(query_agent(request), channel_id)).to_json()

    async def mint(request: Request) -> Any:
        d = await _body(request, MintBody)
        return (await ops.mint(agent(d), d.to, d.amount)).to_json()

    async def withdraw(request: Request) -> Any:
        d = await _body(request, WithdrawBody)
        return (await ops.withdraw(agent(d), d.amount)).to_json()

    async def open_(request: Request) -> Any:
        d = await _body(request, OpenBody)
        return (await ops.open(agent(d), d.provider, d.amount, d.expires_s, d.budget_id)).to_json()

    async def claim(request: Request) -> Any:
        d = await _body(request, ClaimBody)
        # no agent named: the receipt's own
        return (await ops.claim(checked_agent(ops, d.escrow) if d.escrow else None, d.receipt)).to_json()

    async def close(request: Request) -> Any:
        d = await _body(request, CloseBody)
        if d.partial is None and not d.sign_only:
            raise InvalidRequest("a cooperative close needs both parties: sign with --sign-only and have the other "
                                 "party submit with --with FILE", "partial")
        if d.partial is not None:  # already checked to decode (CloseHex)
            other = _decode_hex(d.partial, protocol.EscrowClose, "partial")
            if other.channel_id != bytes.fromhex(d.channel_id):
                raise InvalidRequest("that close is for another channel", "partial")
        return (await ops.close(agent(d), d.channel_id, d.receipt, d.partial, d.sign_only)).to_json()

    async def refund(request: Request) -> Any:
        d = await _body(request, ChannelBody)
        return (await ops.refund(agent(d), d.channel_id)).to_json()

    async def budget_create(request: Request) -> Any:
        d = await _body(request, BudgetBody)
        return (await ops.budget_create(agent(d), d.amount, d.whitelist, d.per_session_limit, d.expires_s)).to_json()

    async def budget_refund(request: Request) -> Any:
        d = await _body(request, BudgetIdBody)
        return (await ops.budget_refund(agent(d), d.budget_id)).to_json()

    def own_agent() -> str | None:
        return service.identity.peer_id if service.escrow_agent is not None else None

    def configured() -> tuple[str, ...]:  # the accepted agents, less this node's own (always accepted)
        return tuple(sorted(set(service.storefront.accepted_agents()) - {own_agent()}))

    def accepted() -> dict[str, Any]:
        return {"accepted": list(configured()), "own_agent": own_agent()}

    async def list_accepted(request: Request) -> Any:
        return accepted()

    async def accept(request: Request) -> Any:
        """Accept an escrow agent (or stop, ``remove``) on the running node: kept in the config's
        ``[node] accept_escrow`` and republished at once, so consumers see the listing with it."""
        d = await _body(request, AcceptBody)
        store = service.storefront
        agents = tuple(a for a in configured() if a != d.agent) + (() if d.remove else (d.agent,))
        await trio.to_thread.run_sync(save_accept_escrow, service.home.config, agents)
        store.set_accepted_agents(agents)
        return accepted()

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
        ("GET", "/api/v1/escrow/accepted", list_accepted),
        ("POST", "/api/v1/escrow/accepted", accept),
    ]


def _renting_routes(service: "Node") -> Routes:
    calls = RunningCalls()  # the streamed calls running now, by id

    def prefs(sort: str, provider: str | None) -> Preferences:
        return Preferences(sort=sort, only=(provider,) if provider else ())

    def escrow(name: str | None) -> str | None:  # none: whichever agent a provider lists
        return checked_agent(service.escrow, name) if name else None

    def messages(d: CallBody) -> list[dict[str, str]]:
        return [m.model_dump() for m in d.messages or ()]

    async def run(request: Request) -> Any:
        d = await _body(request, RunBody)
        if d.messages is not None:
            msgs = messages(d)
        elif d.prompt is not None:
            msgs = [{"role": "user", "content": d.prompt}]
        else:
            raise InvalidRequest("prompt: missing (it is required without messages)", "prompt", "missing_field")
        check_call(msgs, d.max_tokens, d.temperature_milli, 1000, ())  # before any channel opens
        kwargs = dict(max_tokens=d.max_tokens, temperature_milli=d.temperature_milli, prefs=prefs(d.sort, d.provider),
                      budget=d.budget, escrow=escrow(d.escrow), tier=d.tier, channel=d.channel)
        if not d.stream:
            return (await service.renter.run(d.model, msgs, **kwargs)).to_json()
        return _streamed(lambda on_text: service.renter.run(d.model, msgs, on_text=on_text, **kwargs), calls)

    async def open_session(request: Request) -> Any:
        d = await _body(request, SessionBody)
        info = await service.sessions.open(d.model, budget=d.budget, prefs=prefs(d.sort, d.provider),
                                           escrow=escrow(d.escrow), tier=d.tier, batch_calls=d.batch_calls,
                                           channel=d.channel)
        return info.to_json()

    async def session_call(request: Request) -> Any:
        sid = request.path_params["session_id"]
        d = await _body(request, CallBody)
        check_call(messages(d), d.max_tokens, d.temperature_milli, 1000, ())  # before it is sent, or billed
        kwargs = dict(max_tokens=d.max_tokens, temperature_milli=d.temperature_milli)
        if not d.stream:
            return (await service.sessions.call(sid, messages(d), **kwargs)).to_json()
        return _streamed(lambda on_text: service.sessions.call(sid, messages(d), on_text=on_text, **kwargs), calls)

    async def cancel_call(request: Request) -> Any:
        """Cancel a streamed call this node runs: it settles what was delivered; its own stream ends
        with what that cost."""
        call_id = request.path_params["call_id"]
        calls.cancel(call_id)  # NotFound -> 404
        return {"cancelling": call_id}

    async def close_session(request: Request) -> Any:
        return (await service.sessions.close(request.path_params["session_id"])).to_json()

    async def earnings_(request: Request) -> Any:
        q = request.query_params
        return await trio.to_thread.run_sync(earnings, service, q.get("period", "30d"), q.get("by", "model"))

    async def stats_(request: Request) -> Any:
        return await trio.to_thread.run_sync(stats, service)

    async def receipts(request: Request) -> Any:
        """One page of receipts, newest first: ``limit`` (1 to 1000, default 50) from ``offset``."""
        q = request.query_params
        session = q.get("session")
        try:
            sid = bytes.fromhex(session) if session else None
        except ValueError as exc:
            raise InvalidRequest("session must be hex", "session") from exc
        limit, offset = _count(q.get("limit"), "limit", 50, 1, 1000), _count(q.get("offset"), "offset", 0, 0, 10**12)
        return (await trio.to_thread.run_sync(lambda: service.receipts.page(sid, limit, offset))).to_json()

    async def receipt(request: Request) -> Any:
        """One receipt by its id, a unique prefix of it, or ``latest``; ``encoded`` is the hex that
        ``escrow claim`` and ``escrow close`` take."""
        return await trio.to_thread.run_sync(_find_receipt, service, request.path_params["receipt_id"])

    return [
        ("POST", "/api/v1/run", run),
        ("GET", "/api/v1/receipts", receipts),
        ("GET", "/api/v1/receipts/{receipt_id}", receipt),
        ("GET", "/api/v1/earnings", earnings_),
        ("GET", "/api/v1/stats", stats_),
        ("POST", "/api/v1/sessions", open_session),
        ("POST", "/api/v1/sessions/{session_id}/calls", session_call),
        ("POST", "/api/v1/calls/{call_id}/cancel", cancel_call),
        ("DELETE", "/api/v1/sessions/{session_id}", close_session),
    ]


_RECEIPT_PREFIX = re.compile(r"^[0-9a-f]{4,64}$")


def _find_receipt(service: "Node", wanted: str) -> dict[str, Any]:
    """The receipt ``wanted`` names (its id, a unique prefix of 4 or more hex digits, or ``latest``)
    as ``node receipts --json`` shows one.

    Raises:
        InvalidRequest: not hex, or a prefix more than one receipt has. NotFound: no such receipt.
    """
    wanted = wanted.strip().lower()
    if wanted == "latest":
        rows = service.receipts.query("SELECT receipt, role, claimed FROM receipts ORDER BY rowid DESC LIMIT 1")
    elif _RECEIPT_PREFIX.match(wanted):
        rows = service.receipts.query("SELECT receipt, role, claimed FROM receipts WHERE lower(hex(receipt_id)) "
                                      "LIKE ? ORDER BY rowid DESC LIMIT 2", (wanted + "%",))
    else:
        raise InvalidRequest("a receipt is named by its id (hex, at least 4 digits of it) or `latest`", "receipt_id")
    if not rows:
        raise NotFound("no receipts yet" if wanted == "latest" else f"no receipt {wanted}")
    if len(rows) > 1:
        raise InvalidRequest(f"more than one receipt starts with {wanted}: give more of its id", "receipt_id")
    blob, role, claimed = rows[0]
    r = protocol.decode(bytes(blob), expect=(protocol.Receipt,))
    return receipt_json(r) | {"role": role, "claimed": claimed == PAID, "forfeited": claimed == FORFEITED,
                              "encoded": bytes(blob).hex()}


def _count(value: str | None, field: str, default: int, low: int, high: int) -> int:
    """A whole number from a query parameter, ``low`` to ``high``.

    Raises:
        InvalidRequest: not one (naming ``field``).
    """
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise InvalidRequest(f"{field} must be a whole number from {low} to {high}", field)
    return int(value)


def build_app(service: "Node", token: str, openai_keyless: bool = False, hosts: tuple[str, ...] = (),
              x402: bool = False) -> Starlette:
    """The ASGI app of both faces (and ``/metrics``), bound to one running node, behind ``WebGuard``.

    Args:
        token: the bearer token both faces ask for (the OpenAI face does not with ``openai_keyless``).
        hosts: ``Host`` names accepted besides localhost, 127.0.0.1 and [::1] (the host the API binds).
        x402: chat completions without the token may be paid with x402 on ``service.chain`` (``_x402``).
    """
    routes = _market_routes(service) + _escrow_routes(service) + _renting_routes(service)
    registry = metrics_registry(service)

    async def metrics(request: Request) -> Response:
        # readable without the token, as scrapers expect: counts and gauges only, no ids or secrets
        body = await trio.to_thread.run_sync(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    guard = Middleware(WebGuard, faces=(("/v1/", openai_shape),), default=_shape, hosts=hosts)
    return Starlette(routes=[Route(path, endpoint(fn, _shape, token), methods=[method]) for method, path, fn in routes]
                     + openai_routes(service, token, openai_keyless, x402) + [Route("/metrics", metrics, methods=["GET"])],
                     middleware=[guard])
