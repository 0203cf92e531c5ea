"""Both sides keep every doubly-signed receipt: the provider's vouchers, the consumer's proof;
and the provider keeps the escrow agent's word on what it paid (``claims``).

SQLite (WAL, synchronous=FULL) in ``HOME/receipts.db``; writes run in a worker thread.

- ``receipts``: every counter-signed receipt, with its settlement state (``claimed``: 0 owed,
  1 paid, 2 forfeited: its channel can never pay it).
- ``claims``: one row per payment the agent confirmed (``paid``: what its answer said it paid,
  and ``channel_claimed``: the channel's total paid after it), and per receipt given up (its
  ``forfeited`` amount). When the agent reports a channel total above what the rows here add up
  to (a payment whose answer was lost, a claim made by hand, a close before a crash), a
  ``reconciled`` row records the difference, so the rows of a channel add up to what its agent
  paid (``record_claim``; the caller settles one channel at a time).
- Every failure to read or write is a ``ReceiptStoreError`` naming the file and SQLite's reason
  (a full disk, a read-only file); the first failure after a success is logged at error level,
  once, and the recovery at info.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import trio

import protocol

from ._clock import SYSTEM_WALL_CLOCK, WallClock
from ._errors import LocalError
from ._home import private_file

__all__ = ["ReceiptStore", "ReceiptStoreError", "ReceiptPage", "Earnings", "OWED", "PAID", "FORFEITED"]

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")
OWED, PAID, FORFEITED = 0, 1, 2  # receipts.claimed


class ReceiptStoreError(LocalError):
    """``receipts.db`` could not be opened, read or written (full disk, read-only file, damage)."""


@dataclasses.dataclass(frozen=True)
class ReceiptPage:
    """One page of receipts, newest first: ``total`` held in all, ``has_more`` past this page."""

    receipts: list[dict[str, Any]]
    total: int
    limit: int
    offset: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.receipts) < self.total

    def to_json(self) -> dict[str, Any]:
        return {"receipts": self.receipts, "total": self.total, "limit": self.limit, "offset": self.offset,
                "has_more": self.has_more}


@dataclasses.dataclass(frozen=True)
class Earnings:
    """A provider's money, integer µc: ``signed`` (counter-signed, all sessions), ``paid`` (what
    agents confirmed paying), ``forfeited`` (given up: channels that can no longer pay), and
    ``pending`` = signed - paid - forfeited (what settlement is still collecting)."""

    signed: int
    paid: int
    forfeited: int

    @property
    def pending(self) -> int:
        return max(0, self.signed - self.paid - self.forfeited)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id BLOB PRIMARY KEY,
    session_id BLOB NOT NULL,
    call_seq INTEGER NOT NULL,
    role TEXT NOT NULL,            -- 'provider' or 'consumer': which side this node was
    peer TEXT NOT NULL,            -- the other party
    model TEXT NOT NULL,
    agent TEXT NOT NULL,
    channel_id BLOB NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    cumulative INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    claimed INTEGER NOT NULL DEFAULT 0,
    latency_ms INTEGER,            -- provider side: request received to receipt sent
    receipt BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_by_session ON receipts(session_id, call_seq);
CREATE TABLE IF NOT EXISTS claims (
    claim_id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    channel_id BLOB NOT NULL,
    session_id BLOB,               -- NULL for a 'reconciled' row
    cumulative INTEGER NOT NULL,   -- the receipt claimed (0 for a 'reconciled' row)
    paid INTEGER NOT NULL,         -- what the agent said it paid
    forfeited INTEGER NOT NULL DEFAULT 0,  -- 'forfeited' rows: what was given up
    channel_claimed INTEGER,       -- the channel's total paid, as the agent reported with it
    how TEXT NOT NULL,             -- 'claim', 'close', 'reconciled', 'forfeited' or 'migrated'
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_by_channel ON claims(channel_id);
CREATE INDEX IF NOT EXISTS claims_by_time ON claims(at);
"""


