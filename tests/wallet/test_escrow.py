"""The escrow agent: the happy paths, and every refusal with its code and no state change."""

from __future__ import annotations

import dataclasses

import pytest

import protocol
from protocol import (
    EscrowBudgetCreate,
    EscrowBudgetRefund,
    EscrowClaim,
    EscrowMint,
    EscrowOpen,
    EscrowQuery,
    EscrowRefund,
    EscrowTopUp,
    EscrowWithdraw,
)
from tests.support import identity
from tests.wallet.escrow_support import (
    AGENT,
    close_request,
    new_agent,
    ok,
    receipt,
    replace_sig,
    signed,
    snapshot,
)

NOW = 1_000_000
ALICE, BOB, CAROL, FUNDER = identity("alice"), identity("bob"), identity("carol"), identity("funder")


@pytest.fixture
def agent(tmp_path):
    a = new_agent(tmp_path)
    ok(a.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=10_000), NOW))
    ok(a.handle(signed(EscrowMint, AGENT, NOW, to=FUNDER.peer_id, amount=50_000), NOW))
    yield a
    a.check()
    a.ledger.close()


def open_channel(agent, cap=4_000, expires=NOW + 3600, consumer=ALICE, provider=BOB, **kw):
    r = ok(agent.handle(signed(EscrowOpen, consumer, NOW, provider=provider.peer_id, cap=cap, expires_at=expires, **kw), NOW))
    (state,) = r.channels
    protocol.verify(state.channel, "sig", AGENT.public_key)
    return state.channel


def test_mint_open_claim_close_balances_to_the_microcredit(agent):
    ch = open_channel(agent)
    assert agent.balance(ALICE.peer_id) == protocol.Balance(available=6_000, locked=4_000)
    r = ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 1_234)), NOW))
    assert r.paid == 1_234 and r.channels[0].claimed == 1_234
    r = ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 2_000, call_seq=1)), NOW))
    assert r.paid == 766
    final = receipt(ch, ALICE, BOB, 2_500, call_seq=2)
    r = ok(agent.handle(close_request(ch.channel_id, ALICE, BOB, NOW, final), NOW))
    assert r.paid == 500 and r.channels[0].status == "closed"
    assert agent.balance(BOB.peer_id).available == 2_500
    assert agent.balance(ALICE.peer_id) == protocol.Balance(available=7_500, locked=0)
    assert agent.check() == {"minted": 60_000, "withdrawn": 0, "available": 60_000, "locked": 0}


def test_claims_are_per_session_and_the_cap_spans_sessions(agent):
    ch = open_channel(agent, cap=1_000)
    ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 600, session=b"A" * 16)), NOW))
    r = agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 600, session=b"B" * 16)), NOW)
    assert r.error == "over_cap"
    ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 400, session=b"B" * 16)), NOW))
    assert agent.balance(BOB.peer_id).available == 1_000


def test_expiry_refund_topup_withdraw(agent):
    ch = open_channel(agent, cap=3_000, expires=NOW + 60)  # the shortest channel the agent grants
    r = ok(agent.handle(signed(EscrowTopUp, ALICE, NOW, channel_id=ch.channel_id, add=1_000, expires_at=NOW + 70), NOW))
    assert r.channels[0].channel.cap == 4_000 and r.channels[0].channel.expires_at == NOW + 70
    ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 500)), NOW))
    later = NOW + 70
    r = ok(agent.handle(signed(EscrowRefund, ALICE, later, channel_id=ch.channel_id), later))
    assert r.channels[0].status == "refunded"
    assert agent.balance(ALICE.peer_id) == protocol.Balance(available=9_500, locked=0)
    ok(agent.handle(signed(EscrowWithdraw, ALICE, later, amount=9_000), later))
    assert agent.check()["withdrawn"] == 9_000


