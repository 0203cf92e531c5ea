"""One error model: node's errors form the tree node/_errors.py draws, and each reaches an HTTP client
with one status, type and code, the same on the control face and on the OpenAI face — whether it
is raised before the answer starts or in the middle of a stream. A plain ValueError is a bug (500,
nothing of it shown), never the client's 400; a body that fails validation is a 400 naming its field.
"""

from __future__ import annotations

import json
import re
import types

import pytest
from starlette.testclient import TestClient

import node._errors
import protocol
from node._daemon_files import DaemonNotRunning
from node._errors import DemoError, InvalidRequest, LocalError, NodeError, NotAuthorized, NotFound, RemoteError
from node._home import ConfigError, HomeInUse
from node._receipts import ReceiptStoreError
from node.api import build_app
from node.api._http import TABLE, problem_of
from node.api._x402 import PaymentRequired
from node.consumer._delivery import SettlementUnconfirmed
from node.consumer._held_sessions import UnknownSession
from node.consumer._pacing import Busy
from node.consumer._renter import AtCapacity, RentError
from node.consumer._routing import UnsupportedFeature
from node.consumer._session_client import CallRefused, ProviderFailed, ProviderMisbehaved, SessionRejected
from node.escrow._client import EscrowUnreachable
from node.escrow._ops import EscrowRefused
from node.net._streams import StreamClosed, StreamTimeout
from node.provider._queue import QueueFull, QueueTimeout
from node.provider._storefront import OfferUnloadable
from node.provider.backends._base import BackendError, BackendUnsupported
from tests.support import identity

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# (the error, its status, its code): the contract both faces keep
CASES = [
    (InvalidRequest("max_tokens: too big", "max_tokens"), 400, "invalid_field"),
    (UnsupportedFeature("no provider of 'm' supports tools", "tools"), 400, "unsupported_feature"),
    (BackendUnsupported("this backend cannot serve logprobs"), 502, "backend_unsupported"),
    (NotAuthorized("who are you"), 401, "invalid_api_key"),
    (PaymentRequired("this request costs 5 µc", "payment_required", "e30="), 402, "payment_required"),
    (NotFound("no offer for model 'x'"), 404, "not_found"),
    (UnknownSession("no open session ab"), 404, "unknown_session"),
    (protocol.SpendLimitReached("the next call may cost 9 of 5 left"), 402, "spend_limit_reached"),
    (protocol.MessageTooLarge("call_request message is 9 bytes, over 8"), 413, "request_too_large"),
    (EscrowRefused("insufficient_funds", "5 available"), 402, "insufficient_funds"),
    (EscrowRefused("already_claimed", ""), 409, "already_claimed"),
    (EscrowUnreachable("escrow agent 12D3 did not answer"), 503, "escrow_unreachable"),
    (RentError("no provider offers 'x'"), 404, "model_not_found"),
    (RentError("every provider of 'x' failed", [{"provider": "p", "error": "gone"}]), 502, "providers_failed"),
    (SessionRejected("capacity", "4 sessions"), 409, "capacity"),
    (CallRefused("rate_limited", ""), 409, "rate_limited"),
    (ProviderFailed("the provider stopped answering"), 502, "provider_failed"),
    (ProviderMisbehaved(protocol.ReceiptPriceMismatch("cost")), 502, "receipt_price_mismatch"),
    (StreamClosed("end of stream"), 502, "peer_closed"),
    (StreamTimeout("no frame within 30 s"), 504, "peer_timeout"),
    (QueueFull("the queue is full"), 503, "queue_full"),
    (QueueTimeout("waited 30s"), 503, "queue_timeout"),
    (BackendError("upstream answered 500"), 502, "backend_error"),
    (DaemonNotRunning("no running node"), 503, "daemon_not_running"),
    (ConfigError("config.toml: [node] must be a table"), 500, "config_error"),
    (AtCapacity("every provider of 'm' is at capacity", retry_after_s=3), 429, "capacity"),
    (Busy("capacity: 4 sessions run, 128 wait"), 429, "capacity"),
    (SettlementUnconfirmed(protocol.Receipt(
        session_id=b"s" * 16, call_seq=0, model="m", provider=identity("t-p").peer_id,
        consumer=identity("t-c").peer_id, agent=identity("t-a").peer_id, channel_id=b"c" * 16, input_hash=bytes(32),
        output_hash=bytes(32), tokens_in=1, tokens_out=1, finish_reason="stop",
        price=protocol.Price(input_per_1k=1, output_per_1k=1), cost=5, cumulative=5, prev_hash=bytes(32),
        issued_at=1), None, True), 502, "settlement_unconfirmed"),
    (ReceiptStoreError("cannot store a receipt in receipts.db: database or disk is full"), 507, "storage_error"),
    (OfferUnloadable("cannot offer 'm' with backend 'openai:http://127.0.0.1:1/v1': connection refused",
                     upstream=True), 502, "upstream_unavailable"),
    (HomeInUse("another node runs on /tmp/h (pid 7)", 7), 409, "home_in_use"),
    (DemoError("the demo failed while starting the consumer: no room"), 500, "demo_failed"),
]
BUGS = [ValueError("a secret-looking detail"), TypeError("a secret-looking detail"), KeyError("secret"),
        ExceptionGroup("one", [ValueError("a secret-looking detail")])]


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def _app(error: BaseException) -> TestClient:
    async def run(*args, **kwargs):
        if kwargs.get("on_text") is not None:
            await kwargs["on_text"]("partial ")  # the stream has begun when the error comes
        raise error

    service = types.SimpleNamespace(escrow=None, renter=types.SimpleNamespace(run=run))
    return TestClient(build_app(service, TOKEN), backend="trio", base_url="http://127.0.0.1")


