"""A node's reputation service: it attests its own sessions and takes in everyone else's.

**Attesting.** When a session that settled at least one call ends (``Renter.on_session_end``),
its report is queued (bounded by ``ATTEST_QUEUE``; a full queue drops the report, logged) for one
of ``ATTEST_WORKERS`` workers. The worker asks the channel's agent for its signed channel state — after a close the provider claims
within seconds, so it asks again at ``SETTLEMENT_DELAYS_S`` until the claim covers the session —
signs an ``Attestation`` with the proof it got (none: an unbacked attestation, still published:
its counts are the attester's word, with no weight), holds it and publishes it: on
``protocol.ATTESTATION_TOPIC`` and in the DHT, under ``attestation_key(attester, provider)``
with a provider record on ``attested_key(provider)``; its own are put again every
``REPUBLISH_S``.

**Taking in.** A gossiped attestation is refused (not relayed) unless it is at most
``MAX_ATTESTATION_BYTES``, decodes strictly, is signed by its attester, is newer than what is held
from that attester on that provider (a forgery or a replay spends no one's rate), is within its
rate and passes ``protocol.check_attestation``: an attester with history here (first backed through
a trusted agent at least ``MATURE_S`` ago) has its own bucket (``KNOWN_BURST`` then one per
``KNOWN_EVERY_S``); every attester without history shares one (``FRESH_BURST``, one per
``FRESH_EVERY_S``), so a flood of fresh identities is cut at a fixed rate and cannot starve the
attesters this node already knows, nor any other topic. Every ``FETCH_EVERY_S`` the providers in
the market view are looked up in the DHT (a few at a time, ``FETCH_ATTESTERS`` records each).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import statistics
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import trio
from libp2p.records.validator import Validator

import protocol
from wallet import Identity

from .._clock import WallClock
from ..consumer._renter import SessionReport
from ..escrow._client import EscrowUnreachable
from ..escrow._ops import EscrowOps, EscrowRefused
from ..net._market import Market
from ..net._topics import RateLimit, Topic, open_topic
from ._network_trust import NetworkTrust, NetworkView

__all__ = ["Reputation", "open_reputation", "attestation_key", "attested_key", "attestation_json"]

_logger = logging.getLogger(__name__)

ATTEST_QUEUE = 64
ATTEST_WORKERS = 4  # sessions attested at once (each waits up to ~44 s for the agent's proof)
SETTLEMENT_DELAYS_S = (1.0, 3.0, 10.0, 30.0)
KNOWN_BURST, KNOWN_EVERY_S = 5, 60.0
FRESH_BURST, FRESH_EVERY_S = 20, 5.0
REPUBLISH_S = 3600.0
FETCH_EVERY_S, FETCH_AT_ONCE, FETCH_ATTESTERS = 600.0, 4, 20
_FRESH = "\x00fresh"  # the shared bucket's key (no peer id looks like it)


def attestation_key(attester: str, provider: str) -> str:
    """The DHT key of ``attester``'s attestation of ``provider`` (45 bytes, like a listing's)."""
    digest = hashlib.sha256(f"inferswarm/attestation/{attester}/{provider}".encode()).hexdigest()[:40]
    return f"/{protocol.ATTESTATION_NAMESPACE}/{digest}"


def attested_key(provider: str) -> str:
    """The DHT provider-record key under which ``provider``'s attesters announce themselves."""
    return "1220" + hashlib.sha256(b"inferswarm/attested/" + provider.encode()).hexdigest()


def _decode(data: bytes) -> protocol.Attestation:
    return protocol.decode(data, max_size=protocol.MAX_ATTESTATION_BYTES, expect=(protocol.Attestation,))


class _AttestationValidator(Validator):
    """The DHT's view of the attestation namespace: strict decode, every check, the right key."""

    def validate(self, key: str, value: bytes) -> None:
        a = _decode(value)
        protocol.check_attestation(a)
        if key != attestation_key(a.attester, a.provider):
            raise protocol.TermsMismatch(f"an attestation of {a.provider} by {a.attester} stored under {key}")

    def select(self, key: str, values: list[bytes]) -> int:
        best, newest = 0, -1
        for i, value in enumerate(values):
            try:
                a = _decode(value)
                protocol.check_attestation(a)
            except protocol.ProtocolError:
                continue
            if a.issued_at > newest:
                best, newest = i, a.issued_at
        return best


def attestation_json(a: protocol.Attestation) -> dict[str, Any]:
    """An attestation as ``--json`` shows it."""
    s = a.settlement
    return {"attester": a.attester, "provider": a.provider, "model": a.model, "commitment": a.commitment.hex(),
            "calls": a.calls, "failures": a.failures, "tokens": a.tokens, "p50_latency_ms": a.p50_latency_ms,
            "value_paid": a.value_paid, "last_receipt": a.last_receipt_hash.hex(),
            "settled_by": s.agent if s is not None else None,
            "claimed": s.channels[0].claimed if s is not None and s.channels else 0, "issued_at": a.issued_at}


