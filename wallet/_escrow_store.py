"""The escrow's records in the ledger file: channels, their per-session claims, budgets, their
members, the request records that make every request apply at most once, and the refusal
horizon (``meta.escrow_refused_through``: no refusal kept only in memory was issued later).

Rules this module owns:
- It is the only place SQL about those tables is written (the table layouts are the ledger's
  schema, ``_ledger._MIGRATIONS``; this module changes none of them).
- It reads and writes through the connection it is given, inside a transaction or a read the
  caller opened (``Ledger.transaction`` / ``Ledger.reading``); it never begins, commits or
  rolls back one (``savepoint`` only nests inside the caller's).
- It decides nothing: no signature, freshness, cap, expiry or ownership check lives here
  (``_escrow.EscrowAgent`` holds the rules). Missing rows are ``None``, never an error.
- It never moves money: balances change only through ``Tx.transfer``. It may read them.
A stored value that no longer decodes (a damaged page SQLite's checks did not catch) is
``LedgerDamaged`` (``_stored``), which the ledger marks as damage like SQLite's own.
Rows are frozen; protocol values (grants, answers, receipts) are encoded and decoded here, so
the rules see typed values only. Amounts are integer micro-credits.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from contextlib import contextmanager
from typing import Iterator

import protocol
from protocol import ChannelGrant, ChannelState, EscrowResponse, Receipt

from ._ledger import LedgerDamaged, read_balance

__all__ = ["ChannelRow", "BudgetRow", "RequestRecord", "EscrowStore"]

_CHANNEL_COLUMNS = "channel_id, consumer, provider, cap, expires_at, budget_id, claimed, status, grant_"
_BUDGET_COLUMNS = "budget_id, funder, amount, per_session_limit, expires_at, status"
_REQUEST_COLUMNS = "request_id, kind, party, digest, applied_at, answer"



def _stored(data: bytes, cls: type) -> object:
    """A protocol value as stored.

    Raises:
        LedgerDamaged: the bytes are not one (a page was damaged).
    """
    try:
        return protocol.decode(data, expect=(cls,))
    except protocol.ProtocolError as exc:
        raise LedgerDamaged(f"a stored {cls.KIND} does not decode ({exc}): the ledger is damaged") from exc

@dataclasses.dataclass(frozen=True)
class ChannelRow:
    """One row of ``channels``. ``status`` is ``open``, ``closed`` or ``refunded``; ``grant`` is
    the agent's signed grant for the current cap and expiry."""

    channel_id: bytes
    consumer: str
    provider: str
    cap: int
    expires_at: int
    budget_id: bytes | None
    claimed: int
    status: str
    grant: ChannelGrant

    def state(self) -> ChannelState:
        """The channel as an answer shows it."""
        return ChannelState(channel=self.grant, claimed=self.claimed, status=self.status)


