"""The consumer's receipts in doubt: each doubly-signed receipt its provider has not yet
acknowledged, kept durably until it has, and resent on ``protocol.RECEIPT_PROTOCOL``.

Rules this module owns (docs/DESIGN.md, "Receipts"):
- A receipt is written here (synchronous=FULL) before its counter-signature leaves, so neither a
  crash nor a lost stream leaves a counter-signed receipt only in memory.
- It leaves when the provider's signed ``CounterSignAck`` for it comes (on the session or here),
  or is given up, never silently: the provider refuses it for good (it is not its receipt), or
  its channel has expired (the agent pays nothing after); both stay in the table, marked.
- ``serve`` resends in the background: first whatever a previous run left, then each receipt
  with backoff (5 s doubling to 10 min, or the provider's ``retry_after_s``), at most 4 providers
  at once, each exchange bounded (the dial, each answer, at most ``RECEIPTS_PER_STREAM`` a stream).
  ``wake(provider)`` (a new session with it: a reconnect) makes its receipts due at once.
- It owns the ``undelivered_receipts`` table of ``HOME/receipts.db``, on a connection of its own;
  the ``receipts`` table beside it is ``node._receipts``'s and is never touched here.

``SettlementUnconfirmed`` is what a call raises when its counter-signature is still in doubt after
the wait for the ack and one immediate redelivery: the call is not reported as a success.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

import protocol

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from .._home import private_file
from .._receipts import ReceiptStore
from ..net._dial import describe, dial
from ..net._streams import FramedStream, StreamClosed
from ._failures import ProviderFailed

__all__ = ["ReceiptDelivery", "SettlementUnconfirmed", "attach", "delivery_for"]

_logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS undelivered_receipts (
    receipt_id BLOB PRIMARY KEY,
    provider TEXT NOT NULL,
    session_id BLOB NOT NULL,
    cumulative INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,          -- the channel's expiry: the agent pays nothing after it
    added_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try_at INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending', -- 'pending', 'refused' (for good) or 'expired'
    last_error TEXT NOT NULL DEFAULT '',
    receipt BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS undelivered_due ON undelivered_receipts(state, next_try_at);
"""

_FINAL = {"not_mine", "bad_signature", "not_sender"}
_BACKOFF_S, _BACKOFF_MAX_S = 5, 600
_KEEP_GIVEN_UP_S = 30 * 86400


class SettlementUnconfirmed(ProviderFailed):
    """The provider has not confirmed a counter-signature: the call's answer came and was
    counter-signed, but neither its acknowledgement nor an immediate redelivery went through.
    The receipt stays queued and is resent (``queued``); the call is not reported as a success.

    Attributes:
        reason: ``settlement_unconfirmed``. receipt: the doubly-signed receipt in doubt.
    """

    reason = "settlement_unconfirmed"

    def __init__(self, receipt: protocol.Receipt, cause: BaseException | None, queued: bool) -> None:
        then = "it will be resent" if queued else "this node keeps no redelivery queue"
        why = f" ({cause})" if cause is not None else ""
        super().__init__(f"settlement_unconfirmed: the provider has not confirmed the counter-signature of call "
                         f"{receipt.call_seq} ({receipt.cumulative} µc in all){why}; {then}")
        self.receipt, self.queued = receipt, queued


