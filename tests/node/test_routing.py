"""Routing strategies and the trust formula."""

from __future__ import annotations

import dataclasses
import random

import pytest

import protocol
from node.consumer._routing import Preferences, rank
from node.consumer._trust import FLOOR, START, ProviderStats, TrustBook
from tests.support import identity

A, B, C = (identity(f"route-{n}").peer_id for n in "abc")
AGENT = identity("route-agent").peer_id


def row(peer, inp, out, agents=(AGENT,)):
    listing = protocol.Listing(provider=peer, addrs=(), seq=1, issued_at=1, expires_at=2, provider_type="self_hosted",
                               models=(), escrow_agents=agents, hardware=protocol.Hardware())
    offer = protocol.ModelOffer(name="m", price=protocol.Price(input_per_1k=inp, output_per_1k=out), max_context=4096)
    return listing, offer


ROWS = [row(A, 100, 900), row(B, 500, 500), row(C, 900, 100)]


def stats_of(table):
    return lambda peer: table.get(peer, ProviderStats(peer))


def order(prefs, table=None, prompt=1000, max_tokens=100, rng=None, rows=ROWS):
    return [c.provider for c in rank(rows, prefs, prompt_tokens=prompt, max_tokens=max_tokens,
                                     stats=stats_of(table or {}), agent_for=lambda lst: lst.escrow_agents[0]
                                     if lst.escrow_agents else None, rng=rng or random.Random(0))]


def test_cheapest_is_the_expected_cost_of_this_request():
    # a long prompt and a short answer favour cheap input; the reverse favours cheap output
    assert order(Preferences(sort="cheapest"), prompt=4000, max_tokens=10)[0] == A
    assert order(Preferences(sort="cheapest"), prompt=10, max_tokens=4000)[0] == C
    # 1000 µc each: a tie on cost falls to trust, then to the peer id
    assert order(Preferences(sort="cheapest"), prompt=1000, max_tokens=1000) == sorted([A, B, C])
    last = sorted([A, B, C])[-1]
    trusted = {last: ProviderStats(last, score=150.0)}
    assert order(Preferences(sort="cheapest"), trusted, prompt=1000, max_tokens=1000)[0] == last


def test_cheapest_ranks_on_the_terms_the_session_pins():
    premium = protocol.Tier(name="premium", price=protocol.Price(input_per_1k=2000, output_per_1k=2000),
                            max_concurrent=1)
    a_listing, a_offer = row(A, 100, 100)  # cheapest as listed, but premium costs 20x
    a_offer = dataclasses.replace(a_offer, tiers=(premium,))
    b_listing, b_offer = row(B, 300, 300)  # half price for a batch of 10
    b_offer = dataclasses.replace(b_offer, tiers=(dataclasses.replace(premium, price=protocol.Price(
        input_per_1k=1000, output_per_1k=1000)),), batch_min_calls=10, batch_discount_permille=500)
    c_listing, c_offer = row(C, 900, 900)  # no premium tier
    rows = [(a_listing, a_offer), (b_listing, b_offer), (c_listing, c_offer)]

    def ranked(**kw):
        return [(c.provider, c.terms.input_per_1k, c.expected_cost)
                for c in rank(rows, Preferences(), prompt_tokens=1000, max_tokens=1000, stats=stats_of({}),
                              agent_for=lambda lst: AGENT, **kw)]

    assert ranked() == [(A, 100, 200), (B, 300, 600), (C, 900, 1800)]
    assert ranked(tier="premium") == [(B, 1000, 2000), (A, 2000, 4000)]  # C lacks the tier
    assert ranked(tier="premium", batch_calls=10) == [(B, 500, 1000), (A, 2000, 4000)]
    contract = protocol.Price(input_per_1k=1, output_per_1k=1)  # replaces tier and listed price alike
    assert ranked(tier="premium", contract_for=lambda peer, model: contract if peer == A else None) == [
        (A, 1, 2), (B, 1000, 2000)]
    assert ranked(contract_for=lambda peer, model: contract if peer == C else None)[0] == (C, 1, 2)
    # the price caps apply to those terms too
    assert [c.provider for c in rank(rows, Preferences(max_input_price=500), prompt_tokens=1000, max_tokens=1000,
                                     stats=stats_of({}), agent_for=lambda lst: AGENT, tier="premium",
                                     batch_calls=10)] == [B]


