"""Storage faults of the escrow ledger (issue 12, finding 7): a damaged page stops money
operations with a clear refusal instead of going unnoticed or crashing the sweep; a full or
read-only disk is refused whole, logged once per episode and answered with a code that says so;
backups taken with the online backup API restore every balance, keeping the damaged file aside.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3

import pytest

import protocol
from protocol import EscrowBudgetCreate, EscrowClaim, EscrowMint, EscrowOpen, EscrowQuery, EscrowWithdraw
from tests.support import identity
from tests.wallet.escrow_support import AGENT, ok, receipt, signed, snapshot
from wallet import (
    EscrowAgent,
    Ledger,
    LedgerDamaged,
    LedgerInUse,
    check_ledger_file,
    hold_exclusive,
    ledger_backup_folder,
    list_ledger_backups,
    restore_ledger,
)

NOW = 1_000_000
ALICE, BOB, FUNDER = identity("int-alice"), identity("int-bob"), identity("int-funder")


def busy_agent(path) -> tuple[EscrowAgent, protocol.ChannelGrant]:
    """A ledger with mints, a budget, a claimed channel and one that expires at NOW + 60."""
    agent = EscrowAgent(Ledger(path), AGENT)
    ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=10_000), NOW))
    ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=FUNDER.peer_id, amount=5_000), NOW))
    ok(agent.handle(signed(EscrowBudgetCreate, FUNDER, NOW, amount=2_000, whitelist=(ALICE.peer_id,),
                           per_session_limit=1_000, expires_at=NOW + 3600), NOW))
    r = ok(agent.handle(signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=3_000, expires_at=NOW + 3600), NOW))
    ch = r.channels[0].channel
    ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 1_200)), NOW))
    ok(agent.handle(signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=500, expires_at=NOW + 60), NOW))
    return agent, ch


def balances(agent: EscrowAgent) -> dict[str, protocol.Balance]:
    return {p.peer_id: agent.balance(p.peer_id) for p in (ALICE, BOB, FUNDER)}


def damage_table_page(path, table: str) -> None:
    """Write garbage over the root page of ``table`` in the (closed, checkpointed) file at ``path``."""
    db = sqlite3.connect(path)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    assert not os.path.exists(f"{path}-wal") or os.path.getsize(f"{path}-wal") == 0
    with open(path, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xa5" * size)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "wallet._ledger"]


@pytest.fixture
def damaged_copy(tmp_path):
    """A copy of a real ledger with one page of ``channels`` overwritten."""
    agent, _ = busy_agent(tmp_path / "real.db")
    agent.ledger.close()
    copy = tmp_path / "escrow.db"
    shutil.copy(tmp_path / "real.db", copy)
    damage_table_page(copy, "channels")
    return copy


def test_a_damaged_channels_page_refuses_money_operations_clearly_and_the_sweep_does_not_crash(damaged_copy, caplog):
    caplog.set_level(logging.INFO)
    agent = EscrowAgent(Ledger(damaged_copy), AGENT)  # opens: the node starts, its agent refuses
    try:
        assert agent.damaged and "integrity check" in agent.ledger.damage
        assert len(errors(caplog)) == 1 and "node escrow check" in errors(caplog)[0]
        for request in (signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1), signed(EscrowWithdraw, ALICE, NOW,
                                                                                            amount=1)):
            r = agent.handle(request, NOW)
            protocol.verify(r, "sig", AGENT.public_key)
            assert (r.ok, r.error) == (False, "ledger_damaged")
            assert "node escrow check" in r.detail and "nothing was applied" in r.detail
        assert agent.sweep(NOW + 3600) == 0  # past every expiry: nothing tried, nothing raised
        query = agent.handle(signed(EscrowQuery, ALICE, NOW), NOW)  # answers what it can: here a clean refusal
        assert query.ok or query.error == "ledger_damaged"
        assert len(errors(caplog)) == 1  # one line, however many requests
    finally:
        agent.ledger.close()
    report = check_ledger_file(damaged_copy)
    assert not report.ok and report.integrity and report.totals is None


def test_damage_found_by_the_periodic_check_stops_money_operations(tmp_path, caplog):
    agent, _ = busy_agent(tmp_path / "escrow.db")
    try:
        assert agent.verify() is None and not agent.damaged
        agent.ledger.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        damage_table_page(tmp_path / "escrow.db", "accounts")
        assert "integrity check" in agent.verify()
        r = agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1), NOW)
        assert (r.ok, r.error) == (False, "ledger_damaged")
        assert len(errors(caplog)) == 1
    finally:
        agent.ledger.close()


def test_a_stored_row_that_no_longer_decodes_is_damage_not_a_crash(tmp_path):
    """Bit rot inside a cell keeps SQLite's page structure intact: the grant no longer decodes."""
    agent, _ = busy_agent(tmp_path / "escrow.db")
    try:
        agent.ledger.db.execute("UPDATE channels SET grant_ = x'00ff00' WHERE expires_at = ?", (NOW + 60,))
        assert agent.ledger.verify() is None  # quick_check cannot see it
        with pytest.raises(LedgerDamaged, match="does not decode"):
            agent.sweep(NOW + 60)
        assert agent.damaged and agent.sweep(NOW + 61) == 0
        r = agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1), NOW)
        assert r.error == "ledger_damaged"
    finally:
        agent.ledger.close()