def _both(client: TestClient, **extra) -> tuple[tuple, tuple]:
    """(status, type, code, message) as the control face and the OpenAI face answer a call."""
    messages = [{"role": "user", "content": "hi"}]
    c = client.post("/api/v1/run", json={"model": "m", "messages": messages, **extra}, headers=AUTH)
    o = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, **extra}, headers=AUTH)
    ce, oe = c.json()["error"], o.json()["error"]
    assert set(ce) == {"message", "type", "code"} and set(oe) == {"message", "type", "param", "code"}
    return ((c.status_code, ce["type"], ce["code"], ce["message"]),
            (o.status_code, oe["type"], oe["code"], oe["message"]))


def _both_streamed(client: TestClient) -> tuple[tuple, tuple]:
    """The same, for an error after a stream's 200 went out (its last event); the OpenAI event
    carries no status."""
    messages = [{"role": "user", "content": "hi"}]
    c = client.post("/api/v1/run", json={"model": "m", "messages": messages, "stream": True}, headers=AUTH)
    o = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "stream": True}, headers=AUTH)
    assert c.status_code == o.status_code == 200
    last = json.loads(c.text.strip().splitlines()[-1])
    events = [line[6:] for line in o.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    oe = json.loads(events[-2])["error"]
    return ((last["status"], last["error"]["type"], last["error"]["code"], last["error"]["message"]),
            (oe["type"], oe["code"], oe["message"]))


# ---- the tree ------------------------------------------------------------------------------------


def _drawn_tree() -> dict[str, str]:
    """name -> parent name, as node/_errors.py's docstring draws them."""
    lines = node._errors.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("NodeError "))
    parents, stack = {}, []
    for line in lines[start:]:
        if not line.strip():
            break
        name = re.search(r"[A-Z]\w+", line)
        depth = (name.start() - 4) // 4  # the root stands at column 4, each level 4 further
        del stack[depth:]
        parents[name.group()] = stack[-1] if stack else ""
        stack.append(name.group())
    return parents


def test_the_tree_is_the_one_the_docstring_draws():
    drawn = _drawn_tree()
    real = {cls.__name__: cls for cls in _subclasses(NodeError) | {NodeError}}
    assert set(drawn) == set(real), "node/_errors.py's docstring and the classes disagree"
    for name, parent in drawn.items():
        if parent:
            assert real[parent] in real[name].__bases__, f"{name} should derive from {parent}"


def test_every_node_error_is_local_or_remote_never_both():
    for cls in _subclasses(NodeError) - {LocalError, RemoteError}:
        assert issubclass(cls, LocalError) != issubclass(cls, RemoteError), cls.__name__


def test_unknown_session_is_no_longer_a_key_error():
    # it was a KeyError (whose str() quotes the message); nothing caught it as one
    assert not issubclass(UnknownSession, KeyError)
    assert str(UnknownSession("no open session ab")) == "no open session ab"


# ---- the table -----------------------------------------------------------------------------------


def test_every_domain_error_has_a_row_and_a_case():
    rows = {row.error for row in TABLE}
    concrete = _subclasses(NodeError) - {LocalError, RemoteError}
    assert concrete <= rows, f"no row for {sorted(c.__name__ for c in concrete - rows)}"
    assert concrete <= {type(exc) for exc, _, _ in CASES} | {c for c in concrete if c.__subclasses__()}


