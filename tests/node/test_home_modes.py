"""Hostile finding 15 (home modes): whatever a home held before, opening it makes it private — the
folder and every folder in it 0700, every file 0600 — and the sqlite files the node creates there
(receipts, trust, and the ledger once it opens through ``private_file``), with their -wal and -shm
companions, are 0600 from the start, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nacl.pwhash
import pytest

from node import Home, init_home
from node._home import private_file
from node._receipts import ReceiptStore
from node.consumer._trust import TrustBook
from wallet import Ledger


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)  # the common default: new files 0644
    try:
        yield
    finally:
        os.umask(old)


def test_an_existing_loose_home_is_made_private_on_open(tmp_path, loose_umask):
    home = tmp_path / "home"
    (home / "models" / "tiny").mkdir(parents=True)
    files = [home / name for name in ("keystore.json", "config.toml", "receipts.db", "receipts.db-wal",
                                      "receipts.db-shm", "trust.db", "escrow.db", "api.token")]
    files.append(home / "models" / "tiny" / "weights.bin")
    for f in files:
        f.write_bytes(b"x")
        f.chmod(0o644)
    for d in (home, home / "models", home / "models" / "tiny"):
        d.chmod(0o755)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the node's")
    outside.chmod(0o644)
    (home / "link").symlink_to(outside)

    Home(home)

    assert [oct(_mode(d)) for d in (home, home / "models", home / "models" / "tiny")] == [oct(0o700)] * 3
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o600) for f in files}
    assert _mode(outside) == 0o644  # a link is never followed


def test_init_home_on_an_existing_open_folder_makes_it_private(tmp_path, loose_umask):
    home = tmp_path / "h"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    init_home(home, "pw", opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN, memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN)
    assert _mode(home) == 0o700
    assert {p.name: _mode(p) for p in home.iterdir()} == {"keystore.json": 0o600, "config.toml": 0o600}


def test_new_sqlite_files_are_private_from_the_start(tmp_path, loose_umask):
    receipts = ReceiptStore(tmp_path / "receipts.db")
    trust = TrustBook(tmp_path / "trust.db")
    trust.failed("12D3KooWpeer")  # a write: the -wal and -shm files exist now
    receipts.query("SELECT COUNT(*) FROM receipts")
    try:
        made = sorted(p.name for p in tmp_path.iterdir())
        assert {"receipts.db", "receipts.db-wal", "receipts.db-shm", "trust.db", "trust.db-wal",
                "trust.db-shm"} <= set(made)
        assert {name: oct(_mode(tmp_path / name)) for name in made} == {name: oct(0o600) for name in made}
    finally:
        receipts.close()
        trust.close()


def test_a_ledger_opened_through_private_file_is_private_too(tmp_path, loose_umask):
    """What wallet/_ledger.py should do (it cannot import node): create its file 0600 before
    sqlite opens it; the -wal and -shm files then follow the database's mode."""
    ledger = Ledger(private_file(tmp_path / "escrow.db"))
    try:
        made = sorted(p.name for p in tmp_path.iterdir())
        assert "escrow.db" in made
        assert {name: oct(_mode(tmp_path / name)) for name in made} == {name: oct(0o600) for name in made}
    finally:
        ledger.close()


def test_private_file_tightens_an_existing_database_and_its_companions(tmp_path, loose_umask):
    for name in ("x.db", "x.db-wal", "x.db-shm"):
        (tmp_path / name).write_bytes(b"")
        (tmp_path / name).chmod(0o664)
    private_file(tmp_path / "x.db")
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {"x.db": 0o600, "x.db-wal": 0o600, "x.db-shm": 0o600}
