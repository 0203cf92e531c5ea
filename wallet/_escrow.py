"""The escrow agent's rules (DESIGN.md, "Escrow"), over the durable ledger.

Parties: funder, consumer, provider, agent. Accounts: ``peer:<id>`` (available),
``channel:<hex>`` and ``budget:<hex>`` (locked), ``system:mint`` / ``system:withdrawn``.

- Every request is signed by the party it acts for (a cooperative close by both channel
  parties) and must be fresh (``issued_at`` within ``max_skew_s`` of the agent's clock).
- Every state-changing request is applied at most once: its id, digest and answer are recorded
  in the transaction that applies it — a failed one too, so a refused request cannot be
  replayed later when it would succeed. A replay gets ``replayed`` and the original outcome;
  the same id with other content gets ``request_id_reused``. Nothing else changes.
- A refused request changes no money, channel or budget (the transaction rolls back).
- Channel money is paid to the provider only against a receipt signed by both parties, up to
  ``cumulative - already claimed`` for that session, never past the cap, never after expiry.
- What is never claimed goes back where it came from: the consumer, or the budget it was
  drawn from (the funder once the budget is closed).
Every answer is an ``EscrowResponse`` signed by the agent. Time is a parameter (``now``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable

import protocol
from protocol import (
    Balance,
    BudgetState,
    ChannelGrant,
    ChannelState,
    EscrowBudgetCreate,
    EscrowBudgetRefund,
    EscrowClaim,
    EscrowClose,
    EscrowMint,
    EscrowOpen,
    EscrowQuery,
    EscrowRefund,
    EscrowResponse,
    EscrowTopUp,
    EscrowWithdraw,
    Receipt,
)

from ._errors import WalletError
from ._keys import Identity
from ._ledger import MINT, WITHDRAWN, InvariantViolation, Ledger, Tx, peer_account

__all__ = ["EscrowAgent", "EscrowError", "ESCROW_REQUESTS", "channel_account", "budget_account"]

ESCROW_REQUESTS = (
    EscrowMint, EscrowOpen, EscrowTopUp, EscrowClaim, EscrowClose, EscrowRefund, EscrowWithdraw,
    EscrowBudgetCreate, EscrowBudgetRefund, EscrowQuery,
)


class EscrowError(WalletError):
    """A request the rules refuse; ``code`` is the answer's error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


def channel_account(channel_id: bytes) -> str:
    return f"channel:{channel_id.hex()}"


def budget_account(budget_id: bytes) -> str:
    return f"budget:{budget_id.hex()}"


def _derive_id(tag: bytes, request_id: bytes) -> bytes:
    return hashlib.sha256(tag + request_id).digest()[:16]


@dataclasses.dataclass(frozen=True)
class _Result:
    paid: int = 0
    channels: tuple[ChannelState, ...] = ()
    budgets: tuple[BudgetState, ...] = ()
    budget_id: bytes | None = None
    balance_of: str | None = None