def test_fastest_uses_measured_latency_and_explores_the_unmeasured():
    table = {A: ProviderStats(A, ttft_s=0.5, tps=10.0), B: ProviderStats(B, ttft_s=0.1, tps=100.0)}
    never = Preferences(sort="fastest", explore=0.0)
    assert order(never, table) == [B, A, C]  # B: 0.1 + 1 s, A: 0.5 + 10 s, C unmeasured last
    always = Preferences(sort="fastest", explore=1.0)
    assert order(always, table)[0] == C
    picks = [order(Preferences(sort="fastest", explore=0.1), table, rng=random.Random(i))[0] for i in range(200)]
    assert 5 <= picks.count(C) <= 40 and picks.count(B) >= 150


def test_best_trust_and_the_floor():
    table = {A: ProviderStats(A, score=120.0), B: ProviderStats(B, score=40.0), C: ProviderStats(C, score=100.0)}
    assert order(Preferences(sort="best_trust"), table) == [A, C]  # B is under the floor
    assert order(Preferences(sort="best_trust", trust_floor=0.0), table) == [A, C, B]


def test_filters_only_ignore_price_escrow_and_fallbacks():
    assert order(Preferences(only=(B,))) == [B]
    assert order(Preferences(ignore=(A,))) == [B, C]
    assert order(Preferences(max_input_price=500)) == [A, B]
    assert order(Preferences(max_output_price=500), prompt=10, max_tokens=4000) == [C, B]
    rows = ROWS[:2] + [row(C, 1, 1, agents=())]  # C accepts no agent this node can use
    assert order(Preferences(), rows=rows, prompt=10, max_tokens=4000) == [B, A]
    assert order(Preferences(allow_fallbacks=False)) == [A]
    with pytest.raises(ValueError):
        Preferences(sort="random")


def test_trust_formula(tmp_path):
    book = TrustBook(tmp_path / "trust.db")
    assert book.get(A).score == START
    book.completed(A, ttft_s=0.1, tokens=50, duration_s=1.1)  # +1
    assert book.get(A).score == START + 1 and book.get(A).calls == 1
    book.completed(A, ttft_s=6.0, tokens=50, duration_s=7.0)  # slow first token: +1 - 2
    assert book.get(A).score == START
    s = book.get(A)
    assert s.ttft_s == pytest.approx(0.3 * 6.0 + 0.7 * 0.1)
    book.refused(A, "unknown_model")  # a stale view of its listing: no change
    book.refused(A, "price_changed")  # -2: it listed a price it does not sell at (a Sybil's cheap trick)
    book.refused(A, "capacity")  # -2
    book.failed(A)  # -10
    book.violated(A)  # -50
    assert book.get(A).score == START - 64 and book.get(A).failures == 3 and book.get(A).violations == 1
    assert book.get(A).score < FLOOR + 0  # now excluded by the default floor
    book.observe_alive([B], 1000)
    book.observe_alive([B], 1120)  # 2 minutes of continuous listing: +0.5 * 120/3600
    assert book.get(B).score == pytest.approx(START + 0.5 * 120 / 3600)
    book.observe_alive([B], 10_000)  # a gap: no credit for the unseen time
    assert book.get(B).score == pytest.approx(START + 0.5 * 120 / 3600)
    for _ in range(300):
        book.completed(C, 0.1, 10, 0.2)
    assert book.get(C).score == 200.0  # bounded
    for _ in range(10):
        book.violated(C)
    assert book.get(C).score == 0.0
    book.close()
    assert TrustBook(tmp_path / "trust.db").get(A).violations == 1  # persistent
    assert dataclasses.asdict(ProviderStats(B))["score"] == START