def test_budgets_whitelist_limit_and_refund(agent):
    r = ok(agent.handle(signed(EscrowBudgetCreate, FUNDER, NOW, amount=20_000, whitelist=(CAROL.peer_id,),
                               per_session_limit=5_000, expires_at=NOW + 3600), NOW))
    bid = r.budget_id
    assert r.budgets[0].remaining == 20_000 and agent.balance(FUNDER.peer_id).locked == 20_000
    ch = open_channel(agent, cap=5_000, consumer=CAROL, budget_id=bid)
    ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, CAROL, BOB, 1_000)), NOW))
    ok(agent.handle(close_request(ch.channel_id, CAROL, BOB, NOW), NOW))  # the rest goes back to the budget
    budget = ok(agent.handle(signed(EscrowQuery, FUNDER, NOW), NOW)).budgets[0]
    assert budget.remaining == 19_000
    r = ok(agent.handle(signed(EscrowBudgetRefund, FUNDER, NOW, budget_id=bid), NOW))
    assert r.budgets[0].status == "refunded"
    assert agent.balance(FUNDER.peer_id) == protocol.Balance(available=49_000, locked=0)
    assert agent.balance(CAROL.peer_id) == protocol.Balance(available=0, locked=0)


def test_sweep_returns_expired_channels_and_budgets(agent):
    ch = open_channel(agent, cap=2_000, expires=NOW + 60)
    bid = ok(agent.handle(signed(EscrowBudgetCreate, FUNDER, NOW, amount=1_000, whitelist=(CAROL.peer_id,),
                                 per_session_limit=500, expires_at=NOW + 60), NOW)).budget_id
    assert agent.sweep(NOW + 59) == 0
    assert agent.sweep(NOW + 60) == 2
    assert agent.sweep(NOW + 61) == 0
    assert agent.balance(ALICE.peer_id).available == 10_000
    assert agent.balance(FUNDER.peer_id).available == 50_000
    state = ok(agent.handle(signed(EscrowQuery, ALICE, NOW + 61, channel_id=ch.channel_id), NOW + 61)).channels[0]
    assert state.status == "refunded" and bid


def test_queries(agent):
    ch = open_channel(agent)
    r = ok(agent.handle(signed(EscrowQuery, BOB, NOW, channel_id=ch.channel_id), NOW))
    assert r.channels[0].channel == ch
    r = ok(agent.handle(signed(EscrowQuery, ALICE, NOW), NOW))
    assert r.balance == protocol.Balance(available=6_000, locked=4_000) and len(r.channels) == 1
    assert agent.handle(signed(EscrowQuery, CAROL, NOW, channel_id=ch.channel_id), NOW).error == "not_channel_party"


