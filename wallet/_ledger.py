"""The durable double-entry ledger under the escrow agent (SQLite, WAL, synchronous=FULL).

Rules this module owns:
- Money only moves by ``Tx.transfer(src, dst, amount)``: two entries that sum to zero, in the
  same transaction as the balances they change and the operation record that names them.
- Every state-changing operation carries a caller-supplied request id; an operation is
  recorded once (``ops``), with the answer it produced, in the transaction that applied it,
  so a retried request finds its answer and is never applied twice, whatever crashed when.
- No account but ``system:mint`` (the devnet's source) ever goes negative.
- The invariant — balances + locked == minted - withdrawn, entries per operation sum to zero,
  every balance equals the sum of its entries — can be checked at any time (``check``).
- Schema changes are versioned migrations (``meta.schema_version``). ``meta`` also holds the
  escrow's refusal horizon (``escrow_refused_through``, written by ``_escrow_store``): a value,
  not a layout, so it needs no migration.
Amounts are integer micro-credits; SQLite INTEGER is 64-bit, far above any amount allowed.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ._errors import WalletError

__all__ = ["Ledger", "Tx", "LedgerError", "InvariantViolation", "MINT", "WITHDRAWN", "peer_account", "read_balance"]

MINT = "system:mint"
WITHDRAWN = "system:withdrawn"

_MIGRATIONS = [
    # version 1
    """
    CREATE TABLE accounts (name TEXT PRIMARY KEY, balance INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE ops (
        request_id BLOB PRIMARY KEY,
        kind TEXT NOT NULL,
        party TEXT NOT NULL,
        digest BLOB NOT NULL,          -- sha256 of the signed request: a reused id is told apart
        applied_at INTEGER NOT NULL,
        answer BLOB NOT NULL           -- the response as first given (encoded)
    );
    CREATE TABLE entries (
        id INTEGER PRIMARY KEY,
        request_id BLOB NOT NULL REFERENCES ops(request_id) DEFERRABLE INITIALLY DEFERRED,
        account TEXT NOT NULL REFERENCES accounts(name),
        amount INTEGER NOT NULL
    );
    CREATE INDEX entries_by_request ON entries(request_id);
    CREATE TABLE channels (
        channel_id BLOB PRIMARY KEY,
        consumer TEXT NOT NULL,
        provider TEXT NOT NULL,
        cap INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        budget_id BLOB,
        claimed INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL,
        grant_ BLOB NOT NULL
    );
    CREATE INDEX channels_by_consumer ON channels(consumer);
    CREATE INDEX channels_by_provider ON channels(provider);
    CREATE TABLE channel_sessions (
        channel_id BLOB NOT NULL REFERENCES channels(channel_id),
        session_id BLOB NOT NULL,
        claimed INTEGER NOT NULL,
        receipt BLOB NOT NULL,
        PRIMARY KEY (channel_id, session_id)
    );
    CREATE TABLE budgets (
        budget_id BLOB PRIMARY KEY,
        funder TEXT NOT NULL,
        amount INTEGER NOT NULL,
        per_session_limit INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        status TEXT NOT NULL
    );
    CREATE TABLE budget_members (
        budget_id BLOB NOT NULL REFERENCES budgets(budget_id),
        consumer TEXT NOT NULL,
        PRIMARY KEY (budget_id, consumer)
    );
    """,
]


class LedgerError(WalletError):
    """The ledger file cannot be used (newer schema, damaged)."""


class InvariantViolation(LedgerError):
    """Money was created or destroyed: a bug, never a user error."""


def peer_account(peer_id: str) -> str:
    return f"peer:{peer_id}"


def read_balance(db: sqlite3.Connection, account: str) -> int:
    """What ``account`` holds, read through ``db`` (0 for an account never used)."""
    row = db.execute("SELECT balance FROM accounts WHERE name = ?", (account,)).fetchone()
    return int(row[0]) if row else 0


class Tx:
    """One ledger transaction; money moves only through ``transfer``."""

    def __init__(self, db: sqlite3.Connection, request_id: bytes) -> None:
        self.db = db
        self.request_id = request_id

    def transfer(self, src: str, dst: str, amount: int) -> None:
        """Move ``amount`` µc from ``src`` to ``dst`` (both created on first use).

        Raises:
            ValueError: a non-positive amount, or ``src`` would go negative (callers check
                balances first and raise their own specific error; this is the backstop).
        """
        if type(amount) is not int or amount <= 0:
            raise ValueError(f"transfer amount must be a positive integer, got {amount!r}")
        for name in (src, dst):
            self.db.execute("INSERT OR IGNORE INTO accounts(name) VALUES (?)", (name,))
        if src != MINT and self.balance(src) < amount:
            raise ValueError(f"{src} holds less than {amount}")
        self.db.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?", (amount, src))
        self.db.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?", (amount, dst))
        self.db.executemany(
            "INSERT INTO entries(request_id, account, amount) VALUES (?, ?, ?)",
            [(self.request_id, src, -amount), (self.request_id, dst, amount)],
        )

    def balance(self, account: str) -> int:
        return read_balance(self.db, account)


class Ledger:
    """The ledger file. Thread-safe: one connection, one lock, one transaction at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: not a usable ledger ({exc})") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > len(_MIGRATIONS):
            raise LedgerError(f"{self.path} has schema version {version}; this build knows {len(_MIGRATIONS)}")
        for v in range(version, len(_MIGRATIONS)):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[v].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (v + 1,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    @contextmanager
    def transaction(self, request_id: bytes) -> Iterator[Tx]:
        """All or nothing: commit (durably) when the block ends, roll back if it raises."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self.db, request_id)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A consistent read of the current state."""
        with self._lock:
            self.db.execute("BEGIN")
            try:
                yield self.db
            finally:
                self.db.execute("ROLLBACK")

    def balance(self, account: str) -> int:
        with self.reading() as db:
            return read_balance(db, account)

    def totals(self) -> dict[str, int]:
        """minted, withdrawn, available (peer balances) and locked (channels and budgets)."""
        with self.reading() as db:
            return self._totals(db)

    @staticmethod
    def _totals(db: sqlite3.Connection) -> dict[str, int]:
        def total(where: str, *args: Any) -> int:
            return int(db.execute(f"SELECT COALESCE(SUM(balance), 0) FROM accounts WHERE {where}", args).fetchone()[0])

        return {
            "minted": -total("name = ?", MINT),
            "withdrawn": total("name = ?", WITHDRAWN),
            "available": total("name LIKE 'peer:%'"),
            "locked": total("name LIKE 'channel:%' OR name LIKE 'budget:%'"),
        }

    def check(self) -> dict[str, int]:
        """Verify the invariant now; return the totals.

        Raises:
            InvariantViolation: with what does not add up.
        """
        with self.reading() as db:
            t = self._totals(db)
            if t["available"] + t["locked"] != t["minted"] - t["withdrawn"]:
                raise InvariantViolation(f"balances + locked != minted - withdrawn: {t}")
            bad = db.execute("SELECT request_id FROM entries GROUP BY request_id HAVING SUM(amount) != 0").fetchone()
            if bad:
                raise InvariantViolation(f"entries of request {bytes(bad[0]).hex()} do not sum to zero")
            drift = db.execute(
                "SELECT a.name FROM accounts a LEFT JOIN "
                "(SELECT account, SUM(amount) AS s FROM entries GROUP BY account) e ON e.account = a.name "
                "WHERE a.balance != COALESCE(e.s, 0)"
            ).fetchone()
            if drift:
                raise InvariantViolation(f"balance of {drift[0]} differs from its entries")
            negative = db.execute("SELECT name FROM accounts WHERE balance < 0 AND name != ?", (MINT,)).fetchone()
            if negative:
                raise InvariantViolation(f"{negative[0]} is negative")
            return t
