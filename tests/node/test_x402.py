"""x402 on the OpenAI face: a plain HTTP client that holds only a private key pays for one chat
completion on the embedded chain, using the x402 SDK's own client to sign; without payment it gets
402 with valid requirements; a reused, underpaid or forged payment is refused and settles nothing;
a call that fails after its payment settled is refunded. The renter is scripted (no swarm): what is
tested is the payment, on a real EVM."""

from __future__ import annotations

import types

import pytest
from eth_account import Account
from starlette.testclient import TestClient
from x402 import x402ClientSync
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.exact import ExactEvmScheme

import protocol
from node.api import build_app
from node.chain import EMBEDDED, open_chain_link, parse_chain_spec
from node.consumer import Attempt, Completion, Delta, RentError
from node.consumer._delivery import SettlementUnconfirmed
from tests.support import identity
from tests.wallet.chain_rig import key

TOKEN = "t0ken"
ASK = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
QUOTE = 1_234


def _receipt(cost=7):
    return protocol.Receipt(
        session_id=b"s" * 16, call_seq=0, model="m", provider=identity("x402-p").peer_id,
        consumer=identity("x402-c").peer_id, agent=identity("x402-a").peer_id, channel_id=b"c" * 16,
        input_hash=bytes(32), output_hash=bytes(32), tokens_in=3, tokens_out=2, finish_reason="stop",
        price=protocol.Price(input_per_1k=1, output_per_1k=1), cost=cost, cumulative=cost, prev_hash=bytes(32),
        issued_at=1)


@pytest.fixture(scope="module")
def rig():
    import trio

    node_id = identity("x402-gateway")
    link = trio.run(open_chain_link, parse_chain_spec(EMBEDDED), node_id)
    payer = Account.from_key(key("x402-payer"))
    link.chain.mint(node_id.eth_key, payer.address, 1_000_000)
    calls, fail, quotes = [], [], []

    async def quote(model, messages, **kwargs):
        return quotes[-1] if quotes else QUOTE

    async def run(model, messages, **kwargs):
        calls.append(kwargs)
        if fail:
            raise fail[-1]
        if kwargs.get("on_delta") is not None:
            await kwargs["on_delta"](Delta("hel"))
            await kwargs["on_delta"](Delta("lo"))
        return Completion(id="ab", provider="p", model=model, receipt=_receipt(), latency_ms=1, text="hello",
                          finish_reason="stop")

    service = types.SimpleNamespace(escrow=None, chain=link, wall_clock=lambda: link.chain.now(),
                                    renter=types.SimpleNamespace(run=run, quote=quote))
    client = TestClient(build_app(service, TOKEN, x402=True), backend="trio", base_url="http://127.0.0.1")
    return types.SimpleNamespace(client=client, link=link, payer=payer, calls=calls, fail=fail, quotes=quotes)


def _pay(rig, required_header: str, amount: str | None = None) -> str:
    """What the x402 SDK's client sends for the 402's requirements (optionally for another amount)."""
    required = decode_payment_required_header(required_header)
    if amount is not None:
        required.accepts[0] = required.accepts[0].model_copy(update={"amount": amount})
    client = x402ClientSync().register(rig.link.network, ExactEvmScheme(rig.payer))
    # the SDK pays only assets it knows unless told: this client knows the test stablecoin
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})
    return encode_payment_signature_header(client.create_payment_payload(required))


def _balances(rig) -> tuple[int, int]:
    c = rig.link.chain
    return c.token_balance(rig.payer.address), c.token_balance(rig.link.address)


