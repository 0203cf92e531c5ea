"""Shared test helpers: deterministic identities, hypothesis strategies derived from the wire
field maps, and two session machines joined by an in-memory link."""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import strategies as st

import protocol
from protocol import _codec
from wallet import Identity


def identity(name: str) -> Identity:
    """A deterministic identity per name (tests stay reproducible)."""
    return Identity(hashlib.sha256(name.encode()).digest())


CONSUMER = identity("consumer")
PROVIDER = identity("provider")
AGENT = identity("agent")
MALLORY = identity("mallory")

_PEERS = [identity(f"peer-{i}").peer_id for i in range(8)]


def strategy_for(kind: _codec.WireType) -> st.SearchStrategy[Any]:
    """Valid values of one wire type."""
    if isinstance(kind, _codec.UInt):
        return st.integers(0, kind.max)
    if isinstance(kind, _codec.Str):
        if kind.choices:
            return st.sampled_from(kind.choices)
        return st.text(min_size=kind.min_bytes, max_size=min(24, kind.max_bytes // 4))
    if isinstance(kind, _codec.Bytes):
        if kind.size is not None:
            return st.binary(min_size=kind.size, max_size=kind.size)
        return st.binary(max_size=min(64, kind.max_len))
    if isinstance(kind, _codec.Bool):
        return st.booleans()
    if isinstance(kind, _codec.PeerId):
        return st.sampled_from(_PEERS)
    if isinstance(kind, _codec.ListOf):
        return st.lists(strategy_for(kind.item), max_size=min(3, kind.max_items)).map(tuple)
    if isinstance(kind, _codec.Optional):
        return st.none() | strategy_for(kind.inner)
    if isinstance(kind, _codec.Nested):
        return instances_of(kind.cls)
    raise TypeError(kind)


def instances_of(cls: type) -> st.SearchStrategy[Any]:
    """Valid instances of a message or record class."""
    return st.fixed_dictionaries({name: strategy_for(k) for name, k in cls._WIRE}).map(lambda d: cls(**d))


MESSAGE_CLASSES = sorted(
    {cls for versions in _codec._REGISTRY.values() for cls in versions.values()}, key=lambda c: c.KIND
)
any_message = st.sampled_from(MESSAGE_CLASSES).flatmap(instances_of)

PRICE = protocol.Price(input_per_1k=500_000, output_per_1k=1_500_000, min_charge=0)


def channel(cap: int = 10_000_000, expires_at: int = 10_000, consumer: Identity = CONSUMER) -> protocol.ChannelGrant:
    grant = protocol.ChannelGrant(
        agent=AGENT.peer_id,
        channel_id=b"c" * 16,
        consumer=consumer.peer_id,
        provider=PROVIDER.peer_id,
        cap=cap,
        expires_at=expires_at,
    )
    return protocol.sign(grant, "sig", AGENT)


class Pair:
    """A consumer and a provider machine joined by an in-memory link that encodes and decodes
    every message, as the real stream does."""

    def __init__(self, price: protocol.Price = PRICE, cap: int = 10_000_000, spend_limit: int | None = None,
                 max_context: int = 4096, commitment: bytes = protocol.ZERO_HASH,
                 served: bytes | None = None) -> None:
        """``commitment``: the one the consumer's listing named; ``served``: the one the provider
        accepts under (default: the same)."""
        self.now = 100
        self.price = price
        self.max_context = max_context
        self.served = commitment if served is None else served
        self.consumer = protocol.ConsumerSession(
            CONSUMER,
            session_id=b"s" * 16,
            provider=PROVIDER.peer_id,
            model="tiny",
            listing_seq=1,
            price=price,
            channel=channel(cap),
            spend_limit=cap if spend_limit is None else spend_limit,
            max_context=max_context,
            commitment=commitment,
        )
        self.provider = protocol.ProviderSession(PROVIDER)
        self.provider_events: list[Any] = []
        self.consumer_events: list[Any] = []

    @staticmethod
    def _wire(msg: Any) -> Any:
        data = protocol.frame(protocol.encode(msg))
        (payload,) = protocol.FrameReader().feed(data)
        return protocol.decode(payload)

    def to_provider(self) -> list[Any]:
        events = []
        for msg in self.consumer.outgoing():
            events += self.provider.receive(self._wire(msg), self.now)
        self.provider_events += events
        return events

    def to_consumer(self) -> list[Any]:
        events = []
        for msg in self.provider.outgoing():
            events += self.consumer.receive(self._wire(msg), self.now)
        self.consumer_events += events
        return events

    def open(self) -> None:
        self.consumer.open(self.now)
        (ev,) = self.to_provider()
        assert isinstance(ev, protocol.OpenReceived)
        self.provider.accept_open(self.price, self.max_context, self.now, commitment=self.served)
        (ev,) = self.to_consumer()
        assert isinstance(ev, protocol.Accepted)

    def call(self, prompt: str, pieces: list[tuple[str, int]], tokens_in: int = 10, max_tokens: int = 64,
             **knobs: Any) -> Any:
        """One full call (``knobs``: the request's sampling knobs); returns the consumer's
        ReceiptSettled (or CallFailed) event."""
        msgs = (protocol.ChatMessage(role="user", content=prompt),)
        self.consumer.request(msgs, max_tokens, **knobs)
        (ev,) = self.to_provider()
        assert isinstance(ev, protocol.CallRequested)
        limit = self.provider.start_call(tokens_in, self.now)
        if limit is None:
            (failed,) = self.to_consumer()
            return failed
        for text, tokens in pieces:
            if tokens > limit:
                break
            limit -= tokens
            self.provider.chunk(text, tokens)
        self.provider.finish_call("stop", self.now)
        events = self.to_consumer()
        settled = events[-1]
        (countersigned,) = self.to_provider()
        assert isinstance(countersigned, protocol.Countersigned)
        (acked,) = self.to_consumer()  # the provider's acknowledgement: the call is done
        assert isinstance(acked, protocol.CountersignConfirmed) and acked.ack is not None
        return settled


def attestation(attester: Identity = CONSUMER, provider: Identity = PROVIDER, agent: Identity = AGENT, *,
                paid: int = 1_000_000, claimed: int | None = None, calls: int = 10, failures: int = 0,
                settled: bool = True, issued_at: int = 1_000, model: str = "tiny") -> protocol.Attestation:
    """A signed attestation of a session between ``attester`` and ``provider``: its last receipt
    signed by both, and (``settled``) ``agent``'s signed state of the channel, ``claimed`` µc claimed."""
    cid = hashlib.sha256(f"{attester.peer_id}/{provider.peer_id}".encode()).digest()[:16]
    grant = protocol.sign(protocol.ChannelGrant(agent=agent.peer_id, channel_id=cid, consumer=attester.peer_id,
                                                provider=provider.peer_id, cap=max(paid, 1), expires_at=10_000),
                          "sig", agent)
    receipt = protocol.Receipt(
        session_id=cid, call_seq=calls - 1, model=model, provider=provider.peer_id, consumer=attester.peer_id,
        agent=attester.peer_id, channel_id=cid, input_hash=b"i" * 32, output_hash=b"o" * 32, tokens_in=10,
        tokens_out=20, finish_reason="stop", price=PRICE, cost=paid // max(calls, 1), cumulative=paid,
        prev_hash=protocol.ZERO_HASH, issued_at=issued_at)
    receipt = protocol.sign(protocol.sign(receipt, "provider_sig", provider), "consumer_sig", attester)
    settlement = None
    if settled:
        state = protocol.ChannelState(channel=grant, claimed=paid if claimed is None else claimed, status="closed")
        settlement = protocol.sign(protocol.EscrowResponse(request_id=b"q" * 16, agent=agent.peer_id, ok=True,
                                                           channels=(state,), issued_at=issued_at), "sig", agent)
    body = protocol.Attestation(attester=attester.peer_id, provider=provider.peer_id, model=model,
                                commitment=b"m" * 32, calls=calls, failures=failures, tokens=30 * calls,
                                p50_latency_ms=120, value_paid=paid, last_receipt=receipt, settlement=settlement,
                                issued_at=issued_at)
    return protocol.sign(body, "sig", attester)