class ReceiptStore:
    def __init__(self, path: Path, clock: WallClock = SYSTEM_WALL_CLOCK) -> None:
        """``clock``: seconds since the epoch, for each receipt's ``stored_at``.

        Raises:
            ReceiptStoreError: the file cannot be opened or set up (one line: the file and why).
        """
        self._clock = clock
        self.path = path
        self._failing = False  # the last write failed (logged once, until one succeeds)
        try:
            self.db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False)  # 0600
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=10000")  # the consumer's delivery queue writes the same file
            self.db.executescript(_SCHEMA)
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise ReceiptStoreError(f"cannot open the receipt store {path}: {_reason(exc)}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        """A store from before ``claims`` existed: what it marked paid becomes one ``migrated`` row
        per channel (once), so its earnings do not count those receipts as pending."""
        if self.db.execute("SELECT 1 FROM claims LIMIT 1").fetchone() is not None:
            return
        self.db.execute(
            "INSERT INTO claims(agent, channel_id, session_id, cumulative, paid, how, at) "
            "SELECT agent, channel_id, NULL, 0, SUM(top), 'migrated', MAX(at) FROM ("
            "  SELECT agent, channel_id, MAX(cumulative) AS top, MAX(stored_at) AS at FROM receipts "
            "  WHERE role = 'provider' AND claimed = 1 GROUP BY session_id) GROUP BY channel_id")

    def _write(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` (a write, under the lock) and translate SQLite's failure once, here.

        Raises:
            ReceiptStoreError: naming the file and SQLite's reason.
        """
        try:
            with self._lock:
                out = fn()
        except sqlite3.Error as exc:
            error = ReceiptStoreError(f"cannot {what} in {self.path}: {_reason(exc)}")
            if not self._failing:
                self._failing = True
                _logger.error("receipt store write failed: %s", error)
            raise error from exc
        if self._failing:
            self._failing = False
            _logger.info("receipt store %s writable again", self.path)
        return out

    def _read(self, fn: Callable[[], _T]) -> _T:
        try:
            with self._lock:
                return fn()
        except sqlite3.Error as exc:
            raise ReceiptStoreError(f"cannot read {self.path}: {_reason(exc)}") from exc

    def _put(self, receipt: protocol.Receipt, role: str, latency_ms: int | None) -> None:
        peer = receipt.consumer if role == "provider" else receipt.provider
        self._write("store a receipt", lambda: self.db.execute(
            "INSERT OR IGNORE INTO receipts(receipt_id, session_id, call_seq, role, peer, model, agent, channel_id, "
            "tokens_in, tokens_out, cost, cumulative, stored_at, latency_ms, receipt) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (protocol.receipt_hash(receipt), receipt.session_id, receipt.call_seq, role, peer, receipt.model,
             receipt.agent, receipt.channel_id, receipt.tokens_in, receipt.tokens_out, receipt.cost,
             receipt.cumulative, int(self._clock()), latency_ms, protocol.encode(receipt))))

    async def put(self, receipt: protocol.Receipt, role: str, latency_ms: int | None = None) -> None:
        """Store ``receipt`` (as ``role``: which side this node was).

        Raises:
            ReceiptStoreError: it could not be written (logged).
        """
        await trio.to_thread.run_sync(self._put, receipt, role, latency_ms)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read for reports (earnings, stats)."""
        return self._read(lambda: self.db.execute(sql, args).fetchall())

    def mark_claimed(self, receipt: protocol.Receipt, state: int = PAID) -> None:
        """Every receipt of ``receipt``'s session up to its cumulative is ``state`` (paid, or forfeited)."""
        self._write("mark a receipt settled", lambda: self.db.execute(
            "UPDATE receipts SET claimed = ? WHERE session_id = ? AND cumulative <= ? AND claimed = 0",
            (state, receipt.session_id, receipt.cumulative)))

    def record_claim(self, agent: str, channel_id: bytes, session_id: bytes | None, cumulative: int, paid: int, *,
                     channel_claimed: int | None = None, how: str = "claim", forfeited: int = 0) -> int:
        """Record the agent's word: it paid ``paid`` for the session's receipt up to ``cumulative``
        (or, ``how='forfeited'``, that ``forfeited`` µc of it will never be paid). With
        ``channel_claimed`` (the channel's total paid, as the agent reported), a ``reconciled``
        row adds whatever the agent paid that no row here records. One transaction.

        Returns:
            The µc reconciled (0 when the rows already added up).
        """
        def write() -> int:
            now = int(self._clock())
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if how != "reconciled":  # a reconciliation alone records only the difference, if any
                    self.db.execute(
                        "INSERT INTO claims(agent, channel_id, session_id, cumulative, paid, forfeited, "
                        "channel_claimed, how, at) VALUES (?,?,?,?,?,?,?,?,?)",
                        (agent, channel_id, session_id, cumulative, paid, forfeited, channel_claimed, how, now))
                gap = 0
                if channel_claimed is not None:
                    (known,), = self.db.execute("SELECT COALESCE(SUM(paid), 0) FROM claims WHERE channel_id = ?",
                                                (channel_id,)).fetchall()
                    gap = channel_claimed - int(known)
                    if gap > 0:
                        self.db.execute(
                            "INSERT INTO claims(agent, channel_id, session_id, cumulative, paid, channel_claimed, how,"
                            " at) VALUES (?,?,NULL,0,?,?,'reconciled',?)", (agent, channel_id, gap, channel_claimed, now))
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            return max(0, gap)

        return self._write("record a claim", write)

    def paid_on_channel(self, channel_id: bytes) -> int:
        """What this node's rows say the channel's agent has paid on it."""
        (n,), = self.query("SELECT COALESCE(SUM(paid), 0) FROM claims WHERE channel_id = ?", (channel_id,))
        return int(n)

    def signed_on_channel(self, channel_id: bytes) -> int:
        """µc counter-signed on the channel to this node as provider: each session's latest cumulative."""
        (n,), = self.query(
            "SELECT COALESCE(SUM(top), 0) FROM (SELECT MAX(cumulative) AS top FROM receipts "
            "WHERE role = 'provider' AND channel_id = ? GROUP BY session_id)", (channel_id,))
        return int(n)

    def earnings(self, since: int = 0) -> Earnings:
        """All-time ``signed``; ``paid`` and ``forfeited`` recorded at or after ``since``."""
        (signed,), = self.query(
            "SELECT COALESCE(SUM(top), 0) FROM (SELECT MAX(cumulative) AS top FROM receipts "
            "WHERE role = 'provider' GROUP BY session_id)")
        (paid, forfeited), = self.query(
            "SELECT COALESCE(SUM(paid), 0), COALESCE(SUM(forfeited), 0) FROM claims WHERE at >= ?", (since,))
        return Earnings(int(signed), int(paid), int(forfeited))

    def claims(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The agents' confirmed payments and what was given up, newest first."""
        rows = self.query("SELECT agent, channel_id, session_id, cumulative, paid, forfeited, channel_claimed, how, at "
                          "FROM claims ORDER BY claim_id DESC LIMIT ?", (limit,))
        return [{"agent": a, "channel_id": bytes(c).hex(), "session_id": bytes(s).hex() if s is not None else None,
                 "cumulative": cum, "paid": p, "forfeited": f, "channel_claimed": cc, "how": how, "at": at}
                for a, c, s, cum, p, f, cc, how, at in rows]

    def has_session(self, session_id: bytes) -> bool:
        """Whether any receipt of ``session_id`` is held."""
        return self._read(lambda: self.db.execute("SELECT 1 FROM receipts WHERE session_id = ? LIMIT 1",
                                                  (session_id,)).fetchone()) is not None

    def unclaimed(self, role: str, limit: int = 100_000) -> list[protocol.Receipt]:
        """The newest receipt of each session (as ``role``) not yet paid or forfeited: what the
        agent still owes, after a restart."""
        rows = self.query(
            "SELECT receipt FROM receipts r WHERE role = ? AND claimed = 0 AND cumulative = "
            "(SELECT MAX(cumulative) FROM receipts WHERE session_id = r.session_id) LIMIT ?", (role, limit))
        return [protocol.decode(bytes(blob), expect=(protocol.Receipt,)) for (blob,) in rows]

    def list(self, session_id: bytes | None = None, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
        """Receipts in the order they were stored (of ``session_id``, or all)."""
        return self._rows(session_id, limit, offset, newest_first=False)

    def page(self, session_id: bytes | None = None, limit: int = 50, offset: int = 0) -> ReceiptPage:
        """One page of receipts, newest first, and how many there are in all."""
        where, args = (" WHERE session_id = ?", (session_id,)) if session_id is not None else ("", ())
        (total,), = self.query("SELECT COUNT(*) FROM receipts" + where, args)
        return ReceiptPage(self._rows(session_id, limit, offset, newest_first=True), int(total), limit, offset)

    def _rows(self, session_id: bytes | None, limit: int, offset: int, newest_first: bool) -> list[dict[str, Any]]:
        query = "SELECT receipt, role, claimed FROM receipts"
        args: tuple[Any, ...] = ()
        if session_id is not None:
            query += " WHERE session_id = ?"
            args = (session_id,)
        query += f" ORDER BY rowid {'DESC' if newest_first else 'ASC'} LIMIT ? OFFSET ?"  # the order they were stored in
        rows = self.query(query, args + (limit, offset))
        out = []
        for blob, role, claimed in rows:
            r = protocol.decode(bytes(blob), expect=(protocol.Receipt,))
            out.append(receipt_json(r) | {"role": role, "claimed": claimed == PAID, "forfeited": claimed == FORFEITED,
                                          "encoded": bytes(blob).hex()})
        return out


def _reason(exc: BaseException) -> str:
    """SQLite's (or the OS's) reason, in words: 'database or disk is full', 'attempt to write a readonly database'."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def receipt_json(r: protocol.Receipt) -> dict[str, Any]:
    return {
        "receipt_id": protocol.receipt_hash(r).hex(),
        "session_id": r.session_id.hex(),
        "call_seq": r.call_seq,
        "model": r.model,
        "provider": r.provider,
        "consumer": r.consumer,
        "agent": r.agent,
        "channel_id": r.channel_id.hex(),
        "tokens_in": r.tokens_in,
        "tokens_out": r.tokens_out,
        "finish_reason": r.finish_reason,
        "input_price": r.price.input_per_1k,
        "output_price": r.price.output_per_1k,
        "cost": r.cost,
        "cumulative": r.cumulative,
        "prev_hash": r.prev_hash.hex(),
        "input_hash": r.input_hash.hex(),
        "output_hash": r.output_hash.hex(),
        "issued_at": r.issued_at,
        "discount_permille": r.discount_permille,
        "provider_sig": r.provider_sig.hex(),
        "consumer_sig": r.consumer_sig.hex(),
    }
