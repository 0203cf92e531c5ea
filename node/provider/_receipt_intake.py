"""The provider side of ``protocol.RECEIPT_PROTOCOL``: takes in doubly-signed receipts whose
counter-signature never reached the session (the stream died, the session timed out), stores
them, hands them to settlement and acknowledges each.

Rules: only a receipt this provider signed itself, delivered by its own consumer, with a consumer
signature that verifies, is taken (``protocol.check_delivered``); anything else is refused with
its reason and costs nothing. Taking one is idempotent: a receipt already stored is acknowledged
again without touching the store or the book. A new one goes to the book (``service.book``: a
session it no longer knows is loaded as ended and owed), settlement is woken, and it is stored
(``service.receipts``); the ``CounterSignAck`` leaves only once it is stored (a store that
cannot take it answers ``unavailable``: the consumer sends it again later).

Bounds (a hostile peer can make us hold little): each frame at most ``RECEIPT_FRAME_MAX``, each
read within ``read_timeout_s``, a stream lives at most ``lifetime_s`` and carries at most
``RECEIPTS_PER_STREAM`` receipts; each peer has a token bucket (``burst`` receipts, refilled at
``rate_per_s``; ``max_peers`` buckets, the least recently used dropped first) checked before any
signature is verified.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
from typing import Any

import trio

import protocol

from .._receipts import ReceiptStoreError
from ..net._streams import FramedStream, StreamClosed

__all__ = ["ReceiptIntake"]

_logger = logging.getLogger(__name__)


class ReceiptIntake:
    """Receipts redelivered to a ``ProviderService``; ``handle`` is the stream handler."""

    def __init__(self, service: Any, *, rate_per_s: float = 2.0, burst: int = 64, max_peers: int = 4096,
                 read_timeout_s: float = 5.0, lifetime_s: float = 30.0) -> None:
        """
        Args:
            service: the ``ProviderService`` (its ``identity``, ``receipts``, ``book`` and
                ``wake_settlement`` only).
        """
        self.service = service
        self.rate_per_s, self.burst, self.max_peers = rate_per_s, burst, max_peers
        self.read_timeout_s, self.lifetime_s = read_timeout_s, lifetime_s
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _allow(self, peer: str) -> float:
        """Take a token from ``peer``'s bucket: 0.0 when allowed, else the seconds until one is free."""
        now = trio.current_time()
        tokens, at = self._buckets.pop(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate_per_s
        self._buckets[peer] = (tokens, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return wait

    def _refusal(self, receipt: protocol.Receipt, sender: str | None) -> protocol.ReceiptRefused | None:
        rid = protocol.receipt_hash(receipt)
        me = self.service.identity.peer_id
        try:
            protocol.check_delivered(receipt, me, sender)
            return None
        except protocol.ProtocolError as exc:
            error = exc
        try:
            mine = receipt.provider == me
            if mine:
                protocol.verify(receipt, "provider_sig", protocol.public_key_from_peer_id(me))
        except protocol.ProtocolError:
            mine = False
        if not mine:
            reason = "not_mine"
        elif sender is not None and sender != receipt.consumer:
            reason = "not_sender"
        else:
            reason = "bad_signature"
        return protocol.ReceiptRefused(receipt_hash=rid, reason=reason, detail=str(error)[:500])

    def _held(self, receipt_id: bytes) -> bool:
        return bool(self.service.receipts.query("SELECT 1 FROM receipts WHERE receipt_id = ? AND role = 'provider'",
                                                (receipt_id,)))

    async def take(self, receipt: protocol.Receipt, sender: str | None) -> Any:
        """Check, store and acknowledge one redelivered receipt from ``sender`` (None: not known).

        Returns:
            The signed ``CounterSignAck``, or a ``ReceiptRefused`` saying why not.
        """
        rid = protocol.receipt_hash(receipt)
        wait = self._allow(sender or "?")
        if wait:
            return protocol.ReceiptRefused(receipt_hash=rid, reason="rate_limited",
                                           detail="too many receipts from this peer",
                                           retry_after_s=max(1, min(86400, int(wait + 0.999))))
        refused = self._refusal(receipt, sender)
        if refused is not None:
            _logger.info("refused a redelivered receipt from %s: %s (%s)", sender, refused.reason, refused.detail)
            return refused
        service = self.service
        try:
            if not await trio.to_thread.run_sync(self._held, rid):
                # the book first, as for a counter-signature on the session: claimed even if the
                # store fails (then it is not acknowledged, and comes again)
                if service.book.session(receipt.session_id) is not None:
                    service.book.countersigned(receipt)
                else:
                    service.book.load([receipt])
                service.wake_settlement()
                await service.receipts.put(receipt, "provider")
                service.admission.forgive_unpaid(receipt.consumer)  # it paid the call it was refused for
                _logger.info("took a redelivered receipt of %s µc from %s", receipt.cumulative, sender)
        except (ReceiptStoreError, sqlite3.Error, OSError) as exc:
            _logger.error("cannot store a redelivered receipt: %s", exc)  # not acknowledged: it comes again
            return protocol.ReceiptRefused(receipt_hash=rid, reason="unavailable",
                                           detail="this provider cannot store receipts now", retry_after_s=30)
        return protocol.acknowledge(receipt, service.identity)

    async def handle(self, stream: Any) -> None:
        """One stream of redelivered receipts (the libp2p stream handler)."""
        peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
        sender = str(peer) if peer is not None else None
        framed = FramedStream(stream, max_size=protocol.RECEIPT_FRAME_MAX, read_timeout_s=self.read_timeout_s)
        try:
            with trio.move_on_after(self.lifetime_s):
                for _ in range(protocol.RECEIPTS_PER_STREAM):
                    try:
                        receipt = await framed.receive(expect=(protocol.Receipt,))
                    except (StreamClosed, protocol.ProtocolError):
                        return
                    answer = await self.take(receipt, sender)
                    with trio.move_on_after(self.read_timeout_s) as sending:  # a peer that reads nothing
                        await framed.send(answer)
                    if sending.cancelled_caught:
                        return
                    if isinstance(answer, protocol.ReceiptRefused) and answer.reason == "rate_limited":
                        return
        except StreamClosed:
            return
        finally:
            await framed.close()