class EscrowAgent:
    """Applies escrow requests to a ledger and answers them, signed."""

    def __init__(
        self,
        ledger: Ledger,
        identity: Identity,
        operators: frozenset[str] | None = None,
        max_skew_s: int = 300,
        max_lifetime_s: int = 90 * 86400,
    ) -> None:
        self.ledger = ledger
        self.identity = identity
        self.operators = operators if operators is not None else frozenset({identity.peer_id})
        self.max_skew_s = max_skew_s
        self.max_lifetime_s = max_lifetime_s

    # ---- entry point ------------------------------------------------------------------------

    def handle(self, request: Any, now: int) -> EscrowResponse:
        """Verify, apply (at most once) and answer one request. Never raises for a bad request:
        the answer carries the error code."""
        try:
            if type(request) not in ESCROW_REQUESTS:
                raise EscrowError("bad_request", f"{type(request).__name__} is not an escrow request")
            self._verify_fresh(request, now)
            # only requests signed by their parties are ever recorded (forged ones cost no disk)
            if isinstance(request, EscrowClose):
                self._verify_close(request)
            else:
                self._verify_party(request)
            if isinstance(request, EscrowQuery):
                return self._answer(request.request_id, now, self._query(request, now))
        except EscrowError as exc:
            return self._answer(request.request_id, now, None, exc)
        return self._apply_once(request, now)

    def _apply_once(self, request: Any, now: int) -> EscrowResponse:
        digest = hashlib.sha256(protocol.encode(request)).digest()
        with self.ledger.transaction(request.request_id) as tx:
            row = tx.db.execute("SELECT digest, answer FROM ops WHERE request_id = ?", (request.request_id,)).fetchone()
            if row is not None:
                if bytes(row[0]) != digest:
                    return self._answer(request.request_id, now, None,
                                        EscrowError("request_id_reused", "this request id was used by another request"))
                first = protocol.decode(bytes(row[1]), expect=(EscrowResponse,))
                return self._sign(dataclasses.replace(
                    first, ok=False, error="replayed", issued_at=now, sig=b"",
                    detail=f"already answered ({first.error or 'ok'}); nothing changed"))
            tx.db.execute("SAVEPOINT op")
            try:
                result = self._apply(tx, request, now)
                answer = self._answer(request.request_id, now, result, db=tx.db)
                tx.db.execute("RELEASE op")
            except EscrowError as exc:
                tx.db.execute("ROLLBACK TO op")
                tx.db.execute("RELEASE op")
                answer = self._answer(request.request_id, now, None, exc)
            tx.db.execute(
                "INSERT INTO ops(request_id, kind, party, digest, applied_at, answer) VALUES (?, ?, ?, ?, ?, ?)",
                (request.request_id, type(request).KIND, getattr(request, "party", ""), digest, now,
                 protocol.encode(answer)),
            )
            return answer

    def _apply(self, tx: Tx, request: Any, now: int) -> _Result:
        handlers: dict[type, Callable[[Tx, Any, int], _Result]] = {
            EscrowMint: self._mint,
            EscrowWithdraw: self._withdraw,
            EscrowOpen: self._open,
            EscrowTopUp: self._topup,
            EscrowClaim: self._claim,
            EscrowClose: self._close,
            EscrowRefund: self._refund,
            EscrowBudgetCreate: self._budget_create,
            EscrowBudgetRefund: self._budget_refund,
        }
        return handlers[type(request)](tx, request, now)

    # ---- checks -----------------------------------------------------------------------------

    def _verify_fresh(self, request: Any, now: int) -> None:
        if abs(request.issued_at - now) > self.max_skew_s:
            raise EscrowError("stale_request", f"issued_at {request.issued_at} is more than {self.max_skew_s}s from now")

    def _verify_party(self, request: Any) -> None:
        try:
            protocol.verify(request, "sig", protocol.public_key_from_peer_id(request.party))
        except protocol.ProtocolError as exc:
            raise EscrowError("bad_signature", f"request not signed by {request.party}") from exc

    def _verify_close(self, request: EscrowClose) -> None:
        with self.ledger.reading() as db:
            row = db.execute("SELECT consumer, provider FROM channels WHERE channel_id = ?",
                             (request.channel_id,)).fetchone()
        if row is None:
            raise EscrowError("unknown_channel", f"no channel {request.channel_id.hex()}")
        try:
            protocol.verify(request, "consumer_sig", protocol.public_key_from_peer_id(row[0]))
            protocol.verify(request, "provider_sig", protocol.public_key_from_peer_id(row[1]))
        except protocol.ProtocolError as exc:
            raise EscrowError("bad_signature", "a cooperative close is signed by both channel parties") from exc

    def _check_expiry(self, expires_at: int, now: int) -> None:
        if not now < expires_at <= now + self.max_lifetime_s:
            raise EscrowError("bad_expiry", f"expiry must be after now and within {self.max_lifetime_s}s")

    @staticmethod
    def _need(tx: Tx, account: str, amount: int) -> None:
        if tx.balance(account) < amount:
            raise EscrowError("insufficient_funds", f"{account} holds {tx.balance(account)}, needs {amount}")

    @staticmethod
    def _positive(amount: int, what: str) -> None:
        if amount <= 0:
            raise EscrowError("bad_request", f"{what} must be positive")

    def _channel(self, tx: Tx, channel_id: bytes) -> dict[str, Any]:
        row = tx.db.execute(
            "SELECT consumer, provider, cap, expires_at, budget_id, claimed, status, grant_ FROM channels "
            "WHERE channel_id = ?", (channel_id,)).fetchone()
        if row is None:
            raise EscrowError("unknown_channel", f"no channel {channel_id.hex()}")
        keys = ("consumer", "provider", "cap", "expires_at", "budget_id", "claimed", "status", "grant")
        return {"channel_id": channel_id, **dict(zip(keys, row))}

    def _budget(self, tx: Tx, budget_id: bytes) -> dict[str, Any]:
        row = tx.db.execute(
            "SELECT funder, amount, per_session_limit, expires_at, status FROM budgets WHERE budget_id = ?",
            (budget_id,)).fetchone()
        if row is None:
            raise EscrowError("unknown_budget", f"no budget {budget_id.hex()}")
        return {"budget_id": budget_id, **dict(zip(("funder", "amount", "per_session_limit", "expires_at", "status"), row))}

    def _verify_receipt(self, ch: dict[str, Any], receipt: Receipt) -> None:
        try:
            protocol.verify(receipt, "provider_sig", protocol.public_key_from_peer_id(receipt.provider))
            protocol.verify(receipt, "consumer_sig", protocol.public_key_from_peer_id(receipt.consumer))
        except protocol.ProtocolError as exc:
            raise EscrowError("bad_receipt", "the receipt must carry valid provider and consumer signatures") from exc
        if receipt.agent != self.identity.peer_id:
            raise EscrowError("wrong_agent", "the receipt names another escrow agent")
        if receipt.provider != ch["provider"] or receipt.consumer != ch["consumer"]:
            raise EscrowError("bad_receipt", "the receipt's parties are not the channel's")

    # ---- money movements --------------------------------------------------------------------

    def _mint(self, tx: Tx, req: EscrowMint, now: int) -> _Result:
        if req.party not in self.operators:
            raise EscrowError("not_operator", "only the agent's operator mints (devnet rail)")
        self._positive(req.amount, "amount")
        tx.transfer(MINT, peer_account(req.to), req.amount)
        return _Result(paid=req.amount, balance_of=req.to)

    def _withdraw(self, tx: Tx, req: EscrowWithdraw, now: int) -> _Result:
        self._positive(req.amount, "amount")
        self._need(tx, peer_account(req.party), req.amount)
        tx.transfer(peer_account(req.party), WITHDRAWN, req.amount)
        return _Result(paid=req.amount, balance_of=req.party)

    def _grant(self, channel_id: bytes, consumer: str, provider: str, cap: int, expires_at: int,
               budget_id: bytes | None) -> ChannelGrant:
        return protocol.sign(ChannelGrant(agent=self.identity.peer_id, channel_id=channel_id, consumer=consumer,
                                          provider=provider, cap=cap, expires_at=expires_at, budget_id=budget_id),
                             "sig", self.identity)

    def _draw_budget(self, tx: Tx, budget_id: bytes, consumer: str, cap_after: int, add: int, now: int) -> str:
        b = self._budget(tx, budget_id)
        if b["status"] != "active" or now >= b["expires_at"]:
            raise EscrowError("budget_closed", "the budget is refunded or expired")
        member = tx.db.execute("SELECT 1 FROM budget_members WHERE budget_id = ? AND consumer = ?",
                               (budget_id, consumer)).fetchone()
        if member is None:
            raise EscrowError("not_whitelisted", f"{consumer} may not draw on this budget")
        if cap_after > b["per_session_limit"]:
            raise EscrowError("over_session_limit", f"a channel on this budget holds at most {b['per_session_limit']}")
        source = budget_account(budget_id)
        self._need(tx, source, add)
        return source

    def _open(self, tx: Tx, req: EscrowOpen, now: int) -> _Result:
        self._positive(req.cap, "cap")
        self._check_expiry(req.expires_at, now)
        if req.provider == req.party:
            raise EscrowError("bad_request", "a channel joins two different parties")
        if req.budget_id is not None:
            source = self._draw_budget(tx, req.budget_id, req.party, req.cap, req.cap, now)
        else:
            source = peer_account(req.party)
            self._need(tx, source, req.cap)
        channel_id = _derive_id(b"inferswarm/channel", req.request_id)
        grant = self._grant(channel_id, req.party, req.provider, req.cap, req.expires_at, req.budget_id)
        tx.db.execute(
            "INSERT INTO channels(channel_id, consumer, provider, cap, expires_at, budget_id, claimed, status, grant_) "
            "VALUES (?, ?, ?, ?, ?, ?, 0, 'open', ?)",
            (channel_id, req.party, req.provider, req.cap, req.expires_at, req.budget_id, protocol.encode(grant)))
        tx.transfer(source, channel_account(channel_id), req.cap)
        return _Result(channels=(ChannelState(channel=grant, claimed=0, status="open"),), balance_of=req.party)

    def _topup(self, tx: Tx, req: EscrowTopUp, now: int) -> _Result:
        ch = self._channel(tx, req.channel_id)
        if req.party != ch["consumer"]:
            raise EscrowError("not_channel_party", "only the channel's consumer adds funds")
        self._open_channel(ch, now)
        if req.expires_at < ch["expires_at"]:
            raise EscrowError("bad_expiry", "a channel's expiry can only move later")
        self._check_expiry(req.expires_at, now)
        if req.add == 0 and req.expires_at == ch["expires_at"]:
            raise EscrowError("bad_request", "nothing to add or extend")
        cap = ch["cap"] + req.add
        if req.add:
            if ch["budget_id"] is not None:
                source = self._draw_budget(tx, bytes(ch["budget_id"]), req.party, cap, req.add, now)
            else:
                source = peer_account(req.party)
                self._need(tx, source, req.add)
            tx.transfer(source, channel_account(req.channel_id), req.add)
        grant = self._grant(req.channel_id, ch["consumer"], ch["provider"], cap, req.expires_at,
                            None if ch["budget_id"] is None else bytes(ch["budget_id"]))
        tx.db.execute("UPDATE channels SET cap = ?, expires_at = ?, grant_ = ? WHERE channel_id = ?",
                      (cap, req.expires_at, protocol.encode(grant), req.channel_id))
        return _Result(channels=(self._state(tx, req.channel_id),), balance_of=req.party)

    @staticmethod
    def _open_channel(ch: dict[str, Any], now: int) -> None:
        if ch["status"] != "open":
            raise EscrowError("channel_closed", f"the channel is {ch['status']}")
        if now >= ch["expires_at"]:
            raise EscrowError("channel_expired", "the channel has expired")

    def _pay(self, tx: Tx, ch: dict[str, Any], receipt: Receipt, strict: bool) -> int:
        """Pay ``cumulative - claimed`` for the receipt's session; returns what was paid."""
        row = tx.db.execute("SELECT claimed FROM channel_sessions WHERE channel_id = ? AND session_id = ?",
                            (ch["channel_id"], receipt.session_id)).fetchone()
        before = int(row[0]) if row else 0
        if receipt.cumulative <= before:
            if strict:
                raise EscrowError("already_claimed", f"{before} already claimed for this session")
            return 0
        pay = receipt.cumulative - before
        if ch["claimed"] + pay > ch["cap"]:
            raise EscrowError("over_cap", f"claims would reach {ch['claimed'] + pay}, over the cap {ch['cap']}")
        tx.transfer(channel_account(ch["channel_id"]), peer_account(ch["provider"]), pay)
        tx.db.execute(
            "INSERT INTO channel_sessions(channel_id, session_id, claimed, receipt) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(channel_id, session_id) DO UPDATE SET claimed = excluded.claimed, receipt = excluded.receipt",
            (ch["channel_id"], receipt.session_id, receipt.cumulative, protocol.encode(receipt)))
        tx.db.execute("UPDATE channels SET claimed = claimed + ? WHERE channel_id = ?", (pay, ch["channel_id"]))
        ch["claimed"] += pay
        return pay

    def _claim(self, tx: Tx, req: EscrowClaim, now: int) -> _Result:
        ch = self._channel(tx, req.receipt.channel_id)
        if req.party != ch["provider"]:
            raise EscrowError("wrong_provider", "only the channel's provider claims")
        self._open_channel(ch, now)
        self._verify_receipt(ch, req.receipt)
        paid = self._pay(tx, ch, req.receipt, strict=True)
        return _Result(paid=paid, channels=(self._state(tx, ch["channel_id"]),), balance_of=req.party)

    def _release(self, tx: Tx, ch: dict[str, Any], status: str) -> int:
        """Return what the channel still holds to where it came from; mark it ``status``."""
        rest = tx.balance(channel_account(ch["channel_id"]))
        if rest:
            if ch["budget_id"] is not None:
                b = self._budget(tx, bytes(ch["budget_id"]))
                dst = budget_account(b["budget_id"]) if b["status"] == "active" else peer_account(b["funder"])
            else:
                dst = peer_account(ch["consumer"])
            tx.transfer(channel_account(ch["channel_id"]), dst, rest)
        tx.db.execute("UPDATE channels SET status = ? WHERE channel_id = ?", (status, ch["channel_id"]))
        return rest

    def _close(self, tx: Tx, req: EscrowClose, now: int) -> _Result:
        ch = self._channel(tx, req.channel_id)
        if ch["status"] != "open":
            raise EscrowError("channel_closed", f"the channel is {ch['status']}")
        paid = 0
        if req.receipt is not None:
            if req.receipt.channel_id != req.channel_id:
                raise EscrowError("bad_receipt", "the receipt is for another channel")
            self._verify_receipt(ch, req.receipt)
            paid = self._pay(tx, ch, req.receipt, strict=False)
        self._release(tx, ch, "closed")
        return _Result(paid=paid, channels=(self._state(tx, req.channel_id),), balance_of=ch["consumer"])

    def _refund(self, tx: Tx, req: EscrowRefund, now: int) -> _Result:
        ch = self._channel(tx, req.channel_id)
        if req.party != ch["consumer"]:
            raise EscrowError("not_channel_party", "only the channel's consumer reclaims it")
        if ch["status"] != "open":
            raise EscrowError("channel_closed", f"the channel is {ch['status']}")
        if now < ch["expires_at"]:
            raise EscrowError("not_expired", "a channel is reclaimed after its expiry (or closed by both parties)")
        self._release(tx, ch, "refunded")
        return _Result(channels=(self._state(tx, req.channel_id),), balance_of=req.party)

    def _budget_create(self, tx: Tx, req: EscrowBudgetCreate, now: int) -> _Result:
        self._positive(req.amount, "amount")
        self._positive(req.per_session_limit, "per_session_limit")
        self._check_expiry(req.expires_at, now)
        if not req.whitelist:
            raise EscrowError("bad_request", "a budget whitelists at least one consumer")
        self._need(tx, peer_account(req.party), req.amount)
        budget_id = _derive_id(b"inferswarm/budget", req.request_id)
        tx.db.execute("INSERT INTO budgets(budget_id, funder, amount, per_session_limit, expires_at, status) "
                      "VALUES (?, ?, ?, ?, ?, 'active')",
                      (budget_id, req.party, req.amount, req.per_session_limit, req.expires_at))
        tx.db.executemany("INSERT OR IGNORE INTO budget_members(budget_id, consumer) VALUES (?, ?)",
                          [(budget_id, c) for c in req.whitelist])
        tx.transfer(peer_account(req.party), budget_account(budget_id), req.amount)
        return _Result(budget_id=budget_id, budgets=(self._budget_state(tx, budget_id),), balance_of=req.party)

    def _budget_refund(self, tx: Tx, req: EscrowBudgetRefund, now: int) -> _Result:
        b = self._budget(tx, req.budget_id)
        if req.party != b["funder"]:
            raise EscrowError("not_budget_funder", "only the funder refunds a budget")
        if b["status"] != "active":
            raise EscrowError("budget_closed", "the budget was refunded already")
        self._close_budget(tx, b)
        return _Result(budget_id=req.budget_id, budgets=(self._budget_state(tx, req.budget_id),), balance_of=req.party)

    def _close_budget(self, tx: Tx, b: dict[str, Any]) -> None:
        rest = tx.balance(budget_account(b["budget_id"]))
        if rest:
            tx.transfer(budget_account(b["budget_id"]), peer_account(b["funder"]), rest)
        tx.db.execute("UPDATE budgets SET status = 'refunded' WHERE budget_id = ?", (b["budget_id"],))

    # ---- expiry -----------------------------------------------------------------------------

    def sweep(self, now: int) -> int:
        """Return what expired channels and budgets still hold (each once, durably).

        Returns:
            How many channels and budgets were settled.
        """
        with self.ledger.reading() as db:
            channels = [bytes(r[0]) for r in db.execute(
                "SELECT channel_id FROM channels WHERE status = 'open' AND expires_at <= ?", (now,))]
            budgets = [bytes(r[0]) for r in db.execute(
                "SELECT budget_id FROM budgets WHERE status = 'active' AND expires_at <= ?", (now,))]
        for cid in channels:
            request_id = _derive_id(b"inferswarm/sweep/channel", cid)
            with self.ledger.transaction(request_id) as tx:
                ch = self._channel(tx, cid)
                if ch["status"] == "open" and ch["expires_at"] <= now:
                    self._release(tx, ch, "refunded")
                    self._record_internal(tx, request_id, "sweep_channel", now)
        for bid in budgets:
            request_id = _derive_id(b"inferswarm/sweep/budget", bid)
            with self.ledger.transaction(request_id) as tx:
                b = self._budget(tx, bid)
                if b["status"] == "active" and b["expires_at"] <= now:
                    self._close_budget(tx, b)
                    self._record_internal(tx, request_id, "sweep_budget", now)
        return len(channels) + len(budgets)

    def _record_internal(self, tx: Tx, request_id: bytes, kind: str, now: int) -> None:
        tx.db.execute("INSERT OR IGNORE INTO ops(request_id, kind, party, digest, applied_at, answer) "
                      "VALUES (?, ?, ?, ?, ?, ?)", (request_id, kind, self.identity.peer_id, b"", now, b""))

    # ---- reading ----------------------------------------------------------------------------

    def _state(self, tx_or_db: Any, channel_id: bytes) -> ChannelState:
        db = getattr(tx_or_db, "db", tx_or_db)
        row = db.execute("SELECT grant_, claimed, status FROM channels WHERE channel_id = ?", (channel_id,)).fetchone()
        grant = protocol.decode(bytes(row[0]), expect=(ChannelGrant,))
        return ChannelState(channel=grant, claimed=int(row[1]), status=row[2])

    def _budget_state(self, tx_or_db: Any, budget_id: bytes) -> BudgetState:
        db = getattr(tx_or_db, "db", tx_or_db)
        row = db.execute("SELECT funder, amount, per_session_limit, expires_at, status FROM budgets "
                         "WHERE budget_id = ?", (budget_id,)).fetchone()
        members = tuple(r[0] for r in db.execute(
            "SELECT consumer FROM budget_members WHERE budget_id = ? ORDER BY consumer", (budget_id,)))
        remaining = db.execute("SELECT balance FROM accounts WHERE name = ?", (budget_account(budget_id),)).fetchone()
        return BudgetState(budget_id=budget_id, funder=row[0], amount=int(row[1]),
                           remaining=int(remaining[0]) if remaining else 0, whitelist=members,
                           per_session_limit=int(row[2]), expires_at=int(row[3]), status=row[4])

    def _balance(self, db: Any, party: str) -> Balance:
        available = db.execute("SELECT balance FROM accounts WHERE name = ?", (peer_account(party),)).fetchone()
        locked = db.execute(
            "SELECT COALESCE(SUM(a.balance), 0) FROM channels c JOIN accounts a ON a.name = 'channel:' || lower(hex(c.channel_id)) "
            "WHERE c.consumer = ? AND c.budget_id IS NULL", (party,)).fetchone()[0]
        budgets = db.execute(
            "SELECT COALESCE(SUM(a.balance), 0) FROM budgets b JOIN accounts a ON a.name = 'budget:' || lower(hex(b.budget_id)) "
            "WHERE b.funder = ?", (party,)).fetchone()[0]
        return Balance(available=int(available[0]) if available else 0, locked=int(locked) + int(budgets))

    def _query(self, req: EscrowQuery, now: int) -> _Result:
        with self.ledger.reading() as db:
            if req.channel_id is not None:
                row = db.execute("SELECT consumer, provider FROM channels WHERE channel_id = ?",
                                 (req.channel_id,)).fetchone()
                if row is None:
                    raise EscrowError("unknown_channel", f"no channel {req.channel_id.hex()}")
                if req.party not in row:
                    raise EscrowError("not_channel_party", "only the channel's parties may see it")
                return _Result(channels=(self._state(db, req.channel_id),))
            ids = [bytes(r[0]) for r in db.execute(
                "SELECT channel_id FROM channels WHERE consumer = ? OR provider = ? ORDER BY rowid", (req.party, req.party))]
            bids = [bytes(r[0]) for r in db.execute(
                "SELECT DISTINCT b.budget_id FROM budgets b LEFT JOIN budget_members m ON m.budget_id = b.budget_id "
                "WHERE b.funder = ? OR m.consumer = ? ORDER BY b.rowid", (req.party, req.party))]
            return _Result(channels=tuple(self._state(db, i) for i in ids[-1024:]),
                           budgets=tuple(self._budget_state(db, b) for b in bids[-256:]), balance_of=req.party)

    def balance(self, party: str) -> Balance:
        with self.ledger.reading() as db:
            return self._balance(db, party)

    def _answer(self, request_id: bytes, now: int, result: _Result | None, error: EscrowError | None = None,
                db: Any = None) -> EscrowResponse:
        if error is not None or result is None:
            return self._sign(EscrowResponse(request_id=request_id, agent=self.identity.peer_id, ok=False,
                                             error=error.code if error else "bad_request",
                                             detail=(error.detail if error else "")[:512], issued_at=now))
        balance = None
        if result.balance_of is not None:
            if db is not None:
                balance = self._balance(db, result.balance_of)
            else:
                with self.ledger.reading() as rdb:
                    balance = self._balance(rdb, result.balance_of)
        return self._sign(EscrowResponse(request_id=request_id, agent=self.identity.peer_id, ok=True,
                                         balance=balance, channels=result.channels, budgets=result.budgets,
                                         paid=result.paid, budget_id=result.budget_id, issued_at=now))

    def _sign(self, response: EscrowResponse) -> EscrowResponse:
        return protocol.sign(response, "sig", self.identity)

    def check(self) -> dict[str, int]:
        """The ledger invariant plus: every channel and budget account holds what its record says.

        Raises:
            InvariantViolation.
        """
        totals = self.ledger.check()
        with self.ledger.reading() as db:
            for cid, cap, claimed, status in db.execute("SELECT channel_id, cap, claimed, status FROM channels"):
                held = db.execute("SELECT COALESCE(balance, 0) FROM accounts WHERE name = ?",
                                  (channel_account(bytes(cid)),)).fetchone()
                held = int(held[0]) if held else 0
                want = cap - claimed if status == "open" else 0
                if held != want or claimed > cap:
                    raise InvariantViolation(f"channel {bytes(cid).hex()} holds {held}, its record says {want}")
        return totals