def test_without_payment_the_answer_is_402_with_valid_requirements(rig):
    r = rig.client.post("/v1/chat/completions", json=ASK)
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "payment_required" and "1234 µc" in r.json()["error"]["message"]
    required = decode_payment_required_header(r.headers["payment-required"])
    assert required.x402_version == 2 and len(required.accepts) == 1
    a = required.accepts[0]
    d = rig.link.chain.deployment
    assert (a.scheme, a.network, a.asset, a.amount, a.pay_to) == (
        "exact", f"eip155:{d.chain_id}", d.token, str(QUOTE), rig.link.address)
    assert a.extra == {"name": rig.link.token_name, "version": "2"}
    assert rig.client.post("/v1/chat/completions", json=ASK, headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_client_with_only_a_key_pays_for_one_completion_and_cannot_pay_twice_with_it(rig):
    before_payer, before_node = _balances(rig)
    header = _pay(rig, rig.client.post("/v1/chat/completions", json=ASK).headers["payment-required"])
    r = rig.client.post("/v1/chat/completions", json=ASK, headers={"PAYMENT-SIGNATURE": header})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello"
    settled = decode_payment_response_header(r.headers["payment-response"])
    assert settled.success and settled.transaction.startswith("0x") and settled.payer == rig.payer.address
    assert _balances(rig) == (before_payer - QUOTE, before_node + QUOTE)
    assert rig.calls[-1]["budget"] == QUOTE  # the swarm call may spend no more than was paid
    again = rig.client.post("/v1/chat/completions", json=ASK, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 402 and again.json()["error"]["code"] == "nonce_used", again.text
    assert _balances(rig) == (before_payer - QUOTE, before_node + QUOTE)


def test_an_underpaid_forged_or_malformed_payment_is_refused_and_settles_nothing(rig):
    required = rig.client.post("/v1/chat/completions", json=ASK).headers["payment-required"]
    before = _balances(rig)
    under = rig.client.post("/v1/chat/completions", json=ASK,
                            headers={"PAYMENT-SIGNATURE": _pay(rig, required, amount=str(QUOTE - 1))})
    assert under.status_code == 402 and under.json()["error"]["code"] == "insufficient_amount", under.text
    broke = types.SimpleNamespace(**{**vars(rig), "payer": Account.from_key(key("x402-broke"))})
    poor = rig.client.post("/v1/chat/completions", json=ASK, headers={"PAYMENT-SIGNATURE": _pay(broke, required)})
    assert poor.status_code == 402 and poor.json()["error"]["code"] == "insufficient_funds", poor.text
    for junk in ("not base64!", "e30="):  # garbage, and {} (no payload)
        bad = rig.client.post("/v1/chat/completions", json=ASK, headers={"PAYMENT-SIGNATURE": junk})
        assert bad.status_code == 402 and bad.json()["error"]["code"] == "invalid_payment", bad.text
    import base64
    import json

    doc = json.loads(base64.b64decode(_pay(rig, required)))
    doc["payload"]["authorization"]["value"] = str(QUOTE * 10)  # signed for QUOTE: the signature no longer holds
    forged = base64.b64encode(json.dumps(doc).encode()).decode()
    r = rig.client.post("/v1/chat/completions", json=ASK, headers={"PAYMENT-SIGNATURE": forged})
    assert r.status_code == 402 and r.json()["error"]["code"] == "invalid_signature", r.text
    assert _balances(rig) == before


def test_a_call_that_fails_after_payment_is_refunded(rig):
    before = _balances(rig)
    header = _pay(rig, rig.client.post("/v1/chat/completions", json=ASK).headers["payment-required"])
    rig.fail.append(RentError("every provider failed", attempts=(Attempt("p", "went away", "provider"),)))
    try:
        r = rig.client.post("/v1/chat/completions", json=ASK, headers={"PAYMENT-SIGNATURE": header})
    finally:
        rig.fail.clear()
    assert r.status_code == 502, r.text
    assert _balances(rig) == before  # paid, then sent back


def test_a_call_answered_and_counter_signed_is_never_refunded(rig):
    """A provider that withholds its acknowledgement still holds a counter-signed receipt it can
    claim: refunding then would let a colluding provider be paid by the node for free calls."""
    before_payer, before_node = _balances(rig)
    header = _pay(rig, rig.client.post("/v1/chat/completions", json=ASK).headers["payment-required"])
    rig.fail.append(SettlementUnconfirmed(_receipt(), None, queued=True))
    try:
        r = rig.client.post("/v1/chat/completions", json=ASK, headers={"PAYMENT-SIGNATURE": header})
    finally:
        rig.fail.clear()
    assert r.status_code == 502 and r.json()["error"]["code"] == "settlement_unconfirmed", r.text
    assert _balances(rig) == (before_payer - QUOTE, before_node + QUOTE)


def test_a_budget_field_a_free_call_and_a_wrong_token_are_answered_before_any_payment(rig):
    before = _balances(rig)
    r = rig.client.post("/v1/chat/completions", json={**ASK, "budget": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "budget", r.text
    rig.quotes.append(0)  # free providers: nothing to pay, nothing the node pays
    try:
        free = rig.client.post("/v1/chat/completions", json=ASK)
    finally:
        rig.quotes.clear()
    assert free.status_code == 200 and "payment-response" not in free.headers, free.text
    bad = rig.client.post("/v1/chat/completions", content=b"{not json", headers={"Authorization": "Bearer nope",
                                                                                "content-type": "application/json"})
    assert bad.status_code == 401, bad.text  # the token first, as on every other route
    assert _balances(rig) == before


def test_a_streamed_completion_is_paid_the_same_way(rig):
    before_payer, before_node = _balances(rig)
    ask = {**ASK, "stream": True}
    header = _pay(rig, rig.client.post("/v1/chat/completions", json=ask).headers["payment-required"])
    r = rig.client.post("/v1/chat/completions", json=ask, headers={"PAYMENT-SIGNATURE": header})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    assert decode_payment_response_header(r.headers["payment-response"]).success
    assert "hel" in r.text and r.text.rstrip().endswith("data: [DONE]")
    assert _balances(rig) == (before_payer - QUOTE, before_node + QUOTE)


def test_the_token_still_works_and_a_wrong_one_is_refused_not_asked_to_pay(rig):
    before = _balances(rig)
    ok = rig.client.post("/v1/chat/completions", json=ASK, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and "payment-response" not in ok.headers
    assert rig.calls[-1]["budget"] is None  # the node's own call: no x402 budget
    wrong = rig.client.post("/v1/chat/completions", json=ASK, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "payment-required" not in wrong.headers
    assert _balances(rig) == before