@dataclasses.dataclass
class Reputation:
    """What ``open_reputation`` runs: the book of attestations, the topic and the queue of reports."""

    identity: Identity
    book: NetworkTrust
    market: Market | None
    escrow: EscrowOps | None
    wall_clock: WallClock
    topic: Topic | None = None
    attested: int = 0  # our own attestations signed
    backed: int = 0  # of which carried a settlement
    dropped: int = 0  # reports dropped on a full queue
    _send: Any = None
    _fetched: dict[str, float] = dataclasses.field(default_factory=dict)

    def view(self, provider: str) -> NetworkView:
        return self.book.view(provider)

    def report(self, report: SessionReport) -> None:
        """Queue a finished session for attestation (never blocks). One without a settled call has
        no receipt to prove the business: it is not attested."""
        if not report.results:
            return
        try:
            self._send.send_nowait(report)
        except trio.WouldBlock:
            self.dropped += 1
            _logger.warning("attestation queue full: the session with %s is not attested", report.listing.provider)

    def status(self) -> dict[str, Any]:
        return {"attested": self.attested, "backed": self.backed, "dropped": self.dropped,
                "gossip": {"accepted": self.topic.accepted, "refused": self.topic.refused} if self.topic else None}

    # ---- our own attestations -----------------------------------------------------------------

    async def _settlement(self, report: SessionReport, value: int) -> protocol.EscrowResponse | None:
        """The agent's signed state of the session's channel once the claim covers ``value`` (or
        the last one it gave, if some was claimed); None if it never answered with a claim."""
        if self.escrow is None:
            return None
        channel_id = report.results[-1].receipt.channel_id
        best: protocol.EscrowResponse | None = None
        for delay in SETTLEMENT_DELAYS_S:
            await trio.sleep(delay)
            try:
                proof = await self.escrow.channel_proof(report.agent, channel_id)
            except (EscrowRefused, EscrowUnreachable, ValueError) as exc:
                _logger.info("no settlement proof from %s yet: %s", report.agent, exc)
                continue
            if proof.channels[0].channel.channel_id != channel_id:
                _logger.warning("escrow agent %s answered about another channel: no settlement proof", report.agent)
                return None
            if proof.channels[0].claimed > 0:
                best = proof
            if proof.channels[0].claimed >= value:
                break
        return best

    def sign(self, report: SessionReport, settlement: protocol.EscrowResponse | None) -> protocol.Attestation:
        """This node's attestation of ``report``'s session."""
        results = report.results
        last = results[-1].receipt
        commitment = protocol.offer_commitment(report.offer)
        body = protocol.Attestation(
            attester=self.identity.peer_id, provider=report.listing.provider, model=last.model,
            commitment=protocol.commitment_id(commitment) if commitment is not None else b"",
            calls=len(results) + report.failures, failures=report.failures,
            tokens=sum(r.receipt.tokens_in + r.receipt.tokens_out for r in results),
            p50_latency_ms=int(statistics.median(r.ttft_s for r in results) * 1000),
            value_paid=last.cumulative, last_receipt=last, settlement=settlement, issued_at=int(self.wall_clock()))
        return protocol.sign(body, "sig", self.identity)

    async def _attest_loop(self, receive: trio.MemoryReceiveChannel[SessionReport]) -> None:
        async def worker() -> None:
            async for report in receive:
                try:
                    await self._attest(report)
                except Exception:  # one session's attestation must not take the node down
                    _logger.exception("attesting the session with %s failed", report.listing.provider)

        async with trio.open_nursery() as nursery:
            for _ in range(ATTEST_WORKERS):
                nursery.start_soon(worker)

    async def _attest(self, report: SessionReport) -> None:
        value = report.results[-1].receipt.cumulative
        settlement = await self._settlement(report, value)
        attestation = self.sign(report, settlement)
        try:
            backing = protocol.check_attestation(attestation)
        except protocol.ProtocolError as exc:  # the agent's answer does not back this session: attest without it
            _logger.warning("escrow agent %s's channel state does not back the session with %s (%s): attested "
                            "without a settlement", report.agent, report.listing.provider, exc)
            attestation, backing = self.sign(report, None), protocol.Backing()
        data = protocol.encode(attestation, max_size=protocol.MAX_ATTESTATION_BYTES)
        self.book.add(attestation, backing, data)
        self.attested += 1
        self.backed += backing.settled > 0
        await self._publish(attestation, data)

    async def _publish(self, attestation: protocol.Attestation, data: bytes) -> None:
        if self.topic is not None:
            await self.topic.publish(data)
        if self.market is not None:
            with trio.move_on_after(30):
                try:
                    await self.market.dht.put_value(attestation_key(attestation.attester, attestation.provider), data)
                    await self.market.dht.provide(attested_key(attestation.provider))
                except Exception as exc:  # a half-built network: gossip carried it, the next republish retries
                    _logger.info("DHT put of an attestation failed: %s", exc)

    async def _republish_loop(self) -> None:
        while True:
            await trio.sleep(REPUBLISH_S)
            for data in self.book.own():
                await self._publish(_decode(data), data)

    # ---- everyone else's ----------------------------------------------------------------------

    def take(self, data: bytes) -> protocol.Attestation | None:
        """Check and hold an attestation from the network (gossip or the DHT); None when refused."""
        a = _decode(data)
        backing = protocol.check_attestation(a)
        if a.attester != self.identity.peer_id:
            self.book.add(a, backing, data)
        return a

    async def fetch(self, provider: str) -> int:
        """Read ``provider``'s attestations from the DHT into the book; how many were found."""
        if self.market is None:
            return 0
        dht = self.market.dht
        found = 0
        with trio.move_on_after(30):
            try:
                infos = await dht.find_providers(attested_key(provider), FETCH_ATTESTERS)
            except Exception as exc:
                _logger.info("DHT lookup of %s's attesters failed: %s", provider, exc)
                return 0
            for info in infos[:FETCH_ATTESTERS]:
                try:
                    data = await dht.get_value(attestation_key(info.peer_id.to_base58(), provider))
                    if data is not None and self.take(data) is not None:
                        found += 1
                except Exception as exc:  # a refused or missing record: the next attester
                    _logger.debug("attestation of %s by %s not read: %s", provider, info.peer_id, exc)
        return found

    async def _fetch_loop(self) -> None:
        assert self.market is not None
        limiter = trio.CapacityLimiter(FETCH_AT_ONCE)

        async def one(provider: str) -> None:
            async with limiter:
                await self.fetch(provider)

        while True:
            now = trio.current_time()
            providers = {listing.provider for listing in self.market.view.listings(self.market.now())}
            due = [p for p in sorted(providers) if p != self.identity.peer_id
                   and now - self._fetched.get(p, -FETCH_EVERY_S) >= FETCH_EVERY_S]
            for p in due:
                self._fetched[p] = now
            while len(self._fetched) > 8192:
                self._fetched.pop(next(iter(self._fetched)))
            async with trio.open_nursery() as nursery:
                for p in due:
                    nursery.start_soon(one, p)
            await trio.sleep(60.0)