def test_a_file_that_is_not_a_ledger_is_one_clear_error(tmp_path):
    (tmp_path / "escrow.db").write_bytes(b"not a database, " * 512)
    with pytest.raises(LedgerDamaged) as caught:
        Ledger(tmp_path / "escrow.db")
    assert "not a usable ledger" in str(caught.value) and "node escrow check" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_full_disk_is_refused_whole_logged_once_and_the_same_request_applies_after(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    agent = EscrowAgent(Ledger(tmp_path / "escrow.db"), AGENT)
    try:
        pages = agent.ledger.db.execute("PRAGMA page_count").fetchone()[0]
        agent.ledger.db.execute(f"PRAGMA max_page_count = {pages}")  # a real SQLITE_FULL at the next new page
        applied, refused = 0, []
        for i in range(400):
            request = signed(EscrowMint, AGENT, NOW, to=identity(f"full-{i}").peer_id, amount=7)
            before = snapshot(agent)
            r = agent.handle(request, NOW)
            protocol.verify(r, "sig", AGENT.public_key)
            if r.ok:
                applied += 1
                continue
            assert r.error == "storage_full" and "nothing was applied" in r.detail
            assert snapshot(agent) == before  # nothing half-applied
            refused.append(request)
            if len(refused) == 3:
                break
        assert len(refused) == 3, "the size limit was never reached"
        assert len(errors(caplog)) == 1 and "full" in errors(caplog)[0]  # one line per episode
        assert agent.ledger.storage_fault == "storage_full"
        assert agent.check()["minted"] == 7 * applied
        agent.ledger.db.execute("PRAGMA max_page_count = 1000000")
        for request in refused:  # not remembered as refused: the very same requests apply now, once each
            ok(agent.handle(request, NOW))
            assert agent.handle(request, NOW).error == "replayed"
        assert agent.ledger.storage_fault is None
        assert any("writes again" in r.getMessage() for r in caplog.records)
        assert agent.check()["minted"] == 7 * (applied + 3)
    finally:
        agent.ledger.close()


def test_a_read_only_ledger_is_refused_whole_logged_once_and_reads_still_answer(tmp_path, caplog):
    agent = EscrowAgent(Ledger(tmp_path / "escrow.db"), AGENT)
    try:
        ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=100), NOW))
        before = snapshot(agent)
        agent.ledger.db.execute("PRAGMA query_only = ON")
        for i in range(3):
            r = agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1), NOW)
            assert (r.ok, r.error) == (False, "storage_readonly") and "read-only" in r.detail
        assert snapshot(agent) == before and len(errors(caplog)) == 1
        assert agent.handle(signed(EscrowQuery, ALICE, NOW), NOW).ok  # reads still answer
        agent.ledger.db.execute("PRAGMA query_only = OFF")
        ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1), NOW))
        assert agent.check()["minted"] == 101
    finally:
        agent.ledger.close()


