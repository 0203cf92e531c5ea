"""Issue #12, finding 5 (healthy providers blacklisted for days): trust is charged only for what
the provider did. An escrow agent that is down, our own channel expiring and capacity refusals in
a burst cost it nothing lasting; a floor never excludes the only provider of a model for good
(probation, with one probe at a time); a provider that sends bad receipts is still excluded."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import protocol
from node._receipts import ReceiptStore
from node.consumer import Busy, Pacing, Preferences, Renter, TrustBook
from node.consumer._failures import (
    CAPACITY,
    LISTING,
    OURS,
    PROVIDER,
    STALE,
    THIRD_PARTY,
    VIOLATION,
    CallRefused,
    ProviderFailed,
    ProviderMisbehaved,
    SessionRejected,
    fault,
    learn,
)
from node.consumer._renter import RentError
from node.consumer._routing import rank
from node.consumer._trust import BUSY_MAX, FLOOR, START, probe_backoff
from node.escrow._client import EscrowUnreachable
from node.net._host import peer_addrs
from node.provider._offers import Offer
from tests.node.session_rig import Rig, ScriptedBackend, session_rig
from tests.support import identity

AGENT = identity("fair-agent").peer_id
ONLY, OTHER = identity("fair-only").peer_id, identity("fair-other").peer_id


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def row(peer: str, price: int = 100) -> tuple[protocol.Listing, protocol.ModelOffer]:
    listing = protocol.Listing(provider=peer, addrs=(), seq=1, issued_at=1, expires_at=2, provider_type="self_hosted",
                               models=(), escrow_agents=(AGENT,), hardware=protocol.Hardware())
    return listing, protocol.ModelOffer(name="m", price=protocol.Price(input_per_1k=price, output_per_1k=price),
                                        max_context=4096, max_concurrent=4)


def routed(book: TrustBook, rows: list, prefs: Preferences = Preferences()) -> list[tuple[str, bool]]:
    return [(c.provider, c.probe) for c in rank(rows, prefs, prompt_tokens=10, max_tokens=10, stats=book.get,
                                                agent_for=lambda lst: AGENT, rng=random.Random(0))]


def test_every_failure_is_attributed():
    cases = [
        (ProviderMisbehaved(protocol.ReceiptPriceMismatch("cost")), VIOLATION),
        (ProviderFailed("the provider sent nothing for 15s"), PROVIDER),
        (CallRefused("backend_error", "upstream 500"), PROVIDER),
        (SessionRejected("internal", ""), PROVIDER),
        (SessionRejected("price_changed", "now 9/9"), LISTING),
        (SessionRejected("escrow_not_accepted", ""), LISTING),
        (SessionRejected("capacity", "4 sessions"), CAPACITY),
        (SessionRejected("rate_limited", ""), CAPACITY),
        (SessionRejected("unavailable", "outside its schedule"), CAPACITY),
        (CallRefused("capacity", "queue full"), CAPACITY),
        (CallRefused("timeout", "waited 30s for a slot"), CAPACITY),
        (SessionRejected("escrow_invalid", "could not confirm the channel with its agent"), THIRD_PARTY),
        (CallRefused("expired", "the escrow channel expires too soon"), THIRD_PARTY),
        (SessionRejected("over_budget", ""), OURS),
        (CallRefused("context_too_long", ""), OURS),
        (CallRefused("max_tokens_too_large", ""), OURS),
        (SessionRejected("bad_request", ""), OURS),
        (SessionRejected("unknown_model", ""), STALE),
    ]
    for exc, who in cases:
        assert fault(exc) == who, exc
    with tempfile.TemporaryDirectory() as tmp:
        book = TrustBook(Path(tmp) / "trust.db", clock=FakeClock())
        for exc, who in cases:
            learn(book, who, exc)  # one provider per kind of fault
        assert {who: book.get(who).score for _, who in cases} == {
            VIOLATION: START - 50, PROVIDER: START - 3 * 10, LISTING: START - 2 - 2,
            CAPACITY: START - 2 * 5, THIRD_PARTY: START, OURS: START, STALE: START}
        book.close()


def test_ten_agent_outages_blacklist_none_of_twenty_consumers():
    """The finding: after 10 escrow-agent crashes during bursts, 17 of 20 consumers could no longer
    rent from the only provider. Each consumer here lives through the same 10 outages as they
    looked from its side — the provider could not confirm its channel with the agent, its own
    channel ran out mid-session, the provider was full while everyone retried, now and then a
    timeout — and every one of them still routes to the provider afterwards."""
    clock = FakeClock()
    rng = random.Random(12)
    rows = [row(ONLY)]
    with tempfile.TemporaryDirectory() as tmp:
        books = [TrustBook(Path(tmp) / f"trust-{i}.db", clock=clock) for i in range(20)]
        for outage in range(10):
            for book in books:
                for _ in range(rng.randrange(1, 4)):
                    learn(book, ONLY, SessionRejected("escrow_invalid", "could not confirm the channel with its "
                                                                        "agent: no route to the agent"))
                for _ in range(rng.randrange(0, 3)):
                    learn(book, ONLY, CallRefused("expired", "the escrow channel expires too soon"))
                for _ in range(rng.randrange(0, 12)):
                    learn(book, ONLY, SessionRejected("capacity", "4 sessions of m already running", 1))
                if rng.random() < 0.3:  # a 5 s open timeout while everyone's burst hit it at once
                    learn(book, ONLY, ProviderFailed("the provider sent nothing for 5s"))
            clock.now += 600  # ten minutes between crashes: the agent is back, calls complete
            for book in books:
                book.completed(ONLY, ttft_s=0.1, tokens=10, duration_s=0.2)
        clock.now += 600
        can_rent = [routed(book, rows) for book in books]
        assert all(r and r[0][0] == ONLY for r in can_rent), can_rent
        # none of it was the provider's doing but the odd timeout: no one holds it under the floor
        assert all(book.get(ONLY).score >= FLOOR for book in books)
        for book in books:
            book.close()


def test_capacity_refusals_cost_a_little_and_are_forgiven_within_minutes(tmp_path):
    clock = FakeClock()
    book = TrustBook(tmp_path / "trust.db", clock=clock)
    for _ in range(200):  # a burst: every attempt refused for capacity
        book.refused(ONLY, "capacity")
    assert book.get(ONLY).score == START - BUSY_MAX  # bounded: capacity alone never reaches the floor
    assert routed(book, [row(ONLY), row(OTHER, price=1_000)])[0] == (ONLY, False)
    clock.now += 60
    assert book.get(ONLY).score == START - BUSY_MAX / 2
    clock.now += 9 * 60
    assert book.get(ONLY).score > START - 0.1  # ten minutes on, all but forgiven
    book.refused(ONLY, "rate_limited")  # a new refusal adds to what is left, not to the old total
    assert START - 2.1 < book.get(ONLY).score < START - 2
    book.close()
    assert TrustBook(tmp_path / "trust.db", clock=clock).get(ONLY).score < START - 2  # persistent


def test_a_provider_sending_bad_receipts_stays_excluded(tmp_path):
    clock = FakeClock()
    book = TrustBook(tmp_path / "trust.db", clock=clock)
    book.violated(ONLY)
    book.violated(ONLY)
    assert book.get(ONLY).score < FLOOR and book.get(ONLY).violator
    assert routed(book, [row(ONLY)]) == []  # even as the only provider: no probe of a cheat
    clock.now += 3600 * 12
    assert routed(book, [row(ONLY), row(OTHER)]) == [(OTHER, False)]
    clock.now += 3600 * 12  # a day without news: probed again, one call at a time
    assert routed(book, [row(ONLY)]) == [(ONLY, True)]
    book.close()


async def test_probation_probes_one_at_a_time_and_a_good_probe_ends_it(tmp_path):
    clock = FakeClock()
    book = TrustBook(tmp_path / "trust.db", clock=clock)
    for _ in range(6):  # down for a while: six faults in a row, score 40
        book.failed(ONLY)
    assert book.get(ONLY).score == START - 60 and book.get(ONLY).strikes == 6
    rows = [row(ONLY), row(OTHER, price=1_000)]
    assert routed(book, rows) == [(OTHER, False)]  # another provider is there: ONLY waits its back-off
    assert routed(book, [row(ONLY)]) == [(ONLY, True)]  # the only one: probed at once
    clock.now += probe_backoff(6)
    assert probe_backoff(6) == 60 * 32
    assert routed(book, rows) == [(ONLY, True), (OTHER, False)]  # back-off over: probed first
    assert routed(book, rows, Preferences(allow_fallbacks=False)) == [(OTHER, False)]  # a probe never alone
    book.failed(ONLY)  # the probe failed: a longer back-off
    assert routed(book, rows) == [(OTHER, False)] and probe_backoff(7) > probe_backoff(6)

    # one probe at a time: a second one while the first runs is refused at once, nothing dialled
    probe = rank([row(ONLY)], Preferences(), prompt_tokens=10, max_tokens=10, stats=book.get,
                 agent_for=lambda lst: AGENT)[0]
    assert probe.probe
    pacing = Pacing()
    async with pacing.slot(probe):
        with pytest.raises(Busy, match="one probe at a time"):
            async with pacing.slot(probe):
                pass
    async with pacing.slot(probe):  # free again
        pass

    book.completed(ONLY, ttft_s=0.1, tokens=10, duration_s=0.2)  # the probe served: probation is over
    assert book.get(ONLY).score == FLOOR + 1 and book.get(ONLY).strikes == 0
    assert routed(book, rows)[0] == (ONLY, False)
    book.close()


def test_an_old_trust_db_gains_the_new_columns(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "trust.db")
    db.execute("CREATE TABLE providers (peer_id TEXT PRIMARY KEY, score REAL NOT NULL, ttft_s REAL, tps REAL, "
               "calls INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, "
               "violations INTEGER NOT NULL DEFAULT 0, last_alive INTEGER)")
    db.execute("INSERT INTO providers(peer_id, score) VALUES (?, 30.0)", (ONLY,))
    db.commit()
    db.close()
    book = TrustBook(tmp_path / "trust.db", clock=FakeClock())
    assert book.get(ONLY).score == 30.0 and book.get(ONLY).probe_due  # under the floor, never probed yet
    book.refused(ONLY, "capacity")
    assert book.get(ONLY).score == 28.0
    book.close()


# ---- with real peers: the agent is down from the provider's side, then back ----------------------

PRICE = protocol.Price(input_per_1k=500_000, output_per_1k=1_500_000)
USER = [{"role": "user", "content": "hi"}]


class _Market:
    """What the Renter reads of a market: these listings, this node's host and identity."""

    def __init__(self, rig: Rig, listings: list[protocol.Listing]) -> None:
        self.host, self.identity = rig.consumer_host, rig.consumer_ops.identity
        self.view = SimpleNamespace(rows=lambda now, model: [SimpleNamespace(listing=lst, offer=o)
                                                             for lst in listings for o in lst.models])

    def now(self) -> int:
        return int(time.time())

    async def lookup(self, model: str) -> None:
        pass


