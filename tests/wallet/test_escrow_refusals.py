"""Refused escrow requests are remembered in memory while fresh, counted and rate limited, never
stored one by one (issue 11, finding 12), and still can never be applied later: not within their
window, not after a restart. Channels shorter than the agent's minimum life are refused (finding 2).
"""

from __future__ import annotations

import contextlib
import os

import pytest

import protocol
from protocol import EscrowClaim, EscrowMint, EscrowOpen, EscrowQuery, EscrowTopUp, EscrowWithdraw
from tests.support import identity
from tests.wallet.escrow_support import AGENT, close_request, ok, receipt, replace_sig, signed, snapshot
from wallet import EscrowAgent, Ledger, RefusalBook

NOW = 1_000_000
ALICE, BOB, MALLORY, CAROL = identity("ref-alice"), identity("ref-bob"), identity("ref-mallory"), identity("ref-carol")


@contextlib.contextmanager
def open_agent(path, **kw):
    agent = EscrowAgent(Ledger(path), AGENT, **kw)
    try:
        yield agent
    finally:
        agent.ledger.close()


@pytest.fixture
def agent(tmp_path):
    with open_agent(tmp_path / "escrow.db") as a:
        yield a
        a.check()


def ops_count(agent) -> int:
    with agent.ledger.reading() as db:
        return db.execute("SELECT COUNT(*) FROM ops").fetchone()[0]


def main_file_size(agent) -> int:
    """The ledger file's size once everything in its write-ahead log is in it."""
    agent.ledger.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(agent.ledger.path)


class NoLedger:
    """Stands in for the ledger where a request must be answered without touching it."""

    def __getattr__(self, name):
        raise AssertionError(f"the ledger was used ({name})")


def test_a_flood_of_refused_requests_from_one_identity_costs_no_disk_and_honest_parties_are_served(agent):
    ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=10_000), NOW))
    size, ops = main_file_size(agent), ops_count(agent)
    answers: dict[str, int] = {}
    channel = None
    for i in range(3_000):  # 5 a second for 10 minutes, each validly signed, each refused
        now = NOW + i // 5
        r = agent.handle(signed(EscrowWithdraw, MALLORY, now, amount=1), now)
        answers[r.error] = answers.get(r.error, 0) + 1
        protocol.verify(r, "sig", AGENT.public_key)
        if i == 1_000:  # meanwhile an honest consumer and provider go about their business
            channel = ok(agent.handle(signed(EscrowOpen, ALICE, now, provider=BOB.peer_id, cap=4_000,
                                             expires_at=now + 3600), now)).channels[0].channel
        if i == 2_000:
            assert ok(agent.handle(signed(EscrowClaim, BOB, now, receipt=receipt(channel, ALICE, BOB, 1_500)), now)).paid == 1_500
            closed = ok(agent.handle(close_request(channel.channel_id, ALICE, BOB, now), now))
            assert closed.channels[0].status == "closed"
    refused = answers["insufficient_funds"]
    assert answers == {"insufficient_funds": refused, "rate_limited": 3_000 - refused}
    # 30 a minute at most (the rate limit), fewer once 64 are still fresh (the per-party cap)
    assert 64 <= refused <= 30 * 10
    assert agent.refusals.counts["refused"] == refused and agent.refusals.counts["limited"] == 3_000 - refused
    assert len(agent.refusals) <= 64
    # nothing was stored per refusal: only the three honest requests are new records, and the file
    # did not grow (the refusal horizon is one row of meta, rewritten in place)
    assert ops_count(agent) == ops + 3
    assert main_file_size(agent) == size
    assert agent.balance(ALICE.peer_id) == protocol.Balance(available=8_500, locked=0)
    assert agent.balance(BOB.peer_id) == protocol.Balance(available=1_500, locked=0)
    assert agent.balance(MALLORY.peer_id) == protocol.Balance(available=0, locked=0)
    assert agent.check() == {"minted": 10_000, "withdrawn": 0, "available": 10_000, "locked": 0}


def test_a_refused_request_replayed_within_its_window_gets_its_first_refusal(agent):
    request = signed(EscrowWithdraw, ALICE, NOW, amount=7_000)
    first = agent.handle(request, NOW)
    assert first.error == "insufficient_funds"
    ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=9_000), NOW))  # now it would succeed
    before = snapshot(agent)
    last_fresh = NOW + agent.max_skew_s
    again = agent.handle(request, last_fresh)
    protocol.verify(again, "sig", AGENT.public_key)
    assert (again.ok, again.error, again.detail) == (False, "replayed", "already answered (insufficient_funds); "
                                                                         "nothing changed")
    assert again.request_id == request.request_id and again.issued_at == last_fresh
    reused = agent.handle(signed(EscrowWithdraw, ALICE, NOW, amount=1, request_id=request.request_id), NOW)
    assert reused.error == "request_id_reused"
    assert agent.handle(request, last_fresh + 1).error == "stale_request"
    assert agent.refusals.recall(request.request_id, last_fresh + 1) is None  # forgotten: the table is empty
    assert len(agent.refusals) == 0
    assert snapshot(agent) == before
    assert agent.balance(ALICE.peer_id).available == 9_000