class ReceiptDelivery:
    """The durable queue of receipts in doubt, and the task that resends them."""

    def __init__(self, path: Path, clock: WallClock = SYSTEM_WALL_CLOCK, *, connect_timeout_s: float = 5.0,
                 answer_timeout_s: float = 5.0, max_providers: int = 4) -> None:
        """
        Args:
            path: ``HOME/receipts.db`` (shared with ``ReceiptStore``; this table is this module's).
            clock: seconds since the epoch (expiries, when to try again).
            connect_timeout_s, answer_timeout_s: the bounds on one resend: opening the stream, and
                each of the provider's answers.
        """
        self._clock = clock
        self.connect_timeout_s, self.answer_timeout_s = connect_timeout_s, answer_timeout_s
        self.db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=10000")  # ReceiptStore writes the same file
        self.db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._host: Any = None
        self._wake = trio.Event()
        self._busy: set[str] = set()
        self._due_now: set[str] = set()  # providers reached again: their receipts are due at once
        self._limiter = trio.CapacityLimiter(max_providers)
        with self._lock:
            self._owed_by = {p for (p,) in self.db.execute(
                "SELECT DISTINCT provider FROM undelivered_receipts WHERE state = 'pending'")}

    def close(self) -> None:
        self.db.close()

    def now(self) -> int:
        return int(self._clock())

    # ---- the table ---------------------------------------------------------------------------

    def _add(self, receipt: protocol.Receipt, expires_at: int) -> None:
        with self._lock:
            self.db.execute(
                "INSERT OR IGNORE INTO undelivered_receipts(receipt_id, provider, session_id, cumulative, expires_at, "
                "added_at, next_try_at, receipt) VALUES (?,?,?,?,?,?,?,?)",
                (protocol.receipt_hash(receipt), receipt.provider, receipt.session_id, receipt.cumulative, expires_at,
                 self.now(), self.now() + _BACKOFF_S, protocol.encode(receipt)))
            self._owed_by.add(receipt.provider)

    async def add(self, receipt: protocol.Receipt, expires_at: int) -> None:
        """Keep ``receipt`` (doubly signed; its channel expires at ``expires_at``) until its provider
        acknowledges it. Durable when this returns."""
        await trio.to_thread.run_sync(self._add, receipt, expires_at)

    def _delivered(self, receipt_id: bytes) -> None:
        with self._lock:
            self.db.execute("DELETE FROM undelivered_receipts WHERE receipt_id = ?", (receipt_id,))

    async def delivered(self, receipt: protocol.Receipt) -> None:
        """The provider acknowledged ``receipt``: it leaves the queue."""
        await trio.to_thread.run_sync(self._delivered, protocol.receipt_hash(receipt))

    def pending(self, provider: str | None = None) -> list[protocol.Receipt]:
        """The receipts still to deliver (to ``provider``), oldest first."""
        sql = "SELECT receipt FROM undelivered_receipts WHERE state = 'pending'"
        args: tuple[Any, ...] = ()
        if provider is not None:
            sql, args = sql + " AND provider = ?", (provider,)
        with self._lock:
            rows = self.db.execute(sql + " ORDER BY added_at, rowid", args).fetchall()
        return [protocol.decode(blob, expect=(protocol.Receipt,)) for (blob,) in rows]

    def given_up(self) -> list[tuple[protocol.Receipt, str, str]]:
        """The receipts no longer resent: (receipt, 'refused' or 'expired', the last error)."""
        with self._lock:
            rows = self.db.execute("SELECT receipt, state, last_error FROM undelivered_receipts "
                                   "WHERE state != 'pending' ORDER BY added_at").fetchall()
        return [(protocol.decode(blob, expect=(protocol.Receipt,)), state, err) for blob, state, err in rows]

    def _due(self, limit: int = 256) -> dict[str, list[protocol.Receipt]]:
        now = self.now()
        with self._lock:
            expired = self.db.execute("UPDATE undelivered_receipts SET state = 'expired' "
                                      "WHERE state = 'pending' AND expires_at <= ?", (now,)).rowcount
            self.db.execute("DELETE FROM undelivered_receipts WHERE state != 'pending' AND added_at < ?",
                            (now - _KEEP_GIVEN_UP_S,))
            rows = self.db.execute("SELECT provider, receipt FROM undelivered_receipts WHERE state = 'pending' "
                                   "AND next_try_at <= ? ORDER BY next_try_at LIMIT ?", (now, limit)).fetchall()
            self._owed_by = {p for (p,) in self.db.execute(
                "SELECT DISTINCT provider FROM undelivered_receipts WHERE state = 'pending'")}
        if expired:
            _logger.warning("%d counter-signed receipts were never acknowledged before their channels expired", expired)
        out: dict[str, list[protocol.Receipt]] = {}
        for provider, blob in rows:
            out.setdefault(provider, []).append(protocol.decode(blob, expect=(protocol.Receipt,)))
        return out

    def _retry(self, receipt_id: bytes, error: str, after_s: int | None = None) -> None:
        with self._lock:
            row = self.db.execute("SELECT attempts FROM undelivered_receipts WHERE receipt_id = ?",
                                  (receipt_id,)).fetchone()
            if row is None:
                return
            wait = after_s if after_s else min(_BACKOFF_MAX_S, _BACKOFF_S * 2 ** min(row[0], 10))
            self.db.execute("UPDATE undelivered_receipts SET attempts = attempts + 1, next_try_at = ?, last_error = ? "
                            "WHERE receipt_id = ?", (self.now() + wait, error[:500], receipt_id))

    def _refused(self, receipt_id: bytes, error: str) -> None:
        with self._lock:
            self.db.execute("UPDATE undelivered_receipts SET state = 'refused', last_error = ? WHERE receipt_id = ?",
                            (error[:500], receipt_id))

    def _make_due(self, provider: str) -> None:
        with self._lock:
            self.db.execute("UPDATE undelivered_receipts SET next_try_at = 0 WHERE provider = ? AND state = 'pending'",
                            (provider,))

    # ---- resending ---------------------------------------------------------------------------

    def wake(self, provider: str | None = None) -> None:
        """Resend now: ``provider``'s receipts (we reach it again), or whatever is due."""
        if provider is not None:
            if provider not in self._owed_by:
                return  # nothing owed to it: nothing to do on every session open
            self._due_now.add(provider)
        self._wake.set()

    async def serve(self, host: Any, tick_s: float = 5.0, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Resend receipts in doubt over ``host`` until cancelled; what a previous run left is due at once."""
        self._host = host
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                while self._due_now:
                    await trio.to_thread.run_sync(self._make_due, self._due_now.pop())
                for provider, receipts in (await trio.to_thread.run_sync(self._due)).items():
                    if provider not in self._busy:
                        self._busy.add(provider)
                        nursery.start_soon(self._resend, provider, receipts)
                with trio.move_on_after(tick_s):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _resend(self, provider: str, receipts: list[protocol.Receipt]) -> None:
        try:
            async with self._limiter:
                for start in range(0, len(receipts), protocol.RECEIPTS_PER_STREAM):
                    _, complete = await self._deliver(provider, receipts[start:start + protocol.RECEIPTS_PER_STREAM])
                    if not complete:
                        break
        finally:
            self._busy.discard(provider)

    async def confirm_now(self, receipt: protocol.Receipt) -> bool:
        """Deliver ``receipt`` now, on a stream of its own; True once the provider acknowledged it.
        On failure it stays queued for the background task."""
        if self._host is None:
            return False
        acked, _ = await self._deliver(receipt.provider, [receipt])
        return protocol.receipt_hash(receipt) in acked

    async def _deliver(self, provider: str, receipts: list[protocol.Receipt]) -> tuple[set[bytes], bool]:
        """One exchange with ``provider``; every outcome is recorded. Returns the ids it acknowledged,
        and whether it answered every receipt."""
        answered: list[bytes] = []
        acked: set[bytes] = set()
        error = "not delivered"
        try:
            with trio.fail_after(self.connect_timeout_s):
                pid = ID.from_base58(provider)
                await dial(self._host, pid, (), timeout_s=self.connect_timeout_s)  # fresh addresses if it moved
                stream = await self._host.new_stream(pid, [protocol.RECEIPT_PROTOCOL])
        except Exception as exc:  # libp2p's dial and negotiation errors, and the timeout
            error = f"cannot reach the provider: {describe(exc)}"
        else:
            framed = FramedStream(stream, max_size=protocol.RECEIPT_FRAME_MAX, read_timeout_s=self.answer_timeout_s)
            try:
                for receipt in receipts:
                    rid = protocol.receipt_hash(receipt)
                    await framed.send(receipt)
                    answer = await framed.receive(expect=(protocol.CounterSignAck, protocol.ReceiptRefused))
                    if isinstance(answer, protocol.CounterSignAck):
                        protocol.verify_ack(answer, receipt)
                        await trio.to_thread.run_sync(self._delivered, rid)
                        acked.add(rid)
                        _logger.info("provider %s acknowledged a redelivered receipt (%s µc)", provider,
                                     receipt.cumulative)
                    elif answer.receipt_hash != rid:
                        raise protocol.ReceiptHashMismatch("the refusal names another receipt")
                    elif answer.reason in _FINAL:
                        _logger.error("provider %s refused a counter-signed receipt for good (%s: %s)", provider,
                                      answer.reason, answer.detail)
                        await trio.to_thread.run_sync(self._refused, rid, f"{answer.reason}: {answer.detail}")
                    else:
                        await trio.to_thread.run_sync(self._retry, rid, f"{answer.reason}: {answer.detail}",
                                                      max(1, answer.retry_after_s))
                        answered.append(rid)
                        break  # busy: the rest wait too
                    answered.append(rid)
            except (StreamClosed, protocol.ProtocolError) as exc:
                error = f"the provider did not answer: {exc}"
            finally:
                await framed.close()
        missed = [protocol.receipt_hash(r) for r in receipts if protocol.receipt_hash(r) not in answered]
        for rid in missed:
            await trio.to_thread.run_sync(self._retry, rid, error)
        if missed:
            _logger.info("%d receipts for provider %s not delivered yet: %s", len(missed), provider, error)
        return acked, not missed


_ATTACHED: "weakref.WeakKeyDictionary[ReceiptStore, ReceiptDelivery]" = weakref.WeakKeyDictionary()


def attach(receipts: ReceiptStore, delivery: ReceiptDelivery) -> None:
    """Make ``delivery`` the queue of every session that keeps its receipts in ``receipts`` (the
    composition root does this once; ``open_session`` finds it by the store it is given)."""
    _ATTACHED[receipts] = delivery


def delivery_for(receipts: ReceiptStore | None) -> ReceiptDelivery | None:
    """The delivery queue attached to ``receipts``, if any."""
    return _ATTACHED.get(receipts) if receipts is not None else None