@dataclasses.dataclass(frozen=True)
class BudgetRow:
    """One row of ``budgets``. ``status`` is ``active`` or ``refunded``; the whitelist is kept
    apart (``EscrowStore.members``)."""

    budget_id: bytes
    funder: str
    amount: int
    per_session_limit: int
    expires_at: int
    status: str


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One row of ``ops``: a request applied (or refused) once, with its first answer.

    ``digest`` is the sha256 of the signed request; an internal operation (a sweep) records an
    empty digest and no answer (``None``, stored as empty bytes).
    """

    request_id: bytes
    kind: str
    party: str
    digest: bytes
    applied_at: int
    answer: EscrowResponse | None


class EscrowStore:
    """The escrow's tables, seen through one connection inside the caller's transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        """Args:
            db: the connection of an open ``Ledger.transaction`` (``tx.db``) or
                ``Ledger.reading`` block; writes need the former.
        """
        self.db = db

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Undo everything written inside the block if it raises; the enclosing transaction
        goes on (and may record the refusal).

        Raises:
            Whatever the block raised, after undoing its writes.
        """
        self.db.execute("SAVEPOINT op")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK TO op")
            self.db.execute("RELEASE op")
            raise
        self.db.execute("RELEASE op")

    def held(self, account: str) -> int:
        """What a ledger account holds now (0 for one never used)."""
        return read_balance(self.db, account)

    # ---- request records ----------------------------------------------------------------------

    def request(self, request_id: bytes) -> RequestRecord | None:
        """The record of a request id, or ``None`` if it was never applied."""
        row = self.db.execute(f"SELECT {_REQUEST_COLUMNS} FROM ops WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        answer = bytes(row[5])
        return RequestRecord(
            request_id=bytes(row[0]), kind=row[1], party=row[2], digest=bytes(row[3]), applied_at=int(row[4]),
            answer=_stored(answer, EscrowResponse) if answer else None)

    def record_request(self, record: RequestRecord, if_absent: bool = False) -> None:
        """Record a request as applied.

        Args:
            record: the request and its first answer.
            if_absent: keep an existing record of the same id instead of failing.

        Raises:
            sqlite3.IntegrityError: the id is recorded already and ``if_absent`` is false.
        """
        verb = "INSERT OR IGNORE" if if_absent else "INSERT"
        answer = b"" if record.answer is None else protocol.encode(record.answer)
        self.db.execute(f"{verb} INTO ops({_REQUEST_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                        (record.request_id, record.kind, record.party, record.digest, record.applied_at, answer))

    def refused_through(self) -> int:
        """The latest ``issued_at`` of any refusal the agent kept only in memory (0 if none)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'escrow_refused_through'").fetchone()
        return int(row[0]) if row else 0

    def set_refused_through(self, issued_at: int) -> None:
        """Record that refusals kept only in memory were issued at ``issued_at`` or earlier."""
        self.db.execute("INSERT INTO meta(key, value) VALUES ('escrow_refused_through', ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)", (issued_at,))

    # ---- channels -----------------------------------------------------------------------------

    @staticmethod
    def _channel_row(row: tuple) -> ChannelRow:
        return ChannelRow(
            channel_id=bytes(row[0]), consumer=row[1], provider=row[2], cap=int(row[3]), expires_at=int(row[4]),
            budget_id=None if row[5] is None else bytes(row[5]), claimed=int(row[6]), status=row[7],
            grant=_stored(bytes(row[8]), ChannelGrant))

    def channel(self, channel_id: bytes) -> ChannelRow | None:
        """The channel, or ``None`` if there is none with this id."""
        row = self.db.execute(f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,)).fetchone()
        return None if row is None else self._channel_row(row)

    def channels(self) -> list[ChannelRow]:
        """Every channel, oldest first."""
        return [self._channel_row(r) for r in self.db.execute(f"SELECT {_CHANNEL_COLUMNS} FROM channels ORDER BY rowid")]

    def channels_of(self, party: str, last: int) -> list[ChannelRow]:
        """The newest ``last`` channels where ``party`` is consumer or provider, oldest first."""
        rows = self.db.execute(
            f"SELECT {_CHANNEL_COLUMNS} FROM (SELECT rowid AS r, * FROM channels WHERE consumer = ? OR provider = ? "
            "ORDER BY rowid DESC LIMIT ?) ORDER BY r", (party, party, last))
        return [self._channel_row(r) for r in rows]

    def open_channels_expired_by(self, now: int) -> list[bytes]:
        """Ids of the open channels whose expiry is ``now`` or earlier."""
        return [bytes(r[0]) for r in self.db.execute(
            "SELECT channel_id FROM channels WHERE status = 'open' AND expires_at <= ?", (now,))]

    def insert_channel(self, row: ChannelRow) -> None:
        """Record a new channel.

        Raises:
            sqlite3.IntegrityError: a channel with this id exists.
        """
        self.db.execute(
            f"INSERT INTO channels({_CHANNEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.channel_id, row.consumer, row.provider, row.cap, row.expires_at, row.budget_id, row.claimed,
             row.status, protocol.encode(row.grant)))

    def set_terms(self, grant: ChannelGrant) -> None:
        """Give a channel the cap and expiry of a new grant, and keep the grant."""
        self.db.execute("UPDATE channels SET cap = ?, expires_at = ?, grant_ = ? WHERE channel_id = ?",
                        (grant.cap, grant.expires_at, protocol.encode(grant), grant.channel_id))

    def add_claimed(self, channel_id: bytes, paid: int) -> None:
        """Count ``paid`` more as claimed from the channel."""
        self.db.execute("UPDATE channels SET claimed = claimed + ? WHERE channel_id = ?", (paid, channel_id))

    def set_channel_status(self, channel_id: bytes, status: str) -> None:
        self.db.execute("UPDATE channels SET status = ? WHERE channel_id = ?", (status, channel_id))

    def session_claimed(self, channel_id: bytes, session_id: bytes) -> int:
        """The cumulative already claimed for one session of a channel (0 if none)."""
        row = self.db.execute("SELECT claimed FROM channel_sessions WHERE channel_id = ? AND session_id = ?",
                              (channel_id, session_id)).fetchone()
        return int(row[0]) if row else 0

    def record_session_claim(self, receipt: Receipt) -> None:
        """Keep ``receipt`` as the last one claimed for its session; its cumulative is now claimed."""
        self.db.execute(
            "INSERT INTO channel_sessions(channel_id, session_id, claimed, receipt) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(channel_id, session_id) DO UPDATE SET claimed = excluded.claimed, receipt = excluded.receipt",
            (receipt.channel_id, receipt.session_id, receipt.cumulative, protocol.encode(receipt)))

    def locked_in_channels(self, consumer: str) -> int:
        """What the channels ``consumer`` funded itself (not from a budget) hold now."""
        return int(self.db.execute(
            "SELECT COALESCE(SUM(a.balance), 0) FROM channels c "
            "JOIN accounts a ON a.name = 'channel:' || lower(hex(c.channel_id)) "
            "WHERE c.consumer = ? AND c.budget_id IS NULL", (consumer,)).fetchone()[0])

    # ---- budgets ------------------------------------------------------------------------------

    def budget(self, budget_id: bytes) -> BudgetRow | None:
        """The budget, or ``None`` if there is none with this id."""
        row = self.db.execute(f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE budget_id = ?", (budget_id,)).fetchone()
        if row is None:
            return None
        return BudgetRow(budget_id=bytes(row[0]), funder=row[1], amount=int(row[2]), per_session_limit=int(row[3]),
                         expires_at=int(row[4]), status=row[5])

    def budget_ids_of(self, party: str, last: int) -> list[bytes]:
        """Ids of the newest ``last`` budgets ``party`` funds or is whitelisted on, oldest first."""
        ids = [bytes(r[0]) for r in self.db.execute(
            "SELECT DISTINCT b.budget_id FROM budgets b LEFT JOIN budget_members m ON m.budget_id = b.budget_id "
            "WHERE b.funder = ? OR m.consumer = ? ORDER BY b.rowid", (party, party))]
        return ids[-last:] if last > 0 else []

    def active_budgets_expired_by(self, now: int) -> list[bytes]:
        """Ids of the active budgets whose expiry is ``now`` or earlier."""
        return [bytes(r[0]) for r in self.db.execute(
            "SELECT budget_id FROM budgets WHERE status = 'active' AND expires_at <= ?", (now,))]

    def insert_budget(self, row: BudgetRow, whitelist: tuple[str, ...]) -> None:
        """Record a new budget and the consumers who may draw on it (duplicates kept once).

        Raises:
            sqlite3.IntegrityError: a budget with this id exists.
        """
        self.db.execute(f"INSERT INTO budgets({_BUDGET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                        (row.budget_id, row.funder, row.amount, row.per_session_limit, row.expires_at, row.status))
        self.db.executemany("INSERT OR IGNORE INTO budget_members(budget_id, consumer) VALUES (?, ?)",
                            [(row.budget_id, c) for c in whitelist])

    def members(self, budget_id: bytes) -> tuple[str, ...]:
        """The consumers whitelisted on a budget, sorted."""
        return tuple(r[0] for r in self.db.execute(
            "SELECT consumer FROM budget_members WHERE budget_id = ? ORDER BY consumer", (budget_id,)))

    def is_member(self, budget_id: bytes, consumer: str) -> bool:
        return self.db.execute("SELECT 1 FROM budget_members WHERE budget_id = ? AND consumer = ?",
                               (budget_id, consumer)).fetchone() is not None

    def set_budget_status(self, budget_id: bytes, status: str) -> None:
        self.db.execute("UPDATE budgets SET status = ? WHERE budget_id = ?", (status, budget_id))

    def locked_in_budgets(self, funder: str) -> int:
        """What the budgets ``funder`` funded still hold now."""
        return int(self.db.execute(
            "SELECT COALESCE(SUM(a.balance), 0) FROM budgets b "
            "JOIN accounts a ON a.name = 'budget:' || lower(hex(b.budget_id)) "
            "WHERE b.funder = ?", (funder,)).fetchone()[0])
