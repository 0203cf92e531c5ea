"""The escrow store: its rows go into a real ledger file and come back equal, also after the
file is reopened; missing rows are None; a savepoint undoes only its own block."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

import protocol
from tests.support import identity
from tests.wallet.escrow_support import AGENT, receipt
from wallet import Ledger, budget_account, channel_account, peer_account
from wallet._escrow_store import BudgetRow, ChannelRow, EscrowStore, RequestRecord

NOW = 1_000_000
ALICE, BOB, CAROL = identity("store-alice"), identity("store-bob"), identity("store-carol")


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "escrow.db")
    yield led
    led.close()


def channel_row(n: int, consumer=ALICE, provider=BOB, cap=4_000, expires_at=NOW + 60,
                budget_id: bytes | None = None) -> ChannelRow:
    channel_id = bytes([n]) * 16
    grant = protocol.sign(protocol.ChannelGrant(
        agent=AGENT.peer_id, channel_id=channel_id, consumer=consumer.peer_id, provider=provider.peer_id, cap=cap,
        expires_at=expires_at, budget_id=budget_id), "sig", AGENT)
    return ChannelRow(channel_id=channel_id, consumer=consumer.peer_id, provider=provider.peer_id, cap=cap,
                      expires_at=expires_at, budget_id=budget_id, claimed=0, status="open", grant=grant)


def budget_row(n: int, funder=CAROL, expires_at=NOW + 60) -> BudgetRow:
    return BudgetRow(budget_id=bytes([n]) * 16, funder=funder.peer_id, amount=9_000, per_session_limit=3_000,
                     expires_at=expires_at, status="active")


def answer(request_id: bytes) -> protocol.EscrowResponse:
    return protocol.sign(protocol.EscrowResponse(
        request_id=request_id, agent=AGENT.peer_id, ok=True, balance=protocol.Balance(available=5, locked=2),
        paid=5, issued_at=NOW), "sig", AGENT)


def record(request_id: bytes, response: protocol.EscrowResponse | None = None) -> RequestRecord:
    return RequestRecord(request_id=request_id, kind="escrow.mint", party=ALICE.peer_id, digest=b"d" * 32,
                         applied_at=NOW, answer=response)


def test_a_channel_row_round_trips_and_survives_a_reopen(tmp_path):
    on_budget = channel_row(2, budget_id=b"B" * 16)
    ledger = Ledger(tmp_path / "escrow.db")
    with ledger.transaction(b"t" * 16) as tx:
        store = EscrowStore(tx.db)
        store.insert_channel(channel_row(1))
        store.insert_channel(on_budget)
        assert store.channel(b"\x01" * 16) == channel_row(1)
    ledger.close()
    ledger = Ledger(tmp_path / "escrow.db")
    with ledger.reading() as db:
        store = EscrowStore(db)
        assert store.channels() == [channel_row(1), on_budget]
        assert store.channel(on_budget.channel_id).budget_id == b"B" * 16
        assert store.channel(b"?" * 16) is None
        assert store.channel(b"\x01" * 16).state() == protocol.ChannelState(
            channel=channel_row(1).grant, claimed=0, status="open")
    ledger.close()


def test_terms_claims_and_status_are_written_in_place(ledger):
    row = channel_row(1)
    longer = protocol.sign(dataclasses.replace(row.grant, cap=6_000, expires_at=NOW + 90, sig=b""), "sig", AGENT)
    first = receipt(row.grant, ALICE, BOB, 700, session=b"S" * 16)
    later = receipt(row.grant, ALICE, BOB, 1_100, session=b"S" * 16, call_seq=1)
    with ledger.transaction(b"t" * 16) as tx:
        store = EscrowStore(tx.db)
        store.insert_channel(row)
        store.set_terms(longer)
        assert store.session_claimed(row.channel_id, b"S" * 16) == 0
        store.record_session_claim(first)
        store.add_claimed(row.channel_id, 700)
        store.record_session_claim(later)  # the same session: replaced, not added
        store.add_claimed(row.channel_id, 400)
        store.set_channel_status(row.channel_id, "closed")
    with ledger.reading() as db:
        store = EscrowStore(db)
        assert store.channel(row.channel_id) == dataclasses.replace(
            row, cap=6_000, expires_at=NOW + 90, grant=longer, claimed=1_100, status="closed")
        assert store.session_claimed(row.channel_id, b"S" * 16) == 1_100
        assert store.session_claimed(row.channel_id, b"T" * 16) == 0
        saved = db.execute("SELECT receipt FROM channel_sessions").fetchone()[0]
        assert protocol.decode(bytes(saved), expect=(protocol.Receipt,)) == later


def test_listing_channels_keeps_the_newest_and_finds_expired_open_ones(ledger):
    rows = [channel_row(1), channel_row(2, consumer=CAROL, provider=ALICE, expires_at=NOW + 5),
            channel_row(3, consumer=CAROL, provider=BOB, expires_at=NOW + 5), channel_row(4)]
    with ledger.transaction(b"t" * 16) as tx:
        store = EscrowStore(tx.db)
        for row in rows:
            store.insert_channel(row)
        store.set_channel_status(rows[2].channel_id, "refunded")
    with ledger.reading() as db:
        store = EscrowStore(db)
        assert store.channels_of(ALICE.peer_id, last=10) == [rows[0], rows[1], rows[3]]
        assert store.channels_of(ALICE.peer_id, last=2) == [rows[1], rows[3]]
        assert store.channels_of(BOB.peer_id, last=0) == []
        assert store.open_channels_expired_by(NOW + 4) == []
        assert store.open_channels_expired_by(NOW + 5) == [rows[1].channel_id]


def test_a_budget_row_round_trips_with_its_whitelist(ledger):
    row = budget_row(7)
    with ledger.transaction(b"t" * 16) as tx:
        store = EscrowStore(tx.db)
        store.insert_budget(row, (BOB.peer_id, ALICE.peer_id, BOB.peer_id))
        assert store.budget(row.budget_id) == row
    with ledger.reading() as db:
        store = EscrowStore(db)
        assert store.budget(row.budget_id) == row
        assert store.budget(b"?" * 16) is None
        assert store.members(row.budget_id) == tuple(sorted((ALICE.peer_id, BOB.peer_id)))
        assert store.is_member(row.budget_id, ALICE.peer_id) and not store.is_member(row.budget_id, CAROL.peer_id)


def test_budgets_are_listed_for_funder_and_members_and_found_when_expired(ledger):
    first, second, third = budget_row(1), budget_row(2, funder=ALICE, expires_at=NOW + 5), budget_row(3)
    with ledger.transaction(b"t" * 16) as tx:
        store = EscrowStore(tx.db)
        store.insert_budget(first, (ALICE.peer_id,))
        store.insert_budget(second, (ALICE.peer_id, BOB.peer_id))
        store.insert_budget(third, (BOB.peer_id,))
        store.set_budget_status(first.budget_id, "refunded")
    with ledger.reading() as db:
        store = EscrowStore(db)
        assert store.budget(first.budget_id).status == "refunded"
        assert store.budget_ids_of(ALICE.peer_id, last=10) == [first.budget_id, second.budget_id]
        assert store.budget_ids_of(BOB.peer_id, last=1) == [third.budget_id]
        assert store.budget_ids_of(CAROL.peer_id, last=0) == []
        assert store.active_budgets_expired_by(NOW + 5) == [second.budget_id]
        assert store.active_budgets_expired_by(NOW + 4) == []


def test_a_request_record_round_trips_with_or_without_an_answer(ledger):
    kept, internal = record(b"r" * 16, answer(b"r" * 16)), record(b"i" * 16)
    with ledger.transaction(b"t" * 16) as tx:
        store = EscrowStore(tx.db)
        assert store.request(kept.request_id) is None
        store.record_request(kept)
        store.record_request(internal, if_absent=True)
        store.record_request(dataclasses.replace(internal, kind="other"), if_absent=True)  # the first one stays
    with ledger.reading() as db:
        store = EscrowStore(db)
        assert store.request(kept.request_id) == kept
        assert store.request(internal.request_id) == internal
    with pytest.raises(sqlite3.IntegrityError):
        with ledger.transaction(b"u" * 16) as tx:
            EscrowStore(tx.db).record_request(kept)


def test_held_and_locked_read_the_accounts_the_ledger_moved_money_into(ledger):
    own, drawn, budget = channel_row(1), channel_row(2, budget_id=b"\x09" * 16), budget_row(9, funder=ALICE)
    with ledger.transaction(b"t" * 16) as tx:
        store = EscrowStore(tx.db)
        store.record_request(record(b"t" * 16))
        store.insert_channel(own)
        store.insert_channel(drawn)
        store.insert_budget(budget, (ALICE.peer_id,))
        tx.transfer("system:mint", peer_account(ALICE.peer_id), 10_000)
        tx.transfer(peer_account(ALICE.peer_id), channel_account(own.channel_id), 1_000)
        tx.transfer(peer_account(ALICE.peer_id), budget_account(budget.budget_id), 3_000)
        tx.transfer(budget_account(budget.budget_id), channel_account(drawn.channel_id), 500)
    with ledger.reading() as db:
        store = EscrowStore(db)
        assert store.held(peer_account(ALICE.peer_id)) == 6_000
        assert store.held(peer_account(BOB.peer_id)) == 0
        assert store.locked_in_channels(ALICE.peer_id) == 1_000  # the channel drawn from the budget is not hers
        assert store.locked_in_budgets(ALICE.peer_id) == 2_500
        assert store.locked_in_budgets(BOB.peer_id) == 0
    assert ledger.check()["locked"] == 4_000


def test_a_savepoint_undoes_only_its_own_block(ledger):
    with ledger.transaction(b"t" * 16) as tx:
        store = EscrowStore(tx.db)
        store.insert_channel(channel_row(1))
        with pytest.raises(KeyError):
            with store.savepoint():
                store.insert_channel(channel_row(2))
                store.set_channel_status(channel_row(1).channel_id, "closed")
                raise KeyError("refused")
        with store.savepoint():
            store.insert_channel(channel_row(3))
    with ledger.reading() as db:
        assert EscrowStore(db).channels() == [channel_row(1), channel_row(3)]
