"""What both HTTP faces of the daemon share: the error table, the web guard, the bearer check, request
bodies read into declared models, and responses streamed as they are produced.

Rules:
- Every request passes ``WebGuard`` before any route (both faces and ``/metrics``): its ``Host`` must
  name this node on loopback (``localhost``, ``127.0.0.1``, ``[::1]`` or the bound host, with or
  without the bound port: 421 otherwise, against DNS rebinding); an ``Origin``, when sent, must be a
  loopback origin (403, against cross-site requests); a body must be ``application/json`` (optional
  ``charset=utf-8``; 415, so no browser can send one without a CORS preflight, which nothing here
  answers) of at most ``MAX_BODY`` bytes (413, refused at ``Content-Length`` or counted while read).
  Its refusals are ``EdgeRefusal``s: api-only exceptions, not node errors, in ``TABLE`` like any other.
- A body nests at most ``MAX_DEPTH`` levels (checked before parsing) and every bound a field has on
  the wire holds here already (``Amount``, ``Budget``, ``MaxTokens``, ``WireText``, …): bad input is a
  4xx before any money moves.
- Every exception that reaches a face goes through ``problem_of`` and nothing else. ``TABLE`` gives
  each domain error one status, type and code, the same on both faces; a face only shapes the body
  (control ``{"error": {message, type, code}}``, OpenAI ``{"error": {message, type, param, code}}``).
- An exception with no row is a bug: 500 with a generic message and its traceback in the log,
  never the client's 400. The only 400 is ``InvalidRequest``, which names the offending field.
- A request body is a ``Body`` model (strict JSON types: no ``true`` for 1, no ``"1"`` for 1);
  its validation failure becomes ``InvalidRequest``. A caller's value that only a lower layer can
  check (an escrow agent's name) is checked here too, before any I/O, and its ValueError becomes
  ``InvalidRequest`` here, once.
- A streamed response (``EventStream``) runs its work only while its client listens: a client that
  closes the stream cancels it (hypercorn does not: it only tells the app ``http.disconnect``),
  and a cancelled renting call pays for what was delivered, nothing more. ``RunningCalls`` lets a
  client cancel a stream it started by id and read, as the stream's last event, what that cost.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import logging
import re
import secrets
from contextlib import ExitStack, contextmanager
from typing import Annotated, Any, Awaitable, Callable, ClassVar, Iterable, Iterator, Sequence, TypeVar

import trio
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import protocol
from wallet import ChainUnreachable

from .._daemon_files import DaemonNotRunning
from .._errors import DemoError, InvalidRequest, NotAuthorized, NotFound
from .._home import ConfigError, HomeInUse
from .._receipts import ReceiptStoreError
from ..consumer._delivery import SettlementUnconfirmed
from ..consumer._held_sessions import UnknownSession
from ..consumer._pacing import Busy
from ..consumer._renter import AtCapacity, RentError
from ..consumer._results import CancelledCall, cancelled_calls
from ..consumer._routing import SORTS, UnsupportedFeature
from ..consumer._session_client import CallRefused, ProviderFailed, ProviderMisbehaved, SessionError, SessionRejected
from ..escrow._client import EscrowUnreachable
from ..escrow._ops import EscrowOps, EscrowRefused
from ..net._streams import StreamClosed, StreamTimeout
from ..provider._queue import QueueFull, QueueTimeout
from ..provider._storefront import OfferUnloadable
from ..provider.backends._base import BackendError, BackendUnsupported
from ._x402 import PaymentRequired

__all__ = ["Problem", "TABLE", "problem_of", "Shape", "Handler", "endpoint", "check_bearer", "Body", "read_body",
           "invalid_request", "checked_agent", "PeerId", "Sort", "Amount", "Budget", "MaxTokens", "PricePer1K",
           "WireText", "ModelName", "MAX_MESSAGES", "EventStream", "NDJSONStream", "SSEStream", "RunningCalls",
           "EdgeRefusal",
           "MisdirectedHost", "ForeignOrigin", "NotJSON", "BodyTooLarge", "WebGuard", "MAX_BODY", "MAX_DEPTH",
           "LOOPBACK_HOSTS"]

_logger = logging.getLogger("node.api")


# ---- the edge's own refusals --------------------------------------------------------------------


class EdgeRefusal(Exception):
    """The HTTP edge refused a request before any handler ran (its Host, Origin, media type or size).
    Not a node error: it is raised and answered inside this package, through ``TABLE``."""


class ClientGone(EdgeRefusal):
    """The client closed the connection before its answer was ready (nothing reaches it)."""


class MisdirectedHost(EdgeRefusal):
    """The ``Host`` header names someone else (a DNS-rebinding page's domain): 421."""


class ForeignOrigin(EdgeRefusal):
    """The request comes from a web page that is not on loopback (cross-site): 403."""


class NotJSON(EdgeRefusal):
    """A body that is not ``application/json`` (a form or ``text/plain``, which skip CORS): 415."""


class BodyTooLarge(EdgeRefusal):
    """A body over ``MAX_BODY`` bytes: 413."""


# ---- the error table ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a client is told about an exception; each face shapes it into its body."""

    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None  # the offending request field (OpenAI's ``param``)
    retry_after_s: int | None = None  # sent as ``Retry-After`` (a 429: when trying again may work)
    extra_headers: tuple[tuple[str, str], ...] = ()  # e.g. x402's PAYMENT-REQUIRED on a 402

    @property
    def headers(self) -> dict[str, str]:
        out = {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        return out | dict(self.extra_headers)


@dataclasses.dataclass(frozen=True)
class _Row:
    error: type[BaseException]
    status: int
    type: str
    code: str | Callable[[Any], str | None]  # fixed, or read off the exception
    when: Callable[[Any], bool] | None = None  # a narrower case of ``error``, tried before the general row
    prefix: str = ""  # put before the exception's own message
    param: str | None = None
    retry_after: Callable[[Any], int] | None = None  # seconds, read off the exception
    headers: Callable[[Any], dict[str, str]] | None = None  # more response headers, read off the exception

    def problem(self, exc: BaseException) -> Problem:
        code = self.code if isinstance(self.code, str) else self.code(exc)
        param = exc.field if isinstance(exc, InvalidRequest) else self.param
        retry = max(1, int(self.retry_after(exc))) if self.retry_after is not None else None
        extra = tuple(self.headers(exc).items()) if self.headers is not None else ()
        return Problem(self.status, self.type, code, self.prefix + str(exc), param, retry, extra)


# One status per case. First match wins, so a subclass (or a ``when`` case) comes before its base.
TABLE: tuple[_Row, ...] = (
    # the web guard's refusals, before any handler runs
    _Row(MisdirectedHost, 421, "invalid_request_error", "misdirected_request"),
    _Row(ForeignOrigin, 403, "permission_error", "cross_origin_refused"),
    _Row(NotJSON, 415, "invalid_request_error", "unsupported_media_type"),
    _Row(BodyTooLarge, 413, "invalid_request_error", "request_too_large"),
    _Row(ClientGone, 499, "invalid_request_error", "client_closed_request"),  # nginx's 499: nobody reads it
    # the caller's fault
    _Row(UnsupportedFeature, 400, "invalid_request_error", "unsupported_feature"),  # no offer lists what it needs
    _Row(InvalidRequest, 400, "invalid_request_error", lambda e: e.code),  # the only 400: a field is wrong
    _Row(NotAuthorized, 401, "authentication_error", "invalid_api_key"),
    _Row(UnknownSession, 404, "invalid_request_error", "unknown_session"),  # never opened, or closed since
    _Row(NotFound, 404, "invalid_request_error", "not_found"),
    # money: 402 where paying more (a bigger budget, more credits) would make the same request work;
    # x402: a caller without the token pays the request on the chain (the requirements in a header)
    _Row(PaymentRequired, 402, "payment_required", lambda e: e.reason,
         headers=lambda e: {"payment-required": e.header}),
    _Row(protocol.SpendLimitReached, 402, "insufficient_quota", "spend_limit_reached", prefix="over budget: "),
    _Row(EscrowRefused, 402, "insufficient_quota", "insufficient_funds", when=lambda e: e.code == "insufficient_funds",
         prefix="not enough credits at the escrow agent: "),
    # any other refusal is the agent's valid "no" that money does not change (already claimed, not the
    # operator, channel closed or expired): 409, a conflict with the state the agent holds
    _Row(EscrowRefused, 409, "escrow_refused", lambda e: e.code, prefix="the escrow agent refused: "),
    # the agent is a service this node depends on and it is not there now; retrying may work: 503
    _Row(EscrowUnreachable, 503, "escrow_unreachable", "escrow_unreachable"),
    # at capacity: every provider tried was busy (this node's own bound for it, or its refusal), or
    # this node's queue for one is full: 429 with Retry-After, as for any rate limit
    _Row(AtCapacity, 429, "rate_limit_error", "capacity", retry_after=lambda e: e.retry_after_s),
    _Row(Busy, 429, "rate_limit_error", "capacity", retry_after=lambda e: e.retry_after_s),
    # providers: someone was tried and every one failed -> 502 (a gateway's upstream failed); nobody
    # offers the model within the preferences -> 404, OpenAI's model_not_found
    _Row(RentError, 502, "provider_error", "providers_failed", when=lambda e: bool(e.attempts)),
    _Row(RentError, 404, "invalid_request_error", "model_not_found", param="model"),
    # a provider's valid "no" (busy, over its rate limit, not that tier): 409, as for the escrow agent
    _Row(SessionRejected, 409, "provider_refused", lambda e: e.reason),
    _Row(CallRefused, 409, "provider_refused", lambda e: e.reason),
    # a provider that broke (went away, broke the protocol) mid-session: 502
    _Row(ProviderMisbehaved, 502, "provider_error", lambda e: e.code),
    # served and counter-signed, but the provider never acknowledged it: not a success, not retried elsewhere
    _Row(SettlementUnconfirmed, 502, "provider_error", "settlement_unconfirmed"),
    _Row(ProviderFailed, 502, "provider_error", "provider_failed"),
    _Row(SessionError, 502, "provider_error", "provider_error"),
    _Row(StreamTimeout, 504, "provider_error", "peer_timeout"),  # a peer went quiet past the read deadline
    _Row(StreamClosed, 502, "provider_error", "peer_closed"),  # a peer's stream ended mid-message
    # a prompt too big for one protocol frame: the caller's, but no single field is at fault
    _Row(protocol.MessageTooLarge, 413, "invalid_request_error", "request_too_large"),
    # this node's own trouble, should it ever reach a face (the provider side turns these into its
    # answers to consumers): busy -> 503, its backend broke -> 502, its config -> 500
    _Row(QueueFull, 503, "server_error", "queue_full"),
    _Row(QueueTimeout, 503, "server_error", "queue_timeout"),
    _Row(OfferUnloadable, 502, "server_error", "upstream_unavailable"),  # an upstream: Node.add_offer words the rest
    _Row(BackendUnsupported, 502, "server_error", "backend_unsupported"),  # this node's backend: not that option
    _Row(BackendError, 502, "server_error", "backend_error"),
    _Row(DaemonNotRunning, 503, "server_error", "daemon_not_running"),
    _Row(HomeInUse, 409, "server_error", "home_in_use"),  # another process runs a node on this home
    _Row(DemoError, 500, "server_error", "demo_failed"),  # raised by run_demo only, never in a handler
    _Row(ConfigError, 500, "server_error", "config_error"),
    _Row(ReceiptStoreError, 507, "server_error", "storage_error"),  # its disk is full or read-only
    _Row(ChainUnreachable, 503, "server_error", "chain_unreachable"),  # the chain of [node] chain did not answer
)

_BUG = Problem(500, "server_error", "internal_error", "internal error: the node hit a bug (its log has the details)")


def problem_of(exc: BaseException) -> Problem:
    """What to tell the client about ``exc``: its row of ``TABLE``; with none, a bug: 500, a
    generic message, and the traceback logged here. A group of one exception is read as that one."""
    one = exc
    while isinstance(one, BaseExceptionGroup) and len(one.exceptions) == 1:
        one = one.exceptions[0]
    for row in TABLE:
        if isinstance(one, row.error) and (row.when is None or row.when(one)):
            return row.problem(one)
    _logger.error("a bug reached the HTTP API: %s: %s", type(one).__name__, one, exc_info=exc)
    return _BUG


Shape = Callable[[Problem], dict[str, Any]]  # a face's error body
Handler = Callable[[Request], Awaitable[Any]]


def check_bearer(request: Request, token: str) -> None:
    """Check the request's ``Authorization: Bearer <token>``, in constant time.

    Raises:
        NotAuthorized: missing or wrong.
    """
    if not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
        raise NotAuthorized("missing or wrong bearer token: send the node's api.token (in its home) as "
                            "'Authorization: Bearer <token>'")


def endpoint(fn: Handler, shape: Shape, token: str | None) -> Handler:
    """A Starlette endpoint running ``fn`` after the bearer check (none when ``token`` is None): its
    result as JSON (a Response or a stream as it is), any exception as ``shape(problem_of(exc))``."""

    async def handler(request: Request) -> Any:
        try:
            if token is not None:
                check_bearer(request, token)
            result = await _unless_the_client_goes(request, fn)
            # rendered here, so a value JSON cannot carry is an error body too, not a bare 500
            return result if isinstance(result, (Response, EventStream)) else JSONResponse(result)
        except Exception as exc:
            problem = problem_of(exc)
            return JSONResponse(shape(problem), status_code=problem.status, headers=problem.headers)

    return handler


async def _unless_the_client_goes(request: Request, fn: Handler) -> Any:
    """``fn(request)``, cancelled if the client disconnects first: hypercorn only tells the app
    ``http.disconnect`` and would run a non-streamed call to its end, paid in full, for a client
    that gave up (an agent's timeout). The body is read first (bounded by the guard, cached for
    ``fn``), so what the watcher hears next is the disconnect. A streamed answer (``EventStream``)
    watches on its own once returned.

    Raises:
        ClientGone: the client went away; the call was cancelled (and settled what it had been given).
    """
    if request.method in ("POST", "PUT", "PATCH"):
        await request.body()
    result: list[Any] = []
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            result.append(await fn(request))
            nursery.cancel_scope.cancel()

        nursery.start_soon(_cancel_on_disconnect, request.receive, nursery.cancel_scope)
        nursery.start_soon(run)
    if not result:
        raise ClientGone("the client closed the connection before the answer was ready")
    return result[0]


# ---- the web guard ------------------------------------------------------------------------------

MAX_BODY = 2 << 20  # bytes: a call's frame is 1 MiB; JSON escaping may double it, and no more is ever needed
MAX_DEPTH = 32  # levels of JSON nesting: our bodies need 5 (messages -> message -> content parts -> part)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})

_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?")
_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?")


def _host_name(name: str) -> str:
    """``name`` as the guard compares it: lower case, an IPv6 literal bracketed and compressed."""
    name = name.strip().lower()
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return name
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def _is_json(content_type: str) -> bool:
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "application/json":
        return False
    if not params.strip():
        return True
    key, _, value = params.partition("=")
    return key.strip().lower() == "charset" and value.strip().strip('"').lower() in ("utf-8", "utf8")


class WebGuard:
    """ASGI middleware in front of both faces and ``/metrics``: checks ``Host``, ``Origin``, the media
    type and the size of the body before any route runs (the module's rules), answering a refusal in
    the shape of the face the path belongs to.

    Args:
        app: the application behind the guard.
        faces: ``(path prefix, shape)`` pairs, first match wins; ``default`` shapes any other path.
        hosts: host names accepted besides ``LOOPBACK_HOSTS`` (the host the daemon was told to bind).
    """

    def __init__(self, app: Any, *, faces: Sequence[tuple[str, Shape]], default: Shape,
                 hosts: Iterable[str] = ()) -> None:
        self.app, self.faces, self.default = app, tuple(faces), default
        self.hosts = LOOPBACK_HOSTS | {_host_name(h) for h in hosts if h}

    def _shape(self, path: str) -> Shape:
        return next((shape for prefix, shape in self.faces if path.startswith(prefix)), self.default)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            receive = self._check(scope, receive)
        except EdgeRefusal as exc:
            problem = problem_of(exc)
            await JSONResponse(self._shape(scope.get("path", ""))(problem), status_code=problem.status)(
                scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Any, receive: Any) -> Any:
        """``receive``, counting the body's bytes, once the headers pass.

        Raises:
            MisdirectedHost, ForeignOrigin, NotJSON, BodyTooLarge: what the guard refuses.
        """
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        m = _HOST.fullmatch(host.strip().lower())
        server = scope.get("server")
        bound = server[1] if server else None
        if m is None or _host_name(m.group(1)) not in self.hosts or (
                m.group(2) is not None and bound is not None and int(m.group(2)) != bound):
            raise MisdirectedHost(f"this node's API answers only to a loopback Host ({', '.join(sorted(self.hosts))}"
                                  f"), not {host[:80]!r}")
        origin = headers.get("origin")
        if origin is not None:
            o = _ORIGIN.fullmatch(origin.strip().lower())
            if o is None or _host_name(o.group(2)) not in self.hosts:
                raise ForeignOrigin(f"requests from web pages are refused unless they are served from loopback "
                                    f"(Origin {origin[:80]!r})")
        length = headers.get("content-length")
        try:
            size = int(length) if length is not None else None
        except ValueError:
            raise BodyTooLarge("Content-Length is not a number") from None
        if size or "transfer-encoding" in headers:
            if not _is_json(headers.get("content-type", "")):
                raise NotJSON("a request body must be JSON: send Content-Type: application/json, not "
                              f"{headers.get('content-type', 'none')[:80]!r}")
            if size is not None and size > MAX_BODY:
                raise BodyTooLarge(f"the request body is {size} bytes, over the {MAX_BODY} this API reads")
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise BodyTooLarge(f"the request body is over the {MAX_BODY} bytes this API reads")
            return message

        return counted


# ---- request bodies ----------------------------------------------------------------------------


class Body(BaseModel):
    """A request body: strict JSON types, unknown fields ignored (clients send more than we read)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


M = TypeVar("M", bound=BaseModel)


def invalid_request(exc: ValidationError) -> InvalidRequest:
    """The first thing wrong with a body, naming its field (a dotted path: ``messages.0.role``)."""
    err = exc.errors(include_url=False)[0]
    # a union's member names its type in the path (``literal['a','b']``, ``str``, ``NamedToolChoice``): not a field
    field = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or _FIELD_NAME.fullmatch(p)) or None
    if err["type"] == "json_invalid":
        return InvalidRequest(f"the request body is not valid JSON: {err['ctx']['error']}", None, "invalid_json")
    if field is None:
        return InvalidRequest("the request body must be a JSON object", None)
    if err["type"] == "missing":
        return InvalidRequest(f"{field}: missing (it is required)", field, "missing_field")
    reason = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    return InvalidRequest(f"{field}: {reason}", field)


_FIELD_NAME = re.compile(r"(?!(?:str|int|float|bool|list|dict|none)$)[a-z_][a-z0-9_]*")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # linear: no nested quantifier
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")


def _too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``raw`` (JSON) nests deeper than ``limit``: strings dropped, only brackets kept, each pass
    removes the innermost pairs (at C speed; ``limit`` passes at most). Unbalanced brackets are left
    for the parser to refuse."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # too few brackets to nest that deep (most bodies)
        return False
    brackets = _JSON_STRING.sub(b"", raw).translate(_ONE_BRACKET, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets) and brackets.count(b"[") == brackets.count(b"]")


async def read_body(request: Request, model: type[M], empty: bytes | None = None) -> M:
    """The request's JSON body as ``model`` (``empty`` stands in for an empty body).

    Raises:
        InvalidRequest: not JSON, nested deeper than ``MAX_DEPTH``, not an object, or a field missing or wrong.
        BodyTooLarge: over ``MAX_BODY`` (the guard's count, as it is read).
    """
    raw = await request.body()
    if _too_deep(raw):
        raise InvalidRequest(f"the request body nests deeper than {MAX_DEPTH} levels", None, "invalid_json")
    try:
        return model.model_validate_json(empty if empty is not None and not raw else raw)
    except ValidationError as exc:
        raise invalid_request(exc) from exc


def _peer_id(value: str) -> str:
    try:
        protocol.public_key_from_peer_id(value)
    except protocol.WrongFieldType as exc:
        raise ValueError(str(exc)) from exc
    return value


def _sort(value: str) -> str:
    if value not in SORTS:
        raise ValueError(f"must be one of {', '.join(SORTS)}")
    return value


PeerId = Annotated[str, AfterValidator(_peer_id)]
Sort = Annotated[str, AfterValidator(_sort)]  # how routing orders providers
Amount = Annotated[int, Field(ge=0, le=10**15)]  # µc; 10**15 is the protocol's bound on any amount
Budget = Annotated[int, Field(ge=1, le=10**15)]  # µc a call or session may lock
MaxTokens = Annotated[int, Field(ge=1, le=1 << 24)]  # the wire's bound on a call's max_tokens
PricePer1K = Annotated[int, Field(ge=0, le=10**12)]  # µc per 1K tokens: the wire's bound on a price


def _max_bytes(limit: int, min_bytes: int = 0) -> AfterValidator:
    def check(value: str) -> str:
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("not valid UTF-8 text (a lone surrogate)") from None
        if not min_bytes <= n <= limit:
            raise ValueError(f"{n} bytes of UTF-8, outside the {min_bytes}..{limit} the wire carries")
        return value

    return AfterValidator(check)


WireText = Annotated[str, _max_bytes(protocol.DEFAULT_MAX_MESSAGE)]  # one message's content: 1 MiB
ModelName = Annotated[str, _max_bytes(128, 1)]  # a model's name on the wire
MAX_MESSAGES = 1024  # the wire's bound on a call's messages


def checked_agent(ops: EscrowOps, agent: str | None) -> str | None:
    """``agent`` (a peer id, a /p2p/ address, or None for this node's own) once the escrow
    client would take it; checked before any I/O.

    Raises:
        InvalidRequest: a malformed name, or None where this node runs no agent (the client's
            ValueError and the protocol's WrongFieldType, translated here).
    """
    try:
        ops.agent_id(agent)
    except (ValueError, protocol.WrongFieldType) as exc:
        raise InvalidRequest(str(exc), "escrow") from exc
    return agent


# ---- streamed responses -----------------------------------------------------------------------

Emit = Callable[[Any], Awaitable[None]]


class RunningCalls:
    """The streamed calls in progress on a face, by id, so a client can cancel one it started
    (``POST /api/v1/calls/{id}/cancel``) and still read, on the same stream, what it cost."""

    def __init__(self) -> None:
        self._scopes: dict[str, trio.CancelScope] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    @contextmanager
    def running(self) -> Iterator[tuple[str, trio.CancelScope]]:
        """A new call's id and the cancel scope ``cancel`` cancels, for the block."""
        call_id, scope = secrets.token_hex(12), trio.CancelScope()
        self._scopes[call_id] = scope
        try:
            yield call_id, scope
        finally:
            self._scopes.pop(call_id, None)

    def cancel(self, call_id: str) -> None:
        """Cancel the running call ``call_id``: it settles what was delivered and its stream ends
        with what that cost.

        Raises:
            NotFound: no such call runs (never started, or over).
        """
        scope = self._scopes.get(call_id)
        if scope is None:
            raise NotFound(f"no call {call_id[:40]!r} is running")
        scope.cancel()


class EventStream:
    """An ASGI response that runs ``produce(emit)`` and sends each emitted document as one event as
    soon as it is emitted (no generator holds a nursery open across a yield). An error after the
    headers went out is sent as a last event, ``error_event(problem_of(exc))``.

    Cancellation: a client that closes the stream (``http.disconnect``) cancels ``produce`` — the
    server would otherwise run it to its end, and a call would be paid for in full with nobody
    reading (a renting call then settles only what was delivered: ``_session_client``). With
    ``calls``, the stream is one of the face's running calls: its first event is
    ``started_event(call_id)``, ``RunningCalls.cancel`` cancels it, and its last event is then
    ``cancelled_event(cost)``, the ``CancelledCall`` the cancelled call reported (None if none
    had started)."""

    media_type: ClassVar[bytes]
    end: ClassVar[bytes] = b""

    def __init__(self, produce: Callable[[Emit], Awaitable[None]], error_event: Callable[[Problem], Any], *,
                 calls: RunningCalls | None = None, started_event: Callable[[str], Any] | None = None,
                 cancelled_event: Callable[[CancelledCall | None], Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.produce, self.error_event = produce, error_event
        self.extra_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.calls, self.started_event, self.cancelled_event = calls, started_event, cancelled_event

    @staticmethod
    def frame(doc: Any) -> bytes:
        raise NotImplementedError

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", self.media_type), (b"cache-control", b"no-cache"),
                                *self.extra_headers]})

        async def emit(doc: Any) -> None:
            await send({"type": "http.response.body", "body": self.frame(doc), "more_body": True})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await self._run(emit)
            nursery.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": self.end, "more_body": False})

    async def _run(self, emit: Emit) -> None:
        with ExitStack() as stack:
            cost = stack.enter_context(cancelled_calls())
            own = trio.CancelScope()
            if self.calls is not None:
                call_id, own = stack.enter_context(self.calls.running())
                if self.started_event is not None:
                    await emit(self.started_event(call_id))
            with own:
                try:
                    await self.produce(emit)
                except Exception as exc:
                    await emit(self.error_event(problem_of(exc)))
            if own.cancelled_caught and self.cancelled_event is not None:
                await emit(self.cancelled_event(cost[-1] if cost else None))


async def _cancel_on_disconnect(receive: Any, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client goes away (the request's body has been read by now)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


class NDJSONStream(EventStream):
    """One JSON document a line (the control face)."""

    media_type = b"application/x-ndjson"

    @staticmethod
    def frame(doc: Any) -> bytes:
        return json.dumps(doc).encode() + b"\n"


class SSEStream(EventStream):
    """Server-sent events ending in ``[DONE]`` (the OpenAI face's streaming)."""

    media_type = b"text/event-stream"
    end = b"data: [DONE]\n\n"

    @staticmethod
    def frame(doc: Any) -> bytes:
        return b"data: " + json.dumps(doc).encode() + b"\n\n"
