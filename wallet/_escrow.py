"""The escrow agent's rules (DESIGN.md, "Escrow"), over the durable ledger.

Parties: funder, consumer, provider, agent. Accounts: ``peer:<id>`` (available),
``channel:<hex>`` and ``budget:<hex>`` (locked), ``system:mint`` / ``system:withdrawn``.

- Every request is signed by the party it acts for (a cooperative close by both channel
  parties) and must be fresh (``issued_at`` within ``max_skew_s`` of the agent's clock).
- Every state-changing request is applied at most once: its id, digest and answer are recorded
  in the transaction that applies it. A replay gets ``replayed`` and the original outcome; the
  same id with other content gets ``request_id_reused``. Nothing else changes.
- A refused request is never applied later either, at a bounded cost (finding 12 of issue 11:
  storing each refusal with an fsync let one identity grow the ledger 0.7 GB/hour). A request
  is acceptable only while fresh, so its refusal only needs remembering until ``issued_at +
  max_skew_s``: refusals live in a bounded table in memory (``_refusals.RefusalBook``) and are
  counted, not stored. Durable are only: applied requests (as ever), refusals the full table
  cannot take (the old behaviour, as a fallback), and one number, ``refused_through``, the
  latest ``issued_at`` of a refusal kept in memory, raised (one small write) only when a
  refusal is issued later than any before it: at most one write per second of clock.
- Restart rule: a new process starts with an empty table, so it refuses every state-changing
  request issued at or before the stored ``refused_through`` that it has no record of, with
  ``stale_request`` ("sign it again"). Safe because every refusal a restart forgot was issued
  no later than that; harmless to honest clients because ``stale_request`` says for sure that
  nothing was applied, so a fresh request (new id, new ``issued_at``) cannot apply twice, and
  only requests dated up to the last refusal are affected. A refusal dated more than
  ``_HORIZON_LEAD_S`` (5 s) ahead of the agent's clock is stored durably instead of raising the
  horizon, so nobody can make every request after a restart stale by dating one ahead.
  This assumes the agent's clock does not step back (a refusal forgotten at expiry would be
  fresh again); NTP slews.
- Rate limit: a party (or the remote peer carrying requests, ``source``) refused
  ``RefusalBook.rate_limit`` times in a minute, or holding ``max_per_key`` remembered refusals,
  gets ``rate_limited`` for everything, answered by ``screen`` before any signature check or
  ledger work (an exact replay of a remembered refusal still gets ``replayed``).
- A refused request changes no money, channel or budget (its savepoint rolls back).
- A channel must live at least ``min_lifetime_s`` when opened, and so must a top-up's new expiry
  (finding 2: a 1 s channel cannot be claimed before it is refunded); else ``bad_expiry``.
- Channel money is paid to the provider only against a receipt signed by both parties, up to
  ``cumulative - already claimed`` for that session, never past the cap, never after expiry.
- What is never claimed goes back where it came from: the consumer, or the budget it was
  drawn from (the funder once the budget is closed).
- A query lists at most the newest ``MAX_LISTED_CHANNELS`` channels and ``MAX_LISTED_BUDGETS``
  budgets of a party, so an answer stays bounded.
- Storage faults (issue 12, finding 7) are answers, never dropped streams: a request the ledger
  could not apply because it is damaged, its disk full or read-only, or an I/O error, gets the
  error's code (``ledger_damaged``, ``storage_full``, ``storage_readonly``, ``storage_error``;
  ``STORAGE_REFUSALS``) and a line saying nothing was applied. Such a refusal is not the
  party's doing: it is not counted, not remembered (a refusal remembered in the failed
  transaction is forgotten: it was never given out), and the same request may be sent again.
  Once the ledger is damaged, ``screen`` refuses every state-changing request at once and
  ``sweep`` does nothing; queries still try.
Every answer is an ``EscrowResponse`` signed by the agent. Time is a parameter (``now``).
This module holds the rules only: every read and write of the escrow's records goes through
``_escrow_store.EscrowStore`` (no SQL here), the remembered refusals through ``RefusalBook``,
and money moves only by ``Tx.transfer``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Sequence

import protocol
from protocol import (
    Balance,
    BudgetState,
    ChannelGrant,
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

from ._escrow_store import BudgetRow, ChannelRow, EscrowStore, RequestRecord
from ._keys import Identity
from ._ledger import MINT, WITHDRAWN, InvariantViolation, Ledger, LedgerDamaged, LedgerError, Tx, peer_account
from ._refusals import RefusalBook, Remembered

__all__ = ["EscrowAgent", "EscrowError", "ESCROW_REQUESTS", "STORAGE_REFUSALS", "channel_account", "budget_account"]

from ._escrow_terms import (  # noqa: E402,F401  (re-exported: the package's names)
    _HORIZON_LEAD_S,
    _STORAGE_DETAILS,
    ESCROW_REQUESTS,
    MAX_LISTED_BUDGETS,
    MAX_LISTED_CHANNELS,
    STORAGE_REFUSALS,
    EscrowError,
    Prepared,
    _derive_id,
    _Forget,
    _party_key,
    _Result,
    _source_key,
    budget_account,
    channel_account,
)


class EscrowAgent:
    """Applies escrow requests to a ledger and answers them, signed."""

    def __init__(
        self,
        ledger: Ledger,
        identity: Identity,
        operators: frozenset[str] | None = None,
        max_skew_s: int = 300,
        max_lifetime_s: int = 90 * 86400,
        min_lifetime_s: int = 60,
        refusals: RefusalBook | None = None,
    ) -> None:
        """Args:
            ledger: the durable ledger (its refusal horizon is read once, here).
            identity: the agent's key; it signs every answer and grant.
            operators: who may mint (default: the agent itself).
            max_skew_s: how far ``issued_at`` may be from the agent's clock.
            max_lifetime_s: the longest a channel or budget may live.
            min_lifetime_s: the shortest life a channel may have at open or after a top-up.
            refusals: the table of remembered refusals and the rate limit (default bounds:
                ``RefusalBook()``).
        """
        self.ledger = ledger
        self.identity = identity
        self.operators = operators if operators is not None else frozenset({identity.peer_id})
        self.max_skew_s = max_skew_s
        self.max_lifetime_s = max_lifetime_s
        self.min_lifetime_s = min_lifetime_s
        self.refusals = refusals if refusals is not None else RefusalBook()
        self._signed_receipt: tuple[Receipt, bool] | None = None  # set by apply_many, under the ledger lock
        try:
            with ledger.reading() as db:
                # refusals up to here may have been kept only by an earlier process: see the restart rule
                self._forgotten_through = self._refused_through = EscrowStore(db).refused_through()
        except LedgerDamaged:  # marked damaged: nothing will be applied; if it were, nothing is fresh enough
            self._forgotten_through = self._refused_through = 2**63 - 1
        self.damaged = ledger.damage is not None  # the ledger's mark, kept here so ``screen`` needs no ledger

    def verify(self) -> str | None:
        """Run the ledger's integrity check (``Ledger.verify``); a damaged ledger stops money operations.

        Returns:
            What is wrong (``None``: nothing found, or damaged already).
        """
        problem = self.ledger.verify()
        self.damaged = self.ledger.damage is not None
        return problem

    # ---- entry point ------------------------------------------------------------------------

    def screen(self, request: Any, now: int, source: str | None = None) -> EscrowResponse | None:
        """The answers that need no signature check and no ledger: not an escrow request, not
        fresh, an exact replay of a remembered refusal, or a party or source over its refusal
        limit. Cheap enough for an event loop: a hash, a dictionary and one signature.

        Args:
            source: who carried the request (the remote peer id), counted apart from the party.

        Returns:
            The signed answer, or ``None`` when the request needs ``handle``.
        """
        try:
            if type(request) not in ESCROW_REQUESTS:
                raise EscrowError("bad_request", f"{type(request).__name__} is not an escrow request")
            self._verify_fresh(request, now)
        except EscrowError as exc:
            self.refusals.note((_source_key(source),), now)
            return self._answer(request.request_id, now, None, exc)
        if not isinstance(request, EscrowQuery):
            if self.damaged:
                return self._storage_refusal(request.request_id, now, "ledger_damaged")
            kept = self.refusals.recall(request.request_id, now)
            if kept is not None and kept.digest == self._digest(request):
                return self._replayed(protocol.decode(kept.answer, expect=(EscrowResponse,)), now)
        why = self.refusals.limited((_party_key(request), _source_key(source)), now)
        if why is not None:
            return self._answer(request.request_id, now, None, EscrowError("rate_limited", why))
        return None

    def handle(self, request: Any, now: int, source: str | None = None) -> EscrowResponse:
        """Verify, apply (at most once) and answer one request. Never raises for a bad request:
        the answer carries the error code.

        Args:
            source: who carried the request (the remote peer id; ``None`` for this node's own),
                whose refusals are counted and limited like a party's.
        """
        prepared = self.prepare(request, now, source)
        if isinstance(prepared, EscrowResponse):
            return prepared
        try:
            return self._apply_once(request, now, prepared.keys)
        except LedgerError as exc:
            self.damaged = self.ledger.damage is not None
            return self._storage_refusal(request.request_id, now, exc.code)

    def prepare(self, request: Any, now: int, source: str | None = None) -> "EscrowResponse | Prepared":
        """Everything ``handle`` does before the ledger is written: screen, check the party's
        signature, answer a query. Thread-safe, and may run while another thread commits.

        Returns:
            The answer (a refusal, a query's answer), or the request ready for ``apply_many``.
        """
        early = self.screen(request, now, source)
        if early is not None:
            return early
        keys = (_party_key(request), _source_key(source))
        try:
            try:
                # only requests signed by their parties are counted against them or kept (forged ones cost no disk)
                if isinstance(request, EscrowClose):
                    self._verify_close(request)
                else:
                    self._verify_party(request)
            except EscrowError:
                self.refusals.note(keys[1:], now)
                raise
            if isinstance(request, EscrowQuery):
                try:
                    return self._answer(request.request_id, now, self._query(request, now))
                except EscrowError:
                    self.refusals.note(keys, now)
                    raise
        except EscrowError as exc:
            return self._answer(request.request_id, now, None, exc)
        except LedgerError as exc:
            self.damaged = self.ledger.damage is not None
            return self._storage_refusal(request.request_id, now, exc.code)
        receipt = getattr(request, "receipt", None) if isinstance(request, (EscrowClaim, EscrowClose)) else None
        return Prepared(request, now, keys, self._digest(request),
                        None if receipt is None else self._receipt_signed(receipt))

    @staticmethod
    def _receipt_signed(receipt: Receipt) -> bool:
        """Both of the receipt's signatures hold, by the parties it names (pure: no ledger)."""
        try:
            protocol.verify(receipt, "provider_sig", protocol.public_key_from_peer_id(receipt.provider))
            protocol.verify(receipt, "consumer_sig", protocol.public_key_from_peer_id(receipt.consumer))
        except protocol.ProtocolError:
            return False
        return True

    def refuse_unapplied(self, prepared: "Prepared") -> EscrowResponse:
        """The answer to a prepared request whose group commit failed unexpectedly: nothing was
        applied (``storage_error``: the very same request may be sent again)."""
        return self._storage_refusal(prepared.request.request_id, prepared.now, "storage_error")

    def apply_many(self, prepared: Sequence["Prepared"]) -> list[EscrowResponse]:
        """Apply prepared requests (``prepare``) with one commit — group commit: each is applied
        at most once, as ``handle`` would, in its own savepoint and in order; all become durable
        together, and the answers are given only after the commit. When the commit fails none was
        applied, and each gets the storage refusal (the same request applies once the disk takes
        writes again)."""
        answers: list[EscrowResponse] = []
        horizons: list[int] = []
        remembered: list[bytes] = []
        try:
            with self.ledger.batch() as batch:
                for p in prepared:
                    self._signed_receipt = (p.request.receipt, p.receipt_signed) if p.receipt_signed is not None else None
                    try:
                        with batch.each(p.request.request_id) as tx:
                            answer, horizon = self._apply_recorded(tx, p.request, p.digest, p.now, p.keys, remembered)
                    except _Forget as forgotten:
                        answer, horizon = forgotten.answer, None
                    finally:
                        self._signed_receipt = None
                    answers.append(answer)
                    if horizon is not None:
                        horizons.append(horizon)
        except BaseException as exc:
            for request_id in remembered:  # never given out: as if never seen
                self.refusals.forget(request_id)
            self.damaged = self.ledger.damage is not None
            if not isinstance(exc, LedgerError):
                raise  # the caller answers each with ``refuse_unapplied``
            return [self._storage_refusal(p.request.request_id, p.now, exc.code) for p in prepared]
        if horizons:  # committed: later refusals issued up to here need no write
            self._refused_through = max(self._refused_through, *horizons)
        return answers

    def _storage_refusal(self, request_id: bytes, now: int, code: str) -> EscrowResponse:
        """The answer to a request the ledger could not serve: not the party's doing, not counted."""
        return self._answer(request_id, now, None, EscrowError(code, _STORAGE_DETAILS.get(code, code)))

    @staticmethod
    def _digest(request: Any) -> bytes:
        return hashlib.sha256(protocol.encode(request)).digest()

    def _replayed(self, first: EscrowResponse, now: int) -> EscrowResponse:
        return self._sign(dataclasses.replace(
            first, ok=False, error="replayed", issued_at=now, sig=b"",
            detail=f"already answered ({first.error or 'ok'}); nothing changed"))

    def _recorded(self, store: EscrowStore, request: Any, digest: bytes, now: int) -> EscrowResponse | None:
        """The answer to a request answered before (durably, or in memory), or ``None``.

        Raises:
            EscrowError: ``request_id_reused``: the id was used by another request.
        """
        first = store.request(request.request_id)
        if first is not None:
            if first.digest != digest or first.answer is None:
                raise EscrowError("request_id_reused", "this request id was used by another request")
            return self._replayed(first.answer, now)
        kept = self.refusals.recall(request.request_id, now)
        if kept is not None:
            if kept.digest != digest:
                raise EscrowError("request_id_reused", "this request id was used by another request")
            return self._replayed(protocol.decode(kept.answer, expect=(EscrowResponse,)), now)
        return None

    def _apply_once(self, request: Any, now: int, keys: tuple[str, str | None]) -> EscrowResponse:
        """Raises:
            LedgerError: the ledger could not apply it (damaged, full, read-only): nothing was.
        """
        digest = self._digest(request)
        remembered: list[bytes] = []  # refusals remembered inside the transaction
        try:
            with self.ledger.transaction(request.request_id) as tx:
                answer, horizon = self._apply_recorded(tx, request, digest, now, keys, remembered)
        except _Forget as forgotten:
            return forgotten.answer
        except LedgerError:
            for request_id in remembered:  # its answer is never given out: the request is as if never seen
                self.refusals.forget(request_id)
            raise
        if horizon is not None:  # committed: later refusals issued up to here need no write
            self._refused_through = max(self._refused_through, horizon)
        return answer

    def _apply_recorded(self, tx: Tx, request: Any, digest: bytes, now: int, keys: tuple[str, str | None],
                        remembered: list[bytes]) -> tuple[EscrowResponse, int | None]:
        """Inside the request's transaction: answer a replay, or apply the request and record it,
        or keep its refusal (``_keep_refusal``).

        Returns:
            The answer, and the refusal horizon this transaction raises (``None``: unchanged).

        Raises:
            _Forget: refused and kept in memory only: roll the transaction back.
        """
        store = EscrowStore(tx.db)
        try:
            replay = self._recorded(store, request, digest, now)
            if replay is not None:
                return replay, None
            if request.issued_at <= self._forgotten_through:
                raise EscrowError("stale_request", f"issued at or before {self._forgotten_through}: the agent may "
                                  "have refused it before it restarted; sign it again")
        except EscrowError as exc:
            self.refusals.note(keys, now)
            return self._answer(request.request_id, now, None, exc), None
        try:
            with store.savepoint():
                result = self._apply(tx, store, request, now)
                answer = self._answer(request.request_id, now, result, store=store)
        except EscrowError as exc:
            answer = self._answer(request.request_id, now, None, exc)
            self.refusals.note(keys, now)
            return answer, self._keep_refusal(store, request, digest, answer, keys[0], now, remembered)
        store.record_request(RequestRecord(
            request_id=request.request_id, kind=type(request).KIND, party=getattr(request, "party", ""),
            digest=digest, applied_at=now, answer=answer))
        return answer, None

    def _keep_refusal(self, store: EscrowStore, request: Any, digest: bytes, answer: EscrowResponse, key: str,
                      now: int, remembered: list[bytes]) -> int | None:
        """Keep a refusal until its freshness window closes: in memory, first raising the durable
        horizon if it is the latest-issued refusal yet; durably, as an applied request is, when
        the table is full.

        Returns:
            The horizon written, or ``None`` for a durable record (either way: commit).

        Raises:
            _Forget: kept in memory, nothing to write: roll the transaction back.
        """
        kept = Remembered(digest=digest, answer=protocol.encode(answer), key=key,
                          expires_at=request.issued_at + self.max_skew_s)
        # a refusal dated ahead of our clock is stored durably: were it to raise the horizon,
        # anyone could make every request after a restart stale for up to max_skew_s
        if request.issued_at > now + _HORIZON_LEAD_S or not self.refusals.remember(request.request_id, kept, now):
            store.record_request(RequestRecord(
                request_id=request.request_id, kind=type(request).KIND, party=getattr(request, "party", ""),
                digest=digest, applied_at=now, answer=answer))
            return None
        remembered.append(request.request_id)
        if request.issued_at <= self._refused_through:
            raise _Forget(answer)
        store.set_refused_through(request.issued_at)
        return request.issued_at

    def _apply(self, tx: Tx, store: EscrowStore, request: Any, now: int) -> _Result:
        handlers: dict[type, Callable[[Tx, EscrowStore, Any, int], _Result]] = {
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
        return handlers[type(request)](tx, store, request, now)

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
            ch = self._channel(EscrowStore(db), request.channel_id)
        try:
            protocol.verify(request, "consumer_sig", protocol.public_key_from_peer_id(ch.consumer))
            protocol.verify(request, "provider_sig", protocol.public_key_from_peer_id(ch.provider))
        except protocol.ProtocolError as exc:
            raise EscrowError("bad_signature", "a cooperative close is signed by both channel parties") from exc

    def _check_expiry(self, expires_at: int, now: int) -> None:
        if not now < expires_at <= now + self.max_lifetime_s:
            raise EscrowError("bad_expiry", f"expiry must be after now and within {self.max_lifetime_s}s")

    def _check_channel_life(self, expires_at: int, now: int) -> None:
        """A channel's expiry (at open, or after a top-up) leaves it at least ``min_lifetime_s``."""
        self._check_expiry(expires_at, now)
        if expires_at < now + self.min_lifetime_s:
            raise EscrowError("bad_expiry", f"a channel must live at least {self.min_lifetime_s}s "
                              f"(expires in {expires_at - now}s)")

    @staticmethod
    def _need(tx: Tx, account: str, amount: int) -> None:
        if tx.balance(account) < amount:
            raise EscrowError("insufficient_funds", f"{account} holds {tx.balance(account)}, needs {amount}")

    @staticmethod
    def _positive(amount: int, what: str) -> None:
        if amount <= 0:
            raise EscrowError("bad_request", f"{what} must be positive")

    @staticmethod
    def _channel(store: EscrowStore, channel_id: bytes) -> ChannelRow:
        ch = store.channel(channel_id)
        if ch is None:
            raise EscrowError("unknown_channel", f"no channel {channel_id.hex()}")
        return ch

    @staticmethod
    def _budget(store: EscrowStore, budget_id: bytes) -> BudgetRow:
        b = store.budget(budget_id)
        if b is None:
            raise EscrowError("unknown_budget", f"no budget {budget_id.hex()}")
        return b

    def _verify_receipt(self, ch: ChannelRow, receipt: Receipt) -> None:
        checked = self._signed_receipt  # checked by ``prepare``, outside the commit (``apply_many``)
        signed = checked[1] if checked is not None and checked[0] is receipt else self._receipt_signed(receipt)
        if not signed:
            raise EscrowError("bad_receipt", "the receipt must carry valid provider and consumer signatures")
        if receipt.agent != self.identity.peer_id:
            raise EscrowError("wrong_agent", "the receipt names another escrow agent")
        if receipt.provider != ch.provider or receipt.consumer != ch.consumer:
            raise EscrowError("bad_receipt", "the receipt's parties are not the channel's")

    @staticmethod
    def _open_channel(ch: ChannelRow, now: int) -> None:
        if ch.status != "open":
            raise EscrowError("channel_closed", f"the channel is {ch.status}")
        if now >= ch.expires_at:
            raise EscrowError("channel_expired", "the channel has expired")

    # ---- money movements --------------------------------------------------------------------

    def _mint(self, tx: Tx, store: EscrowStore, req: EscrowMint, now: int) -> _Result:
        if req.party not in self.operators:
            raise EscrowError("not_operator", "only the agent's operator mints (devnet rail)")
        self._positive(req.amount, "amount")
        tx.transfer(MINT, peer_account(req.to), req.amount)
        return _Result(paid=req.amount, balance_of=req.to)

    def _withdraw(self, tx: Tx, store: EscrowStore, req: EscrowWithdraw, now: int) -> _Result:
        self._positive(req.amount, "amount")
        self._need(tx, peer_account(req.party), req.amount)
        tx.transfer(peer_account(req.party), WITHDRAWN, req.amount)
        return _Result(paid=req.amount, balance_of=req.party)

    def _grant(self, channel_id: bytes, consumer: str, provider: str, cap: int, expires_at: int,
               budget_id: bytes | None) -> ChannelGrant:
        return protocol.sign(ChannelGrant(agent=self.identity.peer_id, channel_id=channel_id, consumer=consumer,
                                          provider=provider, cap=cap, expires_at=expires_at, budget_id=budget_id),
                             "sig", self.identity)

    def _draw_budget(self, tx: Tx, store: EscrowStore, budget_id: bytes, consumer: str, cap_after: int, add: int,
                     now: int) -> str:
        b = self._budget(store, budget_id)
        if b.status != "active" or now >= b.expires_at:
            raise EscrowError("budget_closed", "the budget is refunded or expired")
        if not store.is_member(budget_id, consumer):
            raise EscrowError("not_whitelisted", f"{consumer} may not draw on this budget")
        if cap_after > b.per_session_limit:
            raise EscrowError("over_session_limit", f"a channel on this budget holds at most {b.per_session_limit}")
        source = budget_account(budget_id)
        self._need(tx, source, add)
        return source

    def _open(self, tx: Tx, store: EscrowStore, req: EscrowOpen, now: int) -> _Result:
        self._positive(req.cap, "cap")
        self._check_channel_life(req.expires_at, now)
        if req.provider == req.party:
            raise EscrowError("bad_request", "a channel joins two different parties")
        if req.budget_id is not None:
            source = self._draw_budget(tx, store, req.budget_id, req.party, req.cap, req.cap, now)
        else:
            source = peer_account(req.party)
            self._need(tx, source, req.cap)
        channel_id = _derive_id(b"inferswarm/channel", req.request_id)
        grant = self._grant(channel_id, req.party, req.provider, req.cap, req.expires_at, req.budget_id)
        ch = ChannelRow(channel_id=channel_id, consumer=req.party, provider=req.provider, cap=req.cap,
                        expires_at=req.expires_at, budget_id=req.budget_id, claimed=0, status="open", grant=grant)
        store.insert_channel(ch)
        tx.transfer(source, channel_account(channel_id), req.cap)
        return _Result(channels=(ch.state(),), balance_of=req.party)

    def _topup(self, tx: Tx, store: EscrowStore, req: EscrowTopUp, now: int) -> _Result:
        ch = self._channel(store, req.channel_id)
        if req.party != ch.consumer:
            raise EscrowError("not_channel_party", "only the channel's consumer adds funds")
        self._open_channel(ch, now)
        if req.expires_at < ch.expires_at:
            raise EscrowError("bad_expiry", "a channel's expiry can only move later")
        self._check_channel_life(req.expires_at, now)
        if req.add == 0 and req.expires_at == ch.expires_at:
            raise EscrowError("bad_request", "nothing to add or extend")
        cap = ch.cap + req.add
        if req.add:
            if ch.budget_id is not None:
                source = self._draw_budget(tx, store, ch.budget_id, req.party, cap, req.add, now)
            else:
                source = peer_account(req.party)
                self._need(tx, source, req.add)
            tx.transfer(source, channel_account(req.channel_id), req.add)
        store.set_terms(self._grant(req.channel_id, ch.consumer, ch.provider, cap, req.expires_at, ch.budget_id))
        return _Result(channels=(self._channel(store, req.channel_id).state(),), balance_of=req.party)

    def _pay(self, tx: Tx, store: EscrowStore, ch: ChannelRow, receipt: Receipt, strict: bool) -> int:
        """Pay ``cumulative - claimed`` for the receipt's session (the receipt is for ``ch``).

        Returns:
            What was paid (0 for a receipt already paid, when not ``strict``).

        Raises:
            EscrowError: ``already_claimed`` (when ``strict``), ``over_cap``.
        """
        before = store.session_claimed(ch.channel_id, receipt.session_id)
        if receipt.cumulative <= before:
            if strict:
                raise EscrowError("already_claimed", f"{before} already claimed for this session")
            return 0
        pay = receipt.cumulative - before
        if ch.claimed + pay > ch.cap:
            raise EscrowError("over_cap", f"claims would reach {ch.claimed + pay}, over the cap {ch.cap}")
        tx.transfer(channel_account(ch.channel_id), peer_account(ch.provider), pay)
        store.record_session_claim(receipt)
        store.add_claimed(ch.channel_id, pay)
        return pay

    def _claim(self, tx: Tx, store: EscrowStore, req: EscrowClaim, now: int) -> _Result:
        ch = self._channel(store, req.receipt.channel_id)
        if req.party != ch.provider:
            raise EscrowError("wrong_provider", "only the channel's provider claims")
        self._open_channel(ch, now)
        self._verify_receipt(ch, req.receipt)
        paid = self._pay(tx, store, ch, req.receipt, strict=True)
        return _Result(paid=paid, channels=(self._channel(store, ch.channel_id).state(),), balance_of=req.party)

    def _release(self, tx: Tx, store: EscrowStore, ch: ChannelRow, status: str) -> int:
        """Return what the channel still holds to where it came from; mark it ``status``."""
        rest = tx.balance(channel_account(ch.channel_id))
        if rest:
            if ch.budget_id is not None:
                b = self._budget(store, ch.budget_id)
                dst = budget_account(b.budget_id) if b.status == "active" else peer_account(b.funder)
            else:
                dst = peer_account(ch.consumer)
            tx.transfer(channel_account(ch.channel_id), dst, rest)
        store.set_channel_status(ch.channel_id, status)
        return rest

    def _close(self, tx: Tx, store: EscrowStore, req: EscrowClose, now: int) -> _Result:
        ch = self._channel(store, req.channel_id)
        if ch.status != "open":
            raise EscrowError("channel_closed", f"the channel is {ch.status}")
        paid = 0
        if req.receipt is not None:
            if req.receipt.channel_id != req.channel_id:
                raise EscrowError("bad_receipt", "the receipt is for another channel")
            self._verify_receipt(ch, req.receipt)
            paid = self._pay(tx, store, ch, req.receipt, strict=False)
        self._release(tx, store, ch, "closed")
        return _Result(paid=paid, channels=(self._channel(store, req.channel_id).state(),), balance_of=ch.consumer)

    def _refund(self, tx: Tx, store: EscrowStore, req: EscrowRefund, now: int) -> _Result:
        ch = self._channel(store, req.channel_id)
        if req.party != ch.consumer:
            raise EscrowError("not_channel_party", "only the channel's consumer reclaims it")
        if ch.status != "open":
            raise EscrowError("channel_closed", f"the channel is {ch.status}")
        if now < ch.expires_at:
            raise EscrowError("not_expired", "a channel is reclaimed after its expiry (or closed by both parties)")
        self._release(tx, store, ch, "refunded")
        return _Result(channels=(self._channel(store, req.channel_id).state(),), balance_of=req.party)

    def _budget_create(self, tx: Tx, store: EscrowStore, req: EscrowBudgetCreate, now: int) -> _Result:
        self._positive(req.amount, "amount")
        self._positive(req.per_session_limit, "per_session_limit")
        self._check_expiry(req.expires_at, now)
        if not req.whitelist:
            raise EscrowError("bad_request", "a budget whitelists at least one consumer")
        self._need(tx, peer_account(req.party), req.amount)
        budget_id = _derive_id(b"inferswarm/budget", req.request_id)
        store.insert_budget(BudgetRow(budget_id=budget_id, funder=req.party, amount=req.amount,
                                      per_session_limit=req.per_session_limit, expires_at=req.expires_at,
                                      status="active"), req.whitelist)
        tx.transfer(peer_account(req.party), budget_account(budget_id), req.amount)
        return _Result(budget_id=budget_id, budgets=(self._budget_state(store, budget_id),), balance_of=req.party)

    def _budget_refund(self, tx: Tx, store: EscrowStore, req: EscrowBudgetRefund, now: int) -> _Result:
        b = self._budget(store, req.budget_id)
        if req.party != b.funder:
            raise EscrowError("not_budget_funder", "only the funder refunds a budget")
        if b.status != "active":
            raise EscrowError("budget_closed", "the budget was refunded already")
        self._close_budget(tx, store, b)
        return _Result(budget_id=req.budget_id, budgets=(self._budget_state(store, req.budget_id),),
                       balance_of=req.party)

    @staticmethod
    def _close_budget(tx: Tx, store: EscrowStore, b: BudgetRow) -> None:
        rest = tx.balance(budget_account(b.budget_id))
        if rest:
            tx.transfer(budget_account(b.budget_id), peer_account(b.funder), rest)
        store.set_budget_status(b.budget_id, "refunded")

    # ---- expiry -----------------------------------------------------------------------------

    def sweep(self, now: int) -> int:
        """Return what expired channels and budgets still hold (each once, durably).

        Returns:
            How many channels and budgets were settled (0, trying nothing, once the ledger is damaged).

        Raises:
            LedgerError: the ledger failed (damaged, full, read-only): what was settled stays settled.
        """
        try:
            return self._sweep(now)
        finally:
            self.damaged = self.ledger.damage is not None

    def _sweep(self, now: int) -> int:
        if self.ledger.damage is not None:
            return 0
        with self.ledger.reading() as db:
            store = EscrowStore(db)
            channels = store.open_channels_expired_by(now)
            budgets = store.active_budgets_expired_by(now)
        for cid in channels:
            request_id = _derive_id(b"inferswarm/sweep/channel", cid)
            with self.ledger.transaction(request_id) as tx:
                store = EscrowStore(tx.db)
                ch = self._channel(store, cid)
                if ch.status == "open" and ch.expires_at <= now:
                    self._release(tx, store, ch, "refunded")
                    self._record_internal(store, request_id, "sweep_channel", now)
        for bid in budgets:
            request_id = _derive_id(b"inferswarm/sweep/budget", bid)
            with self.ledger.transaction(request_id) as tx:
                store = EscrowStore(tx.db)
                b = self._budget(store, bid)
                if b.status == "active" and b.expires_at <= now:
                    self._close_budget(tx, store, b)
                    self._record_internal(store, request_id, "sweep_budget", now)
        return len(channels) + len(budgets)

    def _record_internal(self, store: EscrowStore, request_id: bytes, kind: str, now: int) -> None:
        store.record_request(RequestRecord(request_id=request_id, kind=kind, party=self.identity.peer_id, digest=b"",
                                           applied_at=now, answer=None), if_absent=True)

    # ---- reading ----------------------------------------------------------------------------

    def _budget_state(self, store: EscrowStore, budget_id: bytes) -> BudgetState:
        b = self._budget(store, budget_id)
        return BudgetState(budget_id=budget_id, funder=b.funder, amount=b.amount,
                           remaining=store.held(budget_account(budget_id)), whitelist=store.members(budget_id),
                           per_session_limit=b.per_session_limit, expires_at=b.expires_at, status=b.status)

    @staticmethod
    def _balance(store: EscrowStore, party: str) -> Balance:
        """Available: the party's own account. Locked: the channels it funded itself, plus its budgets
        (a channel drawn from a budget counts for neither its consumer nor the funder)."""
        return Balance(available=store.held(peer_account(party)),
                       locked=store.locked_in_channels(party) + store.locked_in_budgets(party))

    def _query(self, req: EscrowQuery, now: int) -> _Result:
        with self.ledger.reading() as db:
            store = EscrowStore(db)
            if req.channel_id is not None:
                ch = self._channel(store, req.channel_id)
                if req.party not in (ch.consumer, ch.provider):
                    raise EscrowError("not_channel_party", "only the channel's parties may see it")
                return _Result(channels=(ch.state(),))
            channels = store.channels_of(req.party, last=MAX_LISTED_CHANNELS)
            budget_ids = store.budget_ids_of(req.party, last=MAX_LISTED_BUDGETS)
            return _Result(channels=tuple(ch.state() for ch in channels),
                           budgets=tuple(self._budget_state(store, b) for b in budget_ids), balance_of=req.party)

    def balance(self, party: str) -> Balance:
        with self.ledger.reading() as db:
            return self._balance(EscrowStore(db), party)

    def _answer(self, request_id: bytes, now: int, result: _Result | None, error: EscrowError | None = None,
                store: EscrowStore | None = None) -> EscrowResponse:
        """The signed answer: an error, or ``result`` with the balance read through ``store`` (the
        transaction that applied it) or, without one, in a read of its own."""
        if error is not None or result is None:
            return self._sign(EscrowResponse(request_id=request_id, agent=self.identity.peer_id, ok=False,
                                             error=error.code if error else "bad_request",
                                             detail=(error.detail if error else "")[:512], issued_at=now))
        balance = None
        if result.balance_of is not None:
            if store is not None:
                balance = self._balance(store, result.balance_of)
            else:
                with self.ledger.reading() as db:
                    balance = self._balance(EscrowStore(db), result.balance_of)
        return self._sign(EscrowResponse(request_id=request_id, agent=self.identity.peer_id, ok=True,
                                         balance=balance, channels=result.channels, budgets=result.budgets,
                                         paid=result.paid, budget_id=result.budget_id, issued_at=now))

    def _sign(self, response: EscrowResponse) -> EscrowResponse:
        return protocol.sign(response, "sig", self.identity)

    def check(self) -> dict[str, int]:
        """The ledger invariant plus: every channel account holds what its record says.

        Returns:
            The ledger's totals (``Ledger.check``).

        Raises:
            InvariantViolation: with the first thing that does not add up.
        """
        totals = self.ledger.check()
        with self.ledger.reading() as db:
            store = EscrowStore(db)
            for ch in store.channels():
                held = store.held(channel_account(ch.channel_id))
                want = ch.cap - ch.claimed if ch.status == "open" else 0
                if held != want or ch.claimed > ch.cap:
                    raise InvariantViolation(f"channel {ch.channel_id.hex()} holds {held}, its record says {want}")
        return totals
