"""Both sides keep every doubly-signed receipt: the provider's vouchers, the consumer's proof.

SQLite (WAL, synchronous=FULL) in ``HOME/receipts.db``; writes run in a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import trio

import protocol

from ._clock import SYSTEM_WALL_CLOCK, WallClock
from ._home import private_file

__all__ = ["ReceiptStore"]

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
"""


class ReceiptStore:
    def __init__(self, path: Path, clock: WallClock = SYSTEM_WALL_CLOCK) -> None:
        """``clock``: seconds since the epoch, for each receipt's ``stored_at``."""
        self._clock = clock
        self.db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False)  # 0600
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def _put(self, receipt: protocol.Receipt, role: str, latency_ms: int | None) -> None:
        peer = receipt.consumer if role == "provider" else receipt.provider
        with self._lock:
            self.db.execute(
                "INSERT OR IGNORE INTO receipts(receipt_id, session_id, call_seq, role, peer, model, agent, channel_id, "
                "tokens_in, tokens_out, cost, cumulative, stored_at, latency_ms, receipt) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (protocol.receipt_hash(receipt), receipt.session_id, receipt.call_seq, role, peer, receipt.model,
                 receipt.agent, receipt.channel_id, receipt.tokens_in, receipt.tokens_out, receipt.cost,
                 receipt.cumulative, int(self._clock()), latency_ms, protocol.encode(receipt)))

    async def put(self, receipt: protocol.Receipt, role: str, latency_ms: int | None = None) -> None:
        await trio.to_thread.run_sync(self._put, receipt, role, latency_ms)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read for reports (earnings, stats)."""
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def mark_claimed(self, receipt: protocol.Receipt) -> None:
        with self._lock:
            self.db.execute("UPDATE receipts SET claimed = 1 WHERE session_id = ? AND cumulative <= ?",
                            (receipt.session_id, receipt.cumulative))

    def has_session(self, session_id: bytes) -> bool:
        """Whether any receipt of ``session_id`` is held."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM receipts WHERE session_id = ? LIMIT 1", (session_id,)).fetchone() \
                is not None

    def unclaimed(self, role: str, limit: int = 100_000) -> list[protocol.Receipt]:
        """The newest receipt of each session (as ``role``) not yet marked claimed: what the agent
        still owes, after a restart."""
        with self._lock:
            rows = self.db.execute(
                "SELECT receipt FROM receipts r WHERE role = ? AND claimed = 0 AND cumulative = "
                "(SELECT MAX(cumulative) FROM receipts WHERE session_id = r.session_id) LIMIT ?",
                (role, limit)).fetchall()
        return [protocol.decode(bytes(blob), expect=(protocol.Receipt,)) for (blob,) in rows]

    def list(self, session_id: bytes | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        query = "SELECT receipt, role, claimed FROM receipts"
        args: tuple[Any, ...] = ()
        if session_id is not None:
            query += " WHERE session_id = ?"
            args = (session_id,)
        query += " ORDER BY rowid LIMIT ?"  # the order they were stored in
        with self._lock:
            rows = self.db.execute(query, args + (limit,)).fetchall()
        out = []
        for blob, role, claimed in rows:
            r = protocol.decode(bytes(blob), expect=(protocol.Receipt,))
            out.append(receipt_json(r) | {"role": role, "claimed": bool(claimed), "encoded": bytes(blob).hex()})
        return out


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