def _refusals(agent):
    """(name, request, now, expected code) for every refusal the issue lists, and more."""
    ch = open_channel(agent, cap=1_000)
    ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 300)), NOW))
    bid = ok(agent.handle(signed(EscrowBudgetCreate, FUNDER, NOW, amount=10_000, whitelist=(CAROL.peer_id,),
                                 per_session_limit=2_000, expires_at=NOW + 3600), NOW)).budget_id
    mint = signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=5)
    ok(agent.handle(mint, NOW))
    forged = receipt(ch, ALICE, BOB, 400)
    forged = dataclasses.replace(forged, consumer_sig=protocol.sign(forged, "consumer_sig", CAROL).consumer_sig)
    return [
        ("double claim", signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 300)), NOW, "already_claimed"),
        ("claim over cap", signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 1_001)), NOW, "over_cap"),
        ("forged receipt", signed(EscrowClaim, BOB, NOW, receipt=forged), NOW, "bad_receipt"),
        ("single-signed receipt", signed(EscrowClaim, BOB, NOW,
                                         receipt=receipt(ch, ALICE, BOB, 400, sign_consumer=False)), NOW, "bad_receipt"),
        ("claim by the wrong provider", signed(EscrowClaim, CAROL, NOW, receipt=receipt(ch, ALICE, BOB, 400)), NOW,
         "wrong_provider"),
        ("receipt for another agent", signed(EscrowClaim, BOB, NOW,
                                             receipt=receipt(ch, ALICE, BOB, 400, agent=CAROL.peer_id)), NOW, "wrong_agent"),
        ("claim after expiry", signed(EscrowClaim, BOB, NOW + 3600, receipt=receipt(ch, ALICE, BOB, 400)), NOW + 3600,
         "channel_expired"),
        ("open over balance", signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=10**6, expires_at=NOW + 60), NOW,
         "insufficient_funds"),
        ("open by a non-whitelisted consumer", signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=100,
                                                      expires_at=NOW + 60, budget_id=bid), NOW, "not_whitelisted"),
        ("open over the per-session limit", signed(EscrowOpen, CAROL, NOW, provider=BOB.peer_id, cap=2_001,
                                                   expires_at=NOW + 60, budget_id=bid), NOW, "over_session_limit"),
        ("replayed mint", mint, NOW, "replayed"),
        ("request id reused", signed(EscrowMint, AGENT, NOW, to=BOB.peer_id, amount=5, request_id=mint.request_id),
         NOW, "request_id_reused"),
        ("mint by a non-operator", signed(EscrowMint, ALICE, NOW, to=ALICE.peer_id, amount=5), NOW, "not_operator"),
        ("request signed by another key", replace_sig(signed(EscrowWithdraw, ALICE, NOW, amount=1), CAROL), NOW,
         "bad_signature"),
        ("stale request", signed(EscrowWithdraw, ALICE, NOW - 1000, amount=1), NOW, "stale_request"),
        ("refund before expiry", signed(EscrowRefund, ALICE, NOW, channel_id=ch.channel_id), NOW, "not_expired"),
        ("refund by the provider", signed(EscrowRefund, BOB, NOW, channel_id=ch.channel_id), NOW, "not_channel_party"),
        ("close signed by one party", close_request(ch.channel_id, ALICE, CAROL, NOW), NOW, "bad_signature"),
        ("budget refund by another", signed(EscrowBudgetRefund, ALICE, NOW, budget_id=bid), NOW, "not_budget_funder"),
        ("withdraw over balance", signed(EscrowWithdraw, BOB, NOW, amount=10**6), NOW, "insufficient_funds"),
        ("topup by the provider", signed(EscrowTopUp, BOB, NOW, channel_id=ch.channel_id, add=1,
                                         expires_at=ch.expires_at), NOW, "not_channel_party"),
        ("open with past expiry", signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=1, expires_at=NOW), NOW,
         "bad_expiry"),
        ("unknown channel", signed(EscrowRefund, ALICE, NOW, channel_id=b"?" * 16), NOW, "unknown_channel"),
    ]


def test_every_refusal_has_its_code_and_changes_nothing(agent):
    for name, request, now, code in _refusals(agent):
        before = snapshot(agent)
        response = agent.handle(request, now)
        protocol.verify(response, "sig", AGENT.public_key)
        assert (response.ok, response.error) == (False, code), f"{name}: {response.error} {response.detail}"
        assert snapshot(agent) == before, f"{name} changed state"
        agent.check()


def test_a_refused_request_cannot_be_replayed_later_when_it_would_succeed(agent):
    request = signed(EscrowWithdraw, ALICE, NOW, amount=12_000)
    assert agent.handle(request, NOW).error == "insufficient_funds"
    ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=5_000), NOW))
    again = agent.handle(request, NOW)
    assert again.error == "replayed" and "insufficient_funds" in again.detail
    assert agent.balance(ALICE.peer_id).available == 15_000


def test_ledger_reopens_with_its_schema_and_state(tmp_path):
    from wallet import Ledger

    a = new_agent(tmp_path)
    ok(a.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=7), NOW))
    a.ledger.close()
    ledger = Ledger(tmp_path / "escrow.db")
    assert ledger.schema_version == 1 and ledger.check()["minted"] == 7
    ledger.db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    ledger.close()
    from wallet import LedgerError

    with pytest.raises(LedgerError, match="schema version 99"):
        Ledger(tmp_path / "escrow.db")
