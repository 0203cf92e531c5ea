"""Admission is pure: every rule for opening a session or starting a call, without a network."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

import protocol
from node._contracts import Contract
from node.provider import Offer
from node.provider._admission import Admission, RateLimiter
from tests.support import AGENT, CONSUMER, MALLORY, PROVIDER, channel

WHEN = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
PRICE = protocol.Price(input_per_1k=1000, output_per_1k=2000)


def offer(**kw) -> Offer:
    return Offer(**{"model": "m", "backend": "builtin", "input_price": 1000, "output_price": 2000,
                    "max_concurrent": 2, **kw})


def open_msg(consumer=CONSUMER, price=PRICE, tier="", spend_limit=1000, cap=10_000) -> protocol.Open:
    return protocol.Open(session_id=b"s" * 16, consumer=consumer.peer_id, provider=PROVIDER.peer_id, model="m",
                         listing_seq=1, price=price, channel=channel(cap, consumer=consumer), spend_limit=spend_limit,
                         issued_at=100, tier=tier)


def check(adm: Admission, msg=None, the_offer=None, *, terms=PRICE, available=True, agents=None, contracts=(),
          now=0.0):
    the_offer = the_offer or offer()
    return adm.check_open(msg or open_msg(), the_offer, the_offer.to_model_offer(), terms, available=available,
                          accepted_agents={AGENT.peer_id} if agents is None else agents, contracts=contracts,
                          when=WHEN, now=now)


def test_an_ordinary_open_is_admitted():
    assert check(Admission()) is None


@pytest.mark.parametrize("change,reason", [
    (dict(available=False), "unavailable"),
    (dict(terms=dataclasses.replace(PRICE, input_per_1k=1001)), "price_changed"),
    (dict(agents=set()), "escrow_not_accepted"),
])
def test_each_open_rule_refuses_with_its_reason(change, reason):
    assert check(Admission(), **change).reason == reason


def test_an_unknown_model_is_refused():
    adm = Admission()
    assert adm.check_open(open_msg(), None, None, None, available=True, accepted_agents=set(), contracts=(),
                          when=WHEN, now=0).reason == "unknown_model"


def test_seats_are_counted_and_released():
    adm = Admission()
    with adm.seat(CONSUMER.peer_id, "m", ""), adm.seat(MALLORY.peer_id, "m", ""):
        assert check(adm).reason == "capacity"
        assert adm.utilization("m", 2) == 1.0
    assert check(adm) is None and adm.utilization("m", 2) == 0.0
    assert not adm.active and not adm.active_by_client and not adm.active_tiers  # nothing left behind


def test_a_tier_has_its_own_cap():
    tiered = offer(max_concurrent=8, tiers=({"name": "premium", "input_price": 1000, "output_price": 2000,
                                            "max_concurrent": 1, "priority": 3},))
    adm = Admission()
    with adm.seat(MALLORY.peer_id, "m", "premium"):
        assert check(adm, open_msg(tier="premium"), tiered).reason == "capacity"
        assert check(adm, open_msg(), tiered) is None  # the base tier still has seats


def test_contract_seats_are_held_for_their_client():
    contract = Contract(CONSUMER.peer_id, "m", PRICE, WHEN + dt.timedelta(days=1), reserved_slots=1)
    adm = Admission()
    with adm.seat(MALLORY.peer_id, "m", ""):
        assert check(adm, open_msg(consumer=MALLORY), contracts=(contract,)).reason == "capacity"  # 1 reserved
        assert check(adm, open_msg(consumer=CONSUMER), contracts=(contract,)) is None  # the client may use it
    expired = dataclasses.replace(contract, until=WHEN)
    with adm.seat(MALLORY.peer_id, "m", ""):
        assert check(adm, open_msg(consumer=MALLORY), contracts=(expired,)) is None


def test_the_rate_limit_slides_over_a_minute():
    limited = offer(rate_limit=2)
    adm = Admission()
    assert check(adm, the_offer=limited, now=0) is None
    assert check(adm, the_offer=limited, now=1) is None
    refused = check(adm, the_offer=limited, now=2)
    assert refused.reason == "rate_limited" and refused.retry_after_s == 59
    assert check(adm, the_offer=limited, now=60.5) is None  # the first request left the window
    assert RateLimiter().allow("x", 0, 0) == 0.0  # 0: no limit


def test_calls_are_limited_by_rate_and_context():
    adm = Admission()
    request = protocol.Request(session_id=b"s" * 16, call_seq=0, messages=(), max_tokens=5000)
    assert adm.check_call(CONSUMER.peer_id, offer(), request, 0).reason == "max_tokens_too_large"
    assert adm.check_call(CONSUMER.peer_id, offer(), dataclasses.replace(request, max_tokens=10), 0) is None
    small = dataclasses.replace(request, max_tokens=10)
    assert adm.check_call(MALLORY.peer_id, offer(rate_limit=1), small, 0) is None
    assert adm.check_call(MALLORY.peer_id, offer(rate_limit=1), small, 1).reason == "rate_limited"


def _answer(status="open", claimed=0, cap=10_000, expires_at=10_000, ok=True):
    state = protocol.ChannelState(channel=channel(cap, expires_at=expires_at), status=status, claimed=claimed)
    return protocol.EscrowResponse(request_id=b"r" * 16, agent=AGENT.peer_id, ok=ok, error="" if ok else "unknown",
                                   detail="", channels=(state,) if ok else (), issued_at=100)


@pytest.mark.parametrize("answer,fragment", [
    (_answer(ok=False), "the agent says"),
    (_answer(status="closed"), "is closed"),
    (_answer(expires_at=50), "has expired"),
    (_answer(claimed=9_500), "holds 500"),
])
def test_the_channel_must_be_open_and_hold_the_spend_cap(answer, fragment):
    refusal = Admission.check_channel(open_msg(spend_limit=1000), answer, now=100)
    assert refusal.reason == "escrow_invalid" and fragment in refusal.detail


def test_a_good_channel_passes():
    assert Admission.check_channel(open_msg(spend_limit=1000), _answer(), now=100) is None