def test_a_refusal_whose_horizon_cannot_be_written_is_never_given_out_nor_remembered(tmp_path):
    """A refusal is remembered inside its transaction, before the refusal horizon is written;
    when that write meets a full disk, the client is told ``storage_full`` and the remembered
    refusal is dropped, so the same request is judged afresh later."""
    agent = EscrowAgent(Ledger(tmp_path / "escrow.db"), AGENT)
    try:
        ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=100), NOW))
        db = agent.ledger.db
        page_count = lambda: db.execute("PRAGMA page_count").fetchone()[0]  # noqa: E731
        for i in range(10_000):  # fill meta's page: the horizon's new row will need a page of its own
            db.execute("SAVEPOINT pad")
            pages = page_count()
            db.execute("INSERT INTO meta(key, value) VALUES (?, 0)", (f"pad-{i:05d}",))
            if page_count() > pages:
                db.execute("ROLLBACK TO pad")
                db.execute("RELEASE pad")
                break
            db.execute("RELEASE pad")
        assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
        db.execute(f"PRAGMA max_page_count = {page_count()}")
        overdraw = signed(EscrowWithdraw, ALICE, NOW + 1, amount=1_000)
        assert agent.handle(overdraw, NOW + 1).error == "storage_full"
        assert len(agent.refusals) == 0
        db.execute("PRAGMA max_page_count = 1000000")
        assert agent.handle(overdraw, NOW + 1).error == "insufficient_funds"
        assert len(agent.refusals) == 1 and agent.handle(overdraw, NOW + 1).error == "replayed"
        assert agent.check()["minted"] == 100
    finally:
        agent.ledger.close()


def test_backup_and_restore_keep_every_balance_and_the_damaged_file(tmp_path):
    path = tmp_path / "escrow.db"
    agent, ch = busy_agent(path)
    at_backup, totals = balances(agent), agent.check()
    backup = agent.ledger.backup(NOW)
    assert backup.path.parent == ledger_backup_folder(path) and oct(os.stat(backup.path).st_mode & 0o777) == "0o600"
    assert check_ledger_file(backup.path).totals == totals
    with pytest.raises(LedgerInUse):  # a running agent holds the ledger
        restore_ledger(path, backup.path, NOW + 10)
    ok(agent.handle(signed(EscrowClaim, BOB, NOW, receipt=receipt(ch, ALICE, BOB, 2_000, call_seq=1)), NOW))
    agent.ledger.close()
    damage_table_page(path, "accounts")
    damaged = path.read_bytes()

    aside = restore_ledger(path, backup.path, NOW + 10)

    assert aside.read_bytes() == damaged  # kept aside, never deleted
    restored = EscrowAgent(Ledger(path), AGENT)
    try:
        assert not restored.damaged
        assert balances(restored) == at_backup and restored.check() == totals
        # signed before the restore: maybe refused, or applied after the backup; never applied by a replay
        assert restored.handle(signed(EscrowMint, AGENT, NOW + 10, to=ALICE.peer_id, amount=1), NOW + 20).error == \
            "stale_request"
        ok(restored.handle(signed(EscrowMint, AGENT, NOW + 11, to=ALICE.peer_id, amount=1), NOW + 20))
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    finally:
        restored.ledger.close()


def test_backups_are_verified_the_newest_kept_and_none_taken_of_a_damaged_ledger(tmp_path):
    agent, _ = busy_agent(tmp_path / "escrow.db")
    try:
        for t in range(5):
            agent.ledger.backup(NOW + 3600 * t, keep=3)
        kept = list_ledger_backups(tmp_path / "escrow.db")
        assert [b.taken_at for b in kept] == [NOW + 3600 * t for t in (2, 3, 4)]
        assert sorted(os.listdir(ledger_backup_folder(tmp_path / "escrow.db"))) == sorted(b.path.name for b in kept)
        agent.ledger.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        damage_table_page(tmp_path / "escrow.db", "channels")
        agent.verify()
        with pytest.raises(LedgerDamaged):
            agent.ledger.backup(NOW + 3600 * 9, keep=3)
        assert list_ledger_backups(tmp_path / "escrow.db") == kept
    finally:
        agent.ledger.close()


def test_a_ledger_held_for_a_check_cannot_be_opened_and_one_open_cannot_be_held(tmp_path):
    ledger = Ledger(tmp_path / "escrow.db")
    with pytest.raises(LedgerInUse, match="running node"):
        with hold_exclusive(tmp_path / "escrow.db"):
            pass
    ledger.close()
    with hold_exclusive(tmp_path / "escrow.db"):
        with pytest.raises(LedgerInUse, match="checked or restored"):
            Ledger(tmp_path / "escrow.db")