@asynccontextmanager
async def open_reputation(identity: Identity, home: Path, *, market: Market | None, escrow: EscrowOps | None,
                          trusted_agents: Callable[[], Iterable[str]], wall_clock: WallClock,
                          ) -> AsyncIterator[Reputation]:
    """Run a node's reputation service for the block's duration (the book closed at its end)."""
    book = NetworkTrust(home / "reputation.db", trusted_agents, clock=wall_clock, me=identity.peer_id)
    reputation = Reputation(identity, book, market, escrow, wall_clock)
    send, receive = trio.open_memory_channel[SessionReport](ATTEST_QUEUE)
    reputation._send = send
    try:
        async with trio.open_nursery() as nursery:
            if market is not None:
                market.dht.register_validator(protocol.ATTESTATION_NAMESPACE, _AttestationValidator())
                reputation.topic = await _join(reputation, market, nursery)
                nursery.start_soon(reputation._fetch_loop)
                nursery.start_soon(reputation._republish_loop)
            nursery.start_soon(reputation._attest_loop, receive)
            try:
                yield reputation
            finally:
                nursery.cancel_scope.cancel()
    finally:
        book.close()


async def _join(reputation: Reputation, market: Market, nursery: trio.Nursery) -> Topic:
    known = RateLimit(KNOWN_BURST, 1 / KNOWN_EVERY_S)
    fresh = RateLimit(FRESH_BURST, 1 / FRESH_EVERY_S, max_keys=1)
    me = reputation.identity.peer_id

    def accept(data: bytes, now: int) -> tuple[protocol.Attestation, protocol.Backing, bytes] | None:
        a = _decode(data)
        if a.attester != me:
            # neither a forgery naming someone nor a replay of what is held spends anyone's tokens
            protocol.verify(a, "sig", protocol.public_key_from_peer_id(a.attester))
            if not reputation.book.is_newer(a):
                return None
            limit, key = (known, a.attester) if reputation.book.has_history(a.attester) else (fresh, _FRESH)
            if not limit.take(key):
                return None
        return a, protocol.check_attestation(a), data

    def on_message(taken: tuple[protocol.Attestation, protocol.Backing, bytes]) -> None:
        a, backing, data = taken
        if a.attester != me:  # our own is held already
            reputation.book.add(a, backing, data)

    return await open_topic(market, protocol.ATTESTATION_TOPIC, max_bytes=protocol.MAX_ATTESTATION_BYTES,
                            accept=accept, on_message=on_message, nursery=nursery)
