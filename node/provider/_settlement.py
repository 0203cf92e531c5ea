"""The provider's settlement worker: collects every counter-signed receipt from its escrow agent.

What is owed lives in ``ChannelBook`` (in memory) and ``receipts.db`` (durable: every
counter-signed receipt, and the agent's word on each payment, ``ReceiptStore.record_claim``).
``SettlementWorker.serve`` runs for the node's life:

- **Start.** Every receipt the store holds unpaid is loaded into the book (a restart), and the
  agent is asked each loaded channel's state (its expiry, so the claim margin applies again).
- **Claims.** What ``ChannelBook.due`` says: periodically while a session runs, at its end,
  ``margin_s`` before its channel's expiry, and after a failed claim with exponential backoff
  (capped), across agent outages and this node's restarts. Never given up while the channel can
  still pay: only the agent's final refusal ends a debt, logged once at error level with the
  amount forfeited.
- **Reconciled with the agent's answers.** A claim keeps its signed request while it is fresh,
  so a retry after a lost answer is a replay that returns the original answer (what was paid).
  ``already_claimed``, or a final refusal of a receipt whose channel the agent says it paid
  (a close before a crash, a claim made by hand), means paid: the channel's total as the agent
  reports it is recorded, so ``node earnings`` adds up to what the agent paid.
- **Storage faults.** A failed write to ``receipts.db`` is logged by the store; the debt stays in
  the book and is still claimed.

Bounds: at most ``concurrency`` claims in flight, one per channel; the book bounds the debts held.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

import trio

import protocol
from wallet import Identity

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from .._receipts import FORFEITED, ReceiptStore, ReceiptStoreError
from ..escrow import EscrowClient, EscrowUnreachable
from ._channels import ChannelBook, SessionDebt

__all__ = ["SettlementWorker", "FINAL_REFUSALS"]

_logger = logging.getLogger(__name__)
# the agent's answers after which a claim can never succeed
FINAL_REFUSALS = frozenset({"channel_expired", "channel_closed", "unknown_channel", "over_cap", "bad_receipt",
                            "wrong_agent", "wrong_provider"})
_REPLAYED = re.compile(r"already answered \(([a-z_]+)\)")
_REQUEST_FRESH_S = 120  # a claim's signed request is replayed this long (the agent accepts 300 s of skew)


class SettlementWorker:
    """Claims what ``book`` says is due from the agents, and records their answers in ``receipts``."""

    def __init__(self, identity: Identity, escrow: EscrowClient, receipts: ReceiptStore, book: ChannelBook,
                 wall_clock: WallClock = SYSTEM_WALL_CLOCK, *, concurrency: int = 8) -> None:
        self.identity = identity
        self.escrow = escrow
        self.receipts = receipts
        self.book = book
        self.wall_clock = wall_clock
        self.concurrency = concurrency
        self._wake = trio.Event()
        self._requests: dict[bytes, tuple[int, protocol.EscrowClaim]] = {}  # session -> (cumulative, request)

    def now(self) -> int:
        return int(self.wall_clock())

    def wake(self) -> None:
        """Look at what is due now rather than at the next tick."""
        self._wake.set()

    def _signed(self, cls: type, **fields: Any) -> Any:
        msg = cls(request_id=secrets.token_bytes(16), party=self.identity.peer_id, issued_at=self.now(), **fields)
        return protocol.sign(msg, "sig", self.identity)

    async def serve(self, tick_s: float = 1.0, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Claim what is due until cancelled: first load every receipt the store holds unpaid."""
        try:
            rows = await trio.to_thread.run_sync(self.receipts.unclaimed, "provider")
        except ReceiptStoreError as exc:
            _logger.error("cannot load unpaid receipts: %s", exc)
            rows = []
        self.book.load(rows)
        if rows:
            _logger.info("settling %d unpaid sessions (%d µc) left from before", len(rows),
                         sum(r.cumulative for r in rows))
        task_status.started()
        limiter = trio.CapacityLimiter(self.concurrency)

        async def one(debt: SessionDebt) -> None:
            async with limiter:
                await self.claim_debt(debt)

        async def learn(agent: str, channel_id: bytes) -> None:
            async with limiter:
                await self.channel_state(agent, channel_id)

        async with trio.open_nursery() as nursery:
            for agent, channel_id in self.book.channels_unknown():
                nursery.start_soon(learn, agent, channel_id)
            while True:
                for debt in self.book.due(self.now()):
                    nursery.start_soon(one, debt)
                with trio.move_on_after(tick_s):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def channel_state(self, agent: str, channel_id: bytes) -> protocol.ChannelState | None:
        """The agent's word on ``channel_id`` (its expiry is learnt by the book); None if it cannot say."""
        try:
            r = await self.escrow.call(agent, self._signed(protocol.EscrowQuery, channel_id=channel_id))
        except (EscrowUnreachable, ValueError) as exc:
            _logger.info("cannot ask agent %s about channel %s: %s", agent, channel_id.hex(), exc)
            return None
        if not r.ok or not r.channels:
            _logger.info("agent %s would not say about channel %s: %s %s", agent, channel_id.hex(), r.error, r.detail)
            return None
        state = r.channels[0]
        self.book.learn(channel_id, state.channel.expires_at)
        return state

    async def claim_debt(self, debt: SessionDebt) -> bool:
        """Claim ``debt``'s latest receipt (marked as being claimed by ``ChannelBook.start_claim``
        or ``due``) and record the outcome in the book and the store; True once paid."""
        receipt = debt.last
        if receipt is None:  # nothing signed yet: nothing to claim
            debt.claiming = False
            return True
        try:
            outcome = await self.claim(receipt)
        except BaseException:  # cut short (the node is stopping): retried later, or from receipts.db after a restart
            self.book.failed(receipt, self.now())
            raise
        if outcome:
            self.book.paid(receipt)
            self._requests.pop(receipt.session_id, None)
        elif outcome is None:
            self.book.failed(receipt, self.now(), final=True)
            self._requests.pop(receipt.session_id, None)
        else:
            retry_at = self.book.failed(receipt, self.now())
            _logger.info("claim of %d µc on channel %s will be retried in %ds", receipt.cumulative,
                         receipt.channel_id.hex(), max(0, retry_at - self.now()))
        return bool(outcome)

    def _request(self, receipt: protocol.Receipt) -> protocol.EscrowClaim:
        """This receipt's signed claim: the one sent before while it is fresh (a retry after a
        lost answer is then a replay, answered with what was paid), else a new one."""
        kept = self._requests.get(receipt.session_id)
        if kept is not None and kept[0] == receipt.cumulative and self.now() - kept[1].issued_at < _REQUEST_FRESH_S:
            return kept[1]
        request = self._signed(protocol.EscrowClaim, receipt=receipt)
        self._requests[receipt.session_id] = (receipt.cumulative, request)
        if len(self._requests) > 2 * len(self.book) + 64:  # bounded: only debts the book still holds
            for sid in [s for s in self._requests if self.book.session(s) is None]:
                del self._requests[sid]
        return request

    async def claim(self, receipt: protocol.Receipt) -> bool | None:
        """Claim what ``receipt`` (doubly signed) is owed and record the agent's answer.

        Returns:
            True once the agent has paid it (now or before); None when it never will (its final
            refusal: logged with what is forfeited); False to try again later.
        """
        try:
            r = await self.escrow.call(receipt.agent, self._request(receipt))
        except (EscrowUnreachable, ValueError) as exc:
            _logger.warning("claim of %d µc on channel %s failed: %s", receipt.cumulative, receipt.channel_id.hex(),
                            exc)
            return False
        code = r.error if not r.ok else "ok"
        if code == "replayed":  # the first answer to this very request, with what it paid
            m = _REPLAYED.match(r.detail)
            code = m.group(1) if m else "replayed"
        if code == "ok":
            state = r.channels[0] if r.channels else None
            if state is not None:
                self.book.learn(receipt.channel_id, state.channel.expires_at)
            await self._paid(receipt, r.paid, state, "claim")
            return True
        if code == "already_claimed":  # paid, perhaps by a payment recorded nowhere here: learn the channel's total
            state = await self.channel_state(receipt.agent, receipt.channel_id)
            if state is None:
                return False  # asked again later, so the report learns what was paid
            await self._paid(receipt, 0, state, "claim")
            return True
        if code in FINAL_REFUSALS:
            return await self._refused_for_good(receipt, code, r.detail)
        if code in ("stale_request", "request_id_reused"):
            self._requests.pop(receipt.session_id, None)  # sign a fresh one next time
        _logger.warning("claim of %d µc on channel %s refused for now: %s %s", receipt.cumulative,
                        receipt.channel_id.hex(), code, r.detail)
        return False

    async def _refused_for_good(self, receipt: protocol.Receipt, code: str, detail: str) -> bool | None:
        """A final refusal. If the agent's channel total shows the channel paid everything signed
        on it (a close or a hand-made claim this node did not record), it is paid; else what is
        still unpaid of this session is forfeited, logged once."""
        state = None
        if code not in ("unknown_channel", "wrong_agent"):
            state = await self.channel_state(receipt.agent, receipt.channel_id)
        owed = receipt.cumulative - (d.claimed if (d := self.book.session(receipt.session_id)) else 0)
        if state is not None:
            try:
                await trio.to_thread.run_sync(lambda: self.receipts.record_claim(
                    receipt.agent, receipt.channel_id, None, 0, 0, channel_claimed=state.claimed, how="reconciled"))
                signed = await trio.to_thread.run_sync(self.receipts.signed_on_channel, receipt.channel_id)
            except ReceiptStoreError:
                signed = state.claimed + owed
            owed = min(owed, max(0, signed - state.claimed))
            if owed <= 0:
                await self._mark(receipt)
                _logger.info("receipt of %d µc on channel %s was already paid (%s)", receipt.cumulative,
                             receipt.channel_id.hex(), code)
                return True
        _logger.error("claim refused for good (%s: %s): %d µc of session %s on channel %s are forfeited", code, detail,
                      owed, receipt.session_id.hex(), receipt.channel_id.hex())
        try:
            await trio.to_thread.run_sync(lambda: self.receipts.record_claim(
                receipt.agent, receipt.channel_id, receipt.session_id, receipt.cumulative, 0, how="forfeited",
                forfeited=owed))
        except ReceiptStoreError:
            pass
        await self._mark(receipt, FORFEITED)
        return None

    async def _paid(self, receipt: protocol.Receipt, paid: int, state: protocol.ChannelState | None, how: str) -> None:
        try:
            await trio.to_thread.run_sync(lambda: self.receipts.record_claim(
                receipt.agent, receipt.channel_id, receipt.session_id, receipt.cumulative, paid,
                channel_claimed=state.claimed if state is not None else None, how=how))
        except ReceiptStoreError:
            pass  # logged by the store; the agent's books are right, only our report lags
        await self._mark(receipt)

    async def _mark(self, receipt: protocol.Receipt, state: int = 1) -> None:
        try:
            await trio.to_thread.run_sync(self.receipts.mark_claimed, receipt, state)
        except ReceiptStoreError:
            pass  # logged by the store; after a restart the claim is answered already_claimed

    async def closed(self, receipt: protocol.Receipt | None, response: protocol.EscrowResponse) -> None:
        """A cooperative close settled the channel (``response`` is the agent's answer): record it."""
        state = response.channels[0] if response.channels else None
        if receipt is None:
            return
        await self._paid(receipt, response.paid, state, "close")
