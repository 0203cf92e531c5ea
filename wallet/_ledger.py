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

Storage faults (issue 12, finding 7) are translated here, once, at the edge that meets sqlite:
- A damaged file (``SQLITE_CORRUPT``/``NOTADB``, or ``PRAGMA quick_check`` failing, at open and
  whenever ``verify`` runs) is ``LedgerDamaged``. The ledger then stays *damaged* (``damage``)
  until the process ends: every ``transaction`` is refused before it begins; ``reading`` still
  tries (a query may answer what it can). It is logged once, at error level, with the way out
  (``RECOVERY``: ``node escrow check``). A file that cannot be opened at all raises at open.
- A full disk (``SQLITE_FULL``), a read-only one (``SQLITE_READONLY``) or an I/O error is a
  ``StorageError`` (``StorageFull``, ``StorageReadOnly``): the transaction is rolled back whole
  (SQLite's own atomicity; nothing half-applied), the episode is logged once at error level,
  and its end (the next commit that succeeds) once at warning level.
- Each ``Ledger`` holds a shared ``flock`` on ``<file>.lock`` while open; ``hold_exclusive`` (what
  ``restore_ledger`` and ``node escrow check`` take) fails with ``LedgerInUse`` while any does.
- Backups use SQLite's online backup API from a read-only connection of their own (one step:
  a consistent snapshot, without the ledger's lock): each is written 0600 under another name,
  verified (``integrity_check`` and the invariant) before it takes its own, and only then are
  the oldest beyond ``keep`` removed. ``restore_ledger`` verifies the backup, moves the damaged file
  (and its ``-wal``/``-shm``) aside, never deleting it, and writes the backup in its place,
  its refusal horizon dated the restore (requests signed before it are ``stale_request``).
"""

from __future__ import annotations

import calendar
import dataclasses
import fcntl
import logging
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ._errors import WalletError

__all__ = [
    "Ledger", "Tx", "LedgerError", "LedgerDamaged", "LedgerInUse", "StorageError", "StorageFull", "StorageReadOnly",
    "InvariantViolation", "FileCheck", "Backup", "MINT", "WITHDRAWN", "RECOVERY", "peer_account", "read_balance",
    "check_ledger_file", "list_ledger_backups", "restore_ledger", "hold_exclusive", "ledger_backup_folder",
]

_logger = logging.getLogger(__name__)

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


RECOVERY = "run `node escrow check` with the node stopped (it can restore the latest backup)"


class LedgerError(WalletError):
    """The ledger file cannot be used (cannot be opened, newer schema, damaged, disk faults).
    ``code`` is what the escrow agent answers a request it could not apply for this reason."""

    code = "ledger_unavailable"


class InvariantViolation(LedgerError):
    """Money was created or destroyed: a bug, never a user error."""

    code = "ledger_damaged"


class LedgerDamaged(LedgerError):
    """The file is not a database, or SQLite found a damaged page (``quick_check``, a read)."""

    code = "ledger_damaged"


class LedgerInUse(LedgerError):
    """A process has the ledger open (a running node): it cannot be checked or restored now."""

    code = "ledger_unavailable"


class StorageError(LedgerError):
    """The disk refused a read or write (I/O error); the transaction was rolled back whole."""

    code = "storage_error"


class StorageFull(StorageError):
    """The disk (or the database's size limit) is full; the transaction was rolled back whole."""

    code = "storage_full"


class StorageReadOnly(StorageError):
    """The file or its disk is read-only; the transaction was rolled back whole."""

    code = "storage_readonly"


_CORRUPT, _NOTADB, _FULL, _READONLY, _IOERR, _CANTOPEN, _PERM = 11, 26, 13, 8, 10, 14, 3


def _fault(exc: sqlite3.Error, path: Path) -> LedgerError | None:
    """The ledger error an sqlite error means, or ``None`` for one that is not about the file
    (a constraint, a misuse: the caller's to handle)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if primary in (_CORRUPT, _NOTADB):
        return LedgerDamaged(f"{path} is damaged ({exc}): money operations are refused; {RECOVERY}")
    if primary == _FULL:
        return StorageFull(f"{path}: the disk is full ({exc}); nothing was applied")
    if primary == _READONLY:
        return StorageReadOnly(f"{path} is read-only ({exc}); nothing was applied")
    if primary in (_IOERR, _CANTOPEN, _PERM):
        return StorageError(f"{path}: the disk failed ({exc}); nothing was applied")
    return None


def _private_new(path: Path) -> None:
    """Create ``path`` empty, 0600, failing if anything is there (a link included)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _open_lock(path: Path, mode: int) -> int:
    """An fd of ``path``'s lock file holding a ``flock`` of ``mode``.

    Raises:
        LedgerInUse: another holder's lock conflicts.
    """
    fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        what = "is being checked or restored" if mode == fcntl.LOCK_SH else "is open in a running node: stop it first"
        raise LedgerInUse(f"{path} {what}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def hold_exclusive(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``path`` (a ledger file) so that no ``Ledger`` can open it meanwhile.

    Raises:
        LedgerInUse: a process (a running node) has it open.
    """
    path = Path(path)
    fd = _open_lock(path, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        os.close(fd)


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=30)


def _problems(db: sqlite3.Connection, pragma: str) -> tuple[str, ...]:
    """What ``PRAGMA quick_check`` / ``integrity_check`` reports (empty: ok), at most 10 lines."""
    rows = [str(r[0]) for r in db.execute(f"PRAGMA {pragma}(10)")]
    return () if rows == ["ok"] else tuple(rows)


def _invariant(db: sqlite3.Connection) -> dict[str, int]:
    """The totals, once the invariant is verified through ``db`` (inside a read).

    Raises:
        InvariantViolation: with what does not add up.
    """
    t = Ledger._totals(db)
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


class Batch:
    """The requests of one group commit (``Ledger.batch``), each in a savepoint of its own."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @contextmanager
    def each(self, request_id: bytes) -> Iterator[Tx]:
        """One request's part: undone alone (and re-raised) when its block raises."""
        self.db.execute("SAVEPOINT request")
        try:
            yield Tx(self.db, request_id)
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled the whole transaction back itself (full disk)
                self.db.execute("ROLLBACK TO request")
                self.db.execute("RELEASE request")
            raise
        self.db.execute("RELEASE request")


class Ledger:
    """The ledger file. Thread-safe: one connection, one lock, one transaction at a time."""

    def __init__(self, path: str | Path) -> None:
        """Open (and create, or migrate) the ledger, then ``verify`` it.

        Raises:
            LedgerDamaged: not a database, or damaged where opening must read (its schema).
            StorageError: the disk refuses (full, read-only, I/O error) what opening must write.
            LedgerInUse: it is being checked or restored (``hold_exclusive``).
            LedgerError: it cannot be opened, or has a newer schema than this build knows.
        """
        self.path = Path(path)
        self.damage: str | None = None  # why money operations are refused, once damaged
        self.storage_fault: str | None = None  # the code of the storage episode going on
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _open_lock(self.path, fcntl.LOCK_SH)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot open the ledger ({exc.strerror or exc})") from exc
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
            except BaseException:
                self.db.close()
                raise
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            fault = _fault(exc, self.path) or LedgerError(f"{self.path}: not a usable ledger ({exc})")
            if isinstance(fault, LedgerDamaged):
                fault = LedgerDamaged(f"{self.path} is not a usable ledger ({exc}); {RECOVERY}")
            raise fault from exc
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.verify()

    def close(self) -> None:
        self.db.close()
        os.close(self._lock_fd)

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

    # ---- faults -----------------------------------------------------------------------------

    def _damaged(self, why: str) -> LedgerDamaged:
        """Mark the ledger damaged (logged the first time); the error to raise."""
        if self.damage is None:
            self.damage = why
            _logger.error("escrow ledger damaged: %s", why)
        return LedgerDamaged(why)

    def _translate(self, exc: sqlite3.Error) -> LedgerError | None:
        """The ledger error for ``exc`` (damage marked, a storage episode logged once), or ``None``."""
        fault = _fault(exc, self.path)
        if isinstance(fault, LedgerDamaged):
            return self._damaged(str(fault))
        if isinstance(fault, StorageError) and self.storage_fault != fault.code:
            self.storage_fault = fault.code
            _logger.error("escrow ledger cannot write: %s (logged once until a write succeeds)", fault)
        return fault

    def _rollback(self) -> None:
        if self.db.in_transaction:  # SQLite may have rolled back itself (full disk, I/O error)
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:  # the connection is beyond rolling back; SQLite's journal still is not
                pass

    def verify(self) -> str | None:
        """``PRAGMA quick_check`` now, through a read-only connection of its own (the ledger's
        lock is not held: writes go on meanwhile); a damaged file is marked (``damage``).

        Returns:
            What is wrong (``None``: nothing found).
        """
        try:
            db = _read_only(self.path)
            try:
                problems = _problems(db, "quick_check")
            finally:
                db.close()
        except sqlite3.Error as exc:
            fault = _fault(exc, self.path)
            if not isinstance(fault, LedgerDamaged):
                _logger.warning("escrow ledger %s: cannot run its integrity check: %s", self.path, exc)
                return None
            problems = (str(exc),)
        if not problems:
            return None
        why = f"{self.path} fails SQLite's integrity check ({'; '.join(problems)[:300]}): money operations are refused; {RECOVERY}"
        self._damaged(why)
        return why

    # ---- transactions -----------------------------------------------------------------------

    @contextmanager
    def transaction(self, request_id: bytes) -> Iterator[Tx]:
        """All or nothing: commit (durably) when the block ends, roll back if it raises.

        Raises:
            LedgerDamaged: the ledger is damaged (nothing is tried), or a damaged page was read.
            StorageError: the disk refused (full, read-only, I/O error); nothing was applied.
        """
        with self._committing() as db:
            yield Tx(db, request_id)

    @contextmanager
    def batch(self) -> Iterator["Batch"]:
        """Group commit: several requests' transactions (``Batch.each``) in one SQLite transaction,
        so one fsync makes them all durable. All or nothing as a whole: when the block raises or
        the commit fails, none of them was applied; a request that fails inside its own
        ``each`` is undone alone.

        Raises:
            As ``transaction``.
        """
        with self._committing() as db:
            yield Batch(db)

    @contextmanager
    def _committing(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self.damage is not None:
                raise LedgerDamaged(self.damage)
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                except BaseException:
                    self._rollback()
                    raise
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                fault = self._translate(exc)
                if fault is None:
                    raise
                raise fault from exc
            except LedgerDamaged as exc:  # a stored value that does not decode (``_escrow_store``)
                raise self._damaged(f"{self.path}: {exc}; money operations are refused; {RECOVERY}") from exc
            if self.storage_fault is not None:
                _logger.warning("escrow ledger %s writes again (after %s)", self.path, self.storage_fault)
                self.storage_fault = None

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A consistent read of the current state (tried even when the ledger is damaged).

        Raises:
            LedgerDamaged: a damaged page was read. StorageError: the disk failed the read.
        """
        with self._lock:
            try:
                self.db.execute("BEGIN")
                try:
                    yield self.db
                finally:
                    self._rollback()
            except sqlite3.Error as exc:
                fault = self._translate(exc)
                if fault is None:
                    raise
                raise fault from exc
            except LedgerDamaged as exc:
                raise self._damaged(f"{self.path}: {exc}; money operations are refused; {RECOVERY}") from exc

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
            return _invariant(db)

    # ---- backups ----------------------------------------------------------------------------

    def backup(self, now: int, keep: int = 24, folder: Path | None = None) -> "Backup":
        """Copy the ledger with SQLite's online backup API into ``folder`` (default
        ``ledger_backup_folder(path)``), verify the copy, then drop the oldest beyond ``keep``.

        Returns:
            The new backup.

        Raises:
            LedgerDamaged: the ledger is damaged (no backup of it is taken), or the copy fails
                its verification (it is removed; older backups are kept).
            StorageError, OSError: the copy could not be written.
        """
        if self.damage is not None:
            raise LedgerDamaged(self.damage)
        folder = ledger_backup_folder(self.path) if folder is None else folder
        folder.mkdir(mode=0o700, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        final = folder / f"{self.path.stem}-{stamp}.db"
        n = 1
        while final.exists():
            final, n = folder / f"{self.path.stem}-{stamp}-{n}.db", n + 1
        part = final.with_name(final.name + ".part")
        part.unlink(missing_ok=True)
        _private_new(part)
        try:
            try:
                _copy(self.path, part)
            except sqlite3.Error as exc:
                raise (self._translate(exc) or LedgerError(f"backup of {self.path} failed: {exc}")) from exc
            report = check_ledger_file(part, full=True)
            if not report.ok:
                raise LedgerDamaged(f"the backup of {self.path} failed its verification ({report.problem}); "
                                    "older backups are kept")
            os.replace(part, final)
        except BaseException:
            for leftover in (part, part.with_name(part.name + "-journal")):
                leftover.unlink(missing_ok=True)
            raise
        _fsync_folder(folder)
        backups = list_ledger_backups(self.path, folder)
        for old in backups[:-keep] if keep > 0 else []:
            old.path.unlink(missing_ok=True)
        return next(b for b in list_ledger_backups(self.path, folder) if b.path == final)


def _copy(source: Path, target: Path) -> None:
    """``source`` into the (empty, 0600) ``target`` through the online backup API, in one step
    (one consistent snapshot), left as a plain single-file database (no ``-wal``)."""
    src = _read_only(source)
    try:
        dst = sqlite3.connect(target, isolation_level=None)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ledger_backup_folder(path: str | os.PathLike[str]) -> Path:
    """Where the backups of the ledger at ``path`` go: ``<stem>-backups`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}-backups")


@dataclasses.dataclass(frozen=True)
class Backup:
    """One backup file and when it was taken (unix seconds, from its name)."""

    path: Path
    taken_at: int


def list_ledger_backups(path: str | os.PathLike[str], folder: Path | None = None) -> list[Backup]:
    """The backups of the ledger at ``path``, oldest first (only files named as ``backup`` names them)."""
    path = Path(path)
    folder = ledger_backup_folder(path) if folder is None else folder
    pattern = re.compile(re.escape(path.stem) + r"-(\d{8}T\d{6}Z)(?:-(\d+))?\.db")
    found = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            taken = calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%SZ"))
            found.append((taken, int(m.group(2) or 0), Backup(folder / name, taken)))
    return [b for _, _, b in sorted(found, key=lambda t: (t[0], t[1]))]


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """What ``check_ledger_file`` found: SQLite's integrity check, then the money invariant."""

    path: Path
    integrity: tuple[str, ...]  # empty: ok
    totals: dict[str, int] | None  # the invariant's totals; None when not reached or violated
    invariant: str | None  # what does not add up; None when it holds (or was not reached)

    @property
    def ok(self) -> bool:
        return not self.integrity and self.invariant is None and self.totals is not None

    @property
    def problem(self) -> str | None:
        if self.integrity:
            return "; ".join(self.integrity)
        return self.invariant


def check_ledger_file(path: str | os.PathLike[str], full: bool = True) -> FileCheck:
    """Check a ledger file read-only: ``PRAGMA integrity_check`` (``quick_check`` unless ``full``),
    then, if that passes, the invariant. For a file no node has open (``hold_exclusive``), or a backup.

    Raises:
        LedgerError: there is no file at ``path``. StorageError: the disk failed the read.
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"no ledger file at {path}")
    try:
        db = _read_only(path)
        try:
            integrity = _problems(db, "integrity_check" if full else "quick_check")
            if integrity:
                return FileCheck(path, integrity, None, None)
            db.execute("BEGIN")
            try:
                return FileCheck(path, (), _invariant(db), None)
            except InvariantViolation as exc:
                return FileCheck(path, (), None, str(exc))
            finally:
                db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as exc:
        fault = _fault(exc, path)
        if isinstance(fault, StorageError):
            raise fault from exc
        return FileCheck(path, (str(exc),), None, None)


def _raise_refusal_horizon(path: Path, now: int) -> None:
    """Date the escrow's refusal horizon (``_escrow_store``) ``now`` in the file at ``path``."""
    from ._escrow_store import EscrowStore  # it imports this module

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        EscrowStore(db).set_refused_through(now)
        db.execute("COMMIT")
    finally:
        db.close()


def restore_ledger(path: str | os.PathLike[str], backup: str | os.PathLike[str], now: int) -> Path:
    """Put ``backup`` in the place of the ledger at ``path``, keeping what was there aside.

    The backup is verified first; the ledger file and its ``-wal``/``-shm`` (a stale log must
    never meet the restored file) move to ``<name>.damaged-<time>[...]``, never deleted; the
    backup is copied in (0600) through the backup API and verified again. The escrow's refusal
    horizon is dated ``now``: a request signed before the restore that the backup has no record
    of (refused, or applied after the backup) is ``stale_request``, never applied by a replay.

    Returns:
        Where the old ledger file now is (``path`` itself when there was none).

    Raises:
        LedgerInUse: a running node has the ledger open.
        LedgerDamaged: the backup fails its check (nothing was moved).
        LedgerError, OSError: the backup is missing, or a file could not be moved or written.
    """
    path, backup = Path(path), Path(backup)
    report = check_ledger_file(backup, full=True)
    if not report.ok:
        raise LedgerDamaged(f"the backup {backup} fails its check ({report.problem}); nothing was changed")
    with hold_exclusive(path):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        n = 1
        while any(aside.with_name(aside.name + s).exists() for s in ("", "-wal", "-shm")):
            aside, n = path.with_name(f"{path.name}.damaged-{stamp}-{n}"), n + 1
        had = path.exists()
        for suffix in ("", "-wal", "-shm", "-journal"):
            f = path.with_name(path.name + suffix)
            if f.exists():
                os.rename(f, aside.with_name(aside.name + suffix))
        part = path.with_name(path.name + ".restoring")
        part.unlink(missing_ok=True)
        _private_new(part)
        try:
            _copy(backup, part)
            _raise_refusal_horizon(part, now)
            again = check_ledger_file(part, full=True)
            if not again.ok:
                raise LedgerDamaged(f"the restored copy of {backup} fails its check ({again.problem})")
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)
    return aside if had else path