def test_the_rate_limit_answers_without_the_ledger_and_only_the_party_refused(agent):
    ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=100), NOW))
    refused = [signed(EscrowWithdraw, MALLORY, NOW, amount=1) for _ in range(30)]
    for request in refused:
        assert agent.handle(request, NOW).error == "insufficient_funds"
    ledger, agent.ledger = agent.ledger, NoLedger()
    try:
        limited = agent.handle(signed(EscrowQuery, MALLORY, NOW + 59), NOW + 59)
        assert (limited.ok, limited.error) == (False, "rate_limited")
        protocol.verify(limited, "sig", AGENT.public_key)
        # a replay of a remembered refusal is still answered, from memory
        assert agent.handle(refused[0], NOW + 59).error == "replayed"
    finally:
        agent.ledger = ledger
    assert ok(agent.handle(signed(EscrowWithdraw, ALICE, NOW + 59, amount=40), NOW + 59)).paid == 40
    assert ok(agent.handle(signed(EscrowQuery, MALLORY, NOW + 60), NOW + 60)).balance.available == 0  # a minute on
    assert agent.balance(ALICE.peer_id).available == 60


def test_refusals_are_counted_per_remote_peer_too_even_unsigned_ones(agent):
    for _ in range(30):  # forged: counted against the peer that carried them, not the party they name
        forged = replace_sig(signed(EscrowWithdraw, ALICE, NOW, amount=1), CAROL)
        assert agent.handle(forged, NOW, source=CAROL.peer_id).error == "bad_signature"
    assert agent.handle(signed(EscrowQuery, CAROL, NOW), NOW, source=CAROL.peer_id).error == "rate_limited"
    assert agent.screen(signed(EscrowQuery, BOB, NOW), NOW, source=CAROL.peer_id).error == "rate_limited"
    ok(agent.handle(signed(EscrowQuery, ALICE, NOW), NOW, source=BOB.peer_id))  # the party named is not blamed


def test_a_party_holding_its_cap_of_fresh_refusals_is_limited(tmp_path):
    with open_agent(tmp_path / "escrow.db", refusals=RefusalBook(max_per_key=3, rate_limit=1_000)) as agent:
        for n in range(3):
            assert agent.handle(signed(EscrowWithdraw, MALLORY, NOW + n, amount=1), NOW + n).error == "insufficient_funds"
        assert agent.handle(signed(EscrowWithdraw, MALLORY, NOW + 3, amount=1), NOW + 3).error == "rate_limited"
        later = NOW + agent.max_skew_s + 1  # the first refusal is stale now, and forgotten: room for one
        assert agent.handle(signed(EscrowWithdraw, MALLORY, later, amount=1), later).error == "insufficient_funds"


def test_when_the_table_is_full_a_refusal_is_kept_durably_instead(tmp_path):
    with open_agent(tmp_path / "escrow.db", refusals=RefusalBook(max_entries=2)) as agent:
        requests = [signed(EscrowWithdraw, who, NOW, amount=1) for who in (ALICE, BOB, CAROL)]
        for request in requests:
            assert agent.handle(request, NOW).error == "insufficient_funds"
        assert len(agent.refusals) == 2 and agent.refusals.counts["overflowed"] == 1
        assert ops_count(agent) == 1  # the one the table could not take
    with open_agent(tmp_path / "escrow.db") as agent:  # and it outlives the process
        ok(agent.handle(signed(EscrowMint, AGENT, NOW + 1, to=CAROL.peer_id, amount=5), NOW + 1))
        again = agent.handle(requests[2], NOW + 1)
        assert (again.error, again.detail) == ("replayed", "already answered (insufficient_funds); nothing changed")
        assert agent.balance(CAROL.peer_id).available == 5


