"""A node's verification: its spot checker, its evidence book and the evidence topic.

``open_verification`` loads the backends ``[spot_checks] backends`` names (once, at start: each
is held under its own commitment), hooks the renter so every settled call is offered to the
checker, and joins ``protocol.EVIDENCE_TOPIC``:

- a bundle from the network is taken in only if it is at most ``MAX_EVIDENCE_BYTES``, decodes
  strictly, passes ``protocol.check_evidence`` and its verifier is within its rate (a burst of
  ``EVIDENCE_BURST``, then one per ``EVIDENCE_EVERY_S``); otherwise it is dropped and not relayed;
- a bundle taken in is stored unconfirmed. When this node holds the committed weights it
  re-runs the request itself (queued, bounded by ``CONFIRM_QUEUE``; a full queue skips it); if
  its own verdict also fails, the bundle is confirmed and the provider is caught here too.
  Without the weights a bundle is the verifier's word: it is held and shown, and moves no
  routing (a stranger's claim never takes a provider's business).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import trio

import protocol
from wallet import Identity

from .._clock import WallClock
from ..net._market import Market
from ..net._topics import RateLimit, Topic, open_topic
from ..provider.backends import Backend, BackendError
from ._evidence_book import EvidenceBook
from ._rerun import rerun
from ._spot import CheckedCall, SpotCheckConfig, SpotChecker

__all__ = ["Verification", "open_verification", "checked_call", "evidence_json", "EVIDENCE_BURST", "EVIDENCE_EVERY_S"]

_logger = logging.getLogger(__name__)

EVIDENCE_BURST, EVIDENCE_EVERY_S = 5, 60.0
CONFIRM_QUEUE = 16


def checked_call(listing: protocol.Listing, offer: protocol.ModelOffer, result: Any) -> CheckedCall | None:
    """A settled call as the spot checker takes it, or None (no commitment, not a plain call)."""
    commitment = protocol.offer_commitment(offer)
    if commitment is None or not isinstance(result.request, protocol.Request):
        return None
    return CheckedCall(provider=listing.provider, model=offer.name, commitment=commitment,
                       reproducible=bool(getattr(offer, "reproducible", False)), request=result.request,
                       text=result.text, receipt=result.receipt)


def evidence_json(evidence: protocol.Evidence, confirmed: bool) -> dict[str, Any]:
    """A bundle as ``node evidence --json`` shows it (``data``: its canonical bytes, hex)."""
    r = evidence.receipt
    return {"id": protocol.body_hash(evidence).hex(), "provider": r.provider, "verifier": evidence.verifier,
            "model": r.model, "commitment": protocol.commitment_id(evidence.commitment).hex(),
            "mode": evidence.mode, "agreement_permille": evidence.agreement_permille,
            "issued_at": evidence.issued_at, "confirmed": confirmed,
            "data": protocol.encode(evidence, max_size=protocol.MAX_EVIDENCE_BYTES).hex()}


@dataclasses.dataclass
class Verification:
    """What ``open_verification`` runs: the checker, the book and (with a market) the topic."""

    checker: SpotChecker
    evidence: EvidenceBook
    topic: Topic | None = None
    confirmed: int = 0  # bundles from others this node re-ran and confirmed
    unconfirmed: int = 0  # bundles from others it could not re-run, or whose re-run agreed

    def status(self) -> dict[str, Any]:
        return {"spot_checks": dict(self.checker.stats), "rate_permille": self.checker.config.rate_permille,
                "held_commitments": sorted(c.hex() for c in self.checker.held),
                "evidence": {p: {"held": n, "confirmed": c} for p, (n, c) in self.evidence.counts().items()},
                "gossip": {"accepted": self.topic.accepted, "refused": self.topic.refused} if self.topic else None}


@asynccontextmanager
async def open_verification(identity: Identity, config: SpotCheckConfig, home: Path, *, trust: Any,
                            wall_clock: WallClock, market: Market | None,
                            open_backend: Callable[[str], Any]) -> AsyncIterator[Verification]:
    """Run a node's verification for the block's duration (backends closed at its end).

    Raises:
        BackendError: a ``[spot_checks]`` backend cannot be loaded (the node does not start).
    """
    book = EvidenceBook(home / "evidence.db")
    backends: list[Backend] = []
    try:
        async with trio.open_nursery() as nursery:
            checker = SpotChecker(identity, config, trust=trust, evidence=book, wall_clock=wall_clock)
            for spec in config.backends:
                backend = await open_backend(spec)
                backends.append(backend)
                if checker.hold(backend) is None:
                    raise BackendError(f"[spot_checks] backend {spec!r} names no weights to check with")
            verification = Verification(checker, book)
            if market is not None:
                verification.topic = await _join(verification, identity, market, nursery)
            nursery.start_soon(checker.run)
            try:
                yield verification
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for backend in backends:
                await backend.aclose()
            book.close()


async def _join(verification: Verification, identity: Identity, market: Market, nursery: trio.Nursery) -> Topic:
    checker, book = verification.checker, verification.evidence
    limit = RateLimit(EVIDENCE_BURST, 1 / EVIDENCE_EVERY_S)
    send, receive = trio.open_memory_channel[protocol.Evidence](CONFIRM_QUEUE)

    def accept(data: bytes, now: int) -> protocol.Evidence | None:
        evidence = protocol.decode(data, max_size=protocol.MAX_EVIDENCE_BYTES, expect=(protocol.Evidence,))
        if evidence.verifier != identity.peer_id and not limit.take(evidence.verifier):
            return None
        protocol.check_evidence(evidence)
        return evidence

    def on_message(evidence: protocol.Evidence) -> None:
        if evidence.verifier == identity.peer_id:
            return  # our own: stored and acted on when it was made
        if book.add(evidence, confirmed=False) and checker.holds(evidence.commitment):
            try:
                send.send_nowait(evidence)
            except trio.WouldBlock:
                verification.unconfirmed += 1
        else:
            verification.unconfirmed += 1

    async def confirm() -> None:
        async for evidence in receive:
            backend = checker.held[protocol.commitment_id(evidence.commitment)]
            request = protocol.evidence_request(evidence)
            try:
                verdict = await rerun(backend, request, evidence.provider_text, evidence.receipt,
                                      exact=evidence.mode == "exact" and backend.reproducible(),
                                      topk=evidence.topk or checker.config.topk,
                                      threshold_permille=evidence.threshold_permille or checker.config.threshold_permille)
            except BackendError as exc:
                _logger.warning("could not re-run gossiped evidence: %s", exc)
                continue
            if verdict.ok:
                verification.unconfirmed += 1
                _logger.warning("evidence from %s against %s does not hold up here: the re-run agrees",
                                evidence.verifier, evidence.receipt.provider)
                continue
            verification.confirmed += 1
            book.add(evidence, confirmed=True)
            if checker.trust is not None:
                checker.trust.caught(evidence.receipt.provider)

    topic = await open_topic(market, protocol.EVIDENCE_TOPIC, max_bytes=protocol.MAX_EVIDENCE_BYTES,
                             accept=accept, on_message=on_message, nursery=nursery)
    nursery.start_soon(confirm)

    async def publish(evidence: protocol.Evidence) -> None:
        data = protocol.encode(evidence, max_size=protocol.MAX_EVIDENCE_BYTES)
        await topic.publish(data)

    checker.on_evidence = publish
    return topic