def _listing(rig: Rig) -> protocol.Listing:
    now = int(time.time())
    lst = protocol.Listing(provider=rig.provider_id, addrs=tuple(peer_addrs(rig.provider_host)), seq=1, issued_at=now,
                           expires_at=now + 300, provider_type="self_hosted",
                           models=(protocol.ModelOffer(name="m", price=PRICE, max_context=2048, max_concurrent=4),),
                           escrow_agents=(rig.agent.identity.peer_id,), hardware=protocol.Hardware())
    return protocol.sign(lst, "sig", rig.provider_service.identity)


async def test_agent_outages_seen_by_the_provider_cost_it_no_trust():
    offer = Offer(model="m", backend="builtin", input_price=PRICE.input_per_1k, output_price=PRICE.output_per_1k,
                  max_context=2048, max_concurrent=4)
    async with session_rig({"m": offer}, {"m": ScriptedBackend()}, tag="fair-agent") as rig:
        real_call = rig.provider_service.escrow.call

        async def agent_down(*args: Any, **kwargs: Any) -> Any:
            raise EscrowUnreachable("no route to the agent (it is restarting)")

        with tempfile.TemporaryDirectory() as tmp:
            trust = TrustBook(Path(tmp) / "trust.db")
            renter = Renter(_Market(rig, [_listing(rig)]), rig.consumer_ops, None,
                            ReceiptStore(Path(tmp) / "receipts.db"), trust, clock=rig.clock, rng=random.Random(0))
            for _ in range(10):  # ten outages, each refusing this consumer's sessions, then the agent is back
                rig.provider_service.escrow.call = agent_down
                for _ in range(3):
                    with pytest.raises(RentError) as refused:
                        await renter.run("m", USER, max_tokens=8, temperature_milli=0)
                    assert [a.fault for a in refused.value.attempts] == ["third_party"]
                    assert "escrow_invalid" in str(refused.value) and "could not confirm" in str(refused.value)
                rig.provider_service.escrow.call = real_call
                done = await renter.run("m", USER, max_tokens=8, temperature_milli=0)
                assert done.provider == rig.provider_id
            assert trust.get(rig.provider_id).score == START + 10  # ten served calls, nothing charged
            trust.close()
            renter.receipts.close()
        rig.agent.check()