def test_after_a_restart_a_refused_request_is_refused_not_applied(tmp_path):
    path = tmp_path / "escrow.db"
    with open_agent(path) as agent:
        ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1_000), NOW))
        applied = signed(EscrowWithdraw, ALICE, NOW, amount=100)
        ok(agent.handle(applied, NOW))
        refused = signed(EscrowWithdraw, ALICE, NOW + 5, amount=5_000)
        ahead = signed(EscrowWithdraw, ALICE, NOW + 200, amount=5_000)  # dated ahead of the clock, still fresh
        assert agent.handle(refused, NOW + 5).error == "insufficient_funds"
        assert agent.handle(ahead, NOW + 5).error == "insufficient_funds"
        ok(agent.handle(signed(EscrowMint, AGENT, NOW + 5, to=ALICE.peer_id, amount=10_000), NOW + 5))
    with open_agent(path) as agent:  # a new process: its table is empty; both would succeed now
        before = snapshot(agent)
        r = agent.handle(refused, NOW + 10)
        protocol.verify(r, "sig", AGENT.public_key)
        assert (r.ok, r.error) == (False, "stale_request") and "sign it again" in r.detail
        # one dated ahead of the clock was stored durably, not remembered: it answers as it did
        r = agent.handle(ahead, NOW + 10)
        assert (r.ok, r.error) == (False, "replayed") and "insufficient_funds" in r.detail
        assert agent.handle(applied, NOW + 10).error == "replayed"  # what was applied still answers so
        assert snapshot(agent) == before
        assert agent.balance(ALICE.peer_id).available == 10_900
        fresh = signed(EscrowWithdraw, ALICE, NOW + 10, amount=5_000)  # signed again, after the last refusal
        assert ok(agent.handle(fresh, NOW + 10)).paid == 5_000
        assert agent.balance(ALICE.peer_id).available == 5_900
        agent.check()


def test_a_refusal_dated_ahead_cannot_make_every_request_after_a_restart_stale(tmp_path):
    path = tmp_path / "escrow.db"
    with open_agent(path) as agent:
        ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1_000), NOW))
        # the attack: a throwaway identity's refusal dated as far ahead as freshness allows
        assert agent.handle(signed(EscrowWithdraw, MALLORY, NOW + 300, amount=1), NOW).error == "insufficient_funds"
    with open_agent(path) as agent:  # restarted at once: honest requests signed now still apply
        assert ok(agent.handle(signed(EscrowWithdraw, ALICE, NOW + 1, amount=100), NOW + 1)).paid == 100
        assert agent.balance(ALICE.peer_id).available == 900
        agent.check()


def test_a_restart_without_recent_refusals_refuses_no_earlier_request(tmp_path):
    """The retry after a crash (the same signed bytes again) still applies when nothing was refused."""
    path = tmp_path / "escrow.db"
    with open_agent(path) as agent:
        ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1_000), NOW))
    pending = signed(EscrowWithdraw, ALICE, NOW, amount=300)  # signed before the restart, never seen
    with open_agent(path) as agent:
        assert ok(agent.handle(pending, NOW + 30)).paid == 300
        assert agent.handle(pending, NOW + 31).error == "replayed"
        assert agent.balance(ALICE.peer_id).available == 700


def test_a_channel_shorter_than_the_minimum_life_is_refused(agent):
    ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=10_000), NOW))
    before = snapshot(agent)
    for life in (1, 59):
        r = agent.handle(signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=1_000, expires_at=NOW + life), NOW)
        assert (r.ok, r.error) == (False, "bad_expiry") and "at least 60s" in r.detail
    assert snapshot(agent) == before
    assert agent.balance(ALICE.peer_id) == protocol.Balance(available=10_000, locked=0)
    ch = ok(agent.handle(signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=1_000, expires_at=NOW + 60),
                         NOW)).channels[0].channel
    # 30 s on, a top-up must leave the channel 60 s again, whether it adds money or not
    later = NOW + 30
    for add, expires in ((500, ch.expires_at), (0, later + 59)):
        r = agent.handle(signed(EscrowTopUp, ALICE, later, channel_id=ch.channel_id, add=add, expires_at=expires), later)
        assert r.error == "bad_expiry"
    assert agent.balance(ALICE.peer_id) == protocol.Balance(available=9_000, locked=1_000)
    r = ok(agent.handle(signed(EscrowTopUp, ALICE, later, channel_id=ch.channel_id, add=500, expires_at=later + 60),
                        later))
    assert r.channels[0].channel.expires_at == later + 60
    assert agent.balance(ALICE.peer_id) == protocol.Balance(available=8_500, locked=1_500)


def test_the_minimum_life_is_the_agents_to_choose(tmp_path):
    with open_agent(tmp_path / "escrow.db", min_lifetime_s=0) as agent:
        ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=10), NOW))
        ok(agent.handle(signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=10, expires_at=NOW + 1), NOW))