@pytest.mark.parametrize("error,status,code", CASES, ids=[f"{type(e).__name__}-{s}" for e, s, _ in CASES])
def test_one_status_the_same_on_both_faces(error, status, code):
    problem = problem_of(error)
    assert (problem.status, problem.code) == (status, code)
    if isinstance(error, PaymentRequired):
        assert problem.headers == {"payment-required": error.header}  # x402's requirements travel in it
    if isinstance(error, NotAuthorized | PaymentRequired):
        return  # raised by the faces themselves: see test_the_token_is_checked_alike (and tests/node/test_x402.py)
    control, openai = _both(_app(error))
    assert control == openai == (status, problem.type, code, problem.message)
    assert str(error) in problem.message


@pytest.mark.parametrize("error", [EscrowRefused("insufficient_funds", "5 available"), RentError("nobody"),
                                   SessionRejected("capacity", ""), ProviderFailed("gone")],
                         ids=lambda e: type(e).__name__)
def test_an_error_mid_stream_reads_the_same_on_both_faces(error):
    control, openai = _both_streamed(_app(error))
    problem = problem_of(error)
    assert control == (problem.status, problem.type, problem.code, problem.message)
    assert openai == control[1:]


@pytest.mark.parametrize("bug", BUGS, ids=lambda e: type(e).__name__)
def test_a_plain_value_error_is_a_bug_not_the_callers_400(bug, caplog):
    control, openai = _both(_app(bug))
    assert control == openai
    status, kind, code, message = control
    assert (status, kind, code) == (500, "server_error", "internal_error")
    assert "secret" not in message  # nothing of a bug's detail goes out; the log has it
    assert "a bug reached the HTTP API" in caplog.text and "Traceback" in caplog.text


def test_the_token_is_checked_alike():
    client = _app(ValueError("never reached"))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        c = client.get("/api/v1/status", headers=headers)
        o = client.get("/v1/models", headers=headers)
        assert c.status_code == o.status_code == 401
        assert (c.json()["error"]["type"], c.json()["error"]["code"]) == (o.json()["error"]["type"],
                                                                          o.json()["error"]["code"])


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body,field", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "budget": "5"}, "budget"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "provider": {"sort": "random"}}, "provider.sort"),
])
def test_a_body_that_fails_validation_is_a_400_naming_its_field(body, field):
    client = _app(AssertionError("the call must not be made"))
    o = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert o.status_code == 400 and o.json()["error"]["param"] == field, o.text
    assert o.json()["error"]["type"] == "invalid_request_error"
    c = client.post("/api/v1/run", json=body, headers=AUTH)
    if field not in ("messages.0.role", "provider.sort"):  # the control face: any role; provider is a peer id
        assert c.status_code == 400 and field in c.json()["error"]["message"], c.text


def test_control_bodies_are_strict_and_name_the_field():
    client = _app(AssertionError("the call must not be made"))
    peer = protocol.peer_id_from_public_key(bytes(32))
    for path, body, field in [
        ("/api/v1/escrow/mint", {"to": peer, "amount": True}, "amount"),
        ("/api/v1/escrow/mint", {"to": "not-a-peer", "amount": 1}, "to"),
        ("/api/v1/escrow/refund", {"channel_id": "abc"}, "channel_id"),
        ("/api/v1/escrow/claim", {"receipt": "00"}, "receipt"),
        ("/api/v1/sessions", {"model": "m"}, "budget"),
        ("/api/v1/offers", {"model": "m", "backend": "builtin", "input_price": 1, "output_price": "1"}, "output_price"),
    ]:
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), (path, r.text)


def test_invalid_json_is_invalid_json_on_both_faces():
    client = _app(AssertionError("the call must not be made"))
    for path in ("/api/v1/run", "/v1/chat/completions"):
        r = client.post(path, content=b"{not json", headers=AUTH | {"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_bad_escrow_name_is_the_callers_400_on_both_faces():
    def agent_id(name):  # as EscrowClient.resolve refuses a name
        raise ValueError(f"not a peer address (…/p2p/<peer id>): {name!r}")

    service = types.SimpleNamespace(escrow=types.SimpleNamespace(agent_id=agent_id, balance=None), renter=None)
    client = TestClient(build_app(service, TOKEN), backend="trio", base_url="http://127.0.0.1")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "escrow": "/ip4/nowhere"}
    o = client.post("/v1/chat/completions", json=body, headers=AUTH)
    c = client.post("/api/v1/run", json=body, headers=AUTH)
    assert o.status_code == c.status_code == 400 and o.json()["error"]["param"] == "escrow"
    assert c.json()["error"]["message"] == o.json()["error"]["message"]
    b = client.get("/api/v1/wallet/balance", params={"escrow": "x"}, headers=AUTH)
    assert b.status_code == 400 and "not a peer address" in b.json()["error"]["message"]
