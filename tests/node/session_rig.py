"""An in-process market for session tests: an escrow agent, a provider and a consumer, each a
real libp2p host on 127.0.0.1, talking the real protocols."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import trio

import protocol
from node._receipts import ReceiptStore
from node.consumer._session_client import open_session
from node.escrow._client import EscrowClient
from node.escrow._ops import EscrowOps
from node.escrow._service import serve_escrow
from node.net._host import open_host, parse_peer_addr, peer_addrs
from node.provider import DynamicPricing, ProviderService
from node.provider._admission import Admission
from node.provider._offers import Offer
from node.provider._storefront import Storefront
from node.provider.backends import Backend, Generation, OnPiece, TransformersBackend
from node.provider.backends._builtin_model import ensure_builtin_model
from protocol import SESSION_PROTOCOL
from tests.node.helpers import LOOPBACK
from tests.support import identity
from wallet import EscrowAgent, Ledger

_MODELS = Path(tempfile.gettempdir()) / "inferswarm-test-models"


def builtin_backend() -> TransformersBackend:
    return TransformersBackend("builtin", ensure_builtin_model(_MODELS))


class ScriptedBackend(Backend):
    """A backend that streams given pieces (text, tokens); prompt tokens = characters of content."""

    spec = "scripted"

    def __init__(self, pieces: Sequence[tuple[str, int]] = (("Hello", 2), (" world", 2)), hang: bool = False,
                 delay_s: float = 0.0) -> None:
        self.pieces = list(pieces)
        self.hang = hang
        self.delay_s = delay_s
        self.started = trio.Event()

    async def count_prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return sum(len(m["content"]) for m in messages)

    async def generate(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece) -> Generation:
        sent = 0
        await trio.sleep(self.delay_s)  # a slow first token, when a test wants one
        for text, tokens in self.pieces:
            if sent + tokens > max_tokens:
                return Generation("length", sent)
            await on_piece(text, tokens)
            sent += tokens
            self.started.set()
            if self.hang:
                await trio.sleep_forever()
        return Generation("stop", sent)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclasses.dataclass
class Rig:
    agent: EscrowAgent
    agent_addr: str
    provider_service: ProviderService
    provider_host: Any
    consumer_host: Any
    consumer_ops: EscrowOps
    consumer_receipts: ReceiptStore
    offers: dict[str, Offer]
    clock: Clock

    @property
    def provider_id(self) -> str:
        return self.provider_service.identity.peer_id

    def balance(self, who: str) -> protocol.Balance:
        return self.agent.balance(who)

    async def open_channel(self, cap: int, ttl: int = 3600) -> protocol.ChannelGrant:
        return await self.consumer_ops.open_grant(self.agent_addr, self.provider_id, cap, ttl)

    def session(self, channel: protocol.ChannelGrant, model: str = "m", price: protocol.Price | None = None,
                spend_limit: int | None = None, commitment: bytes = protocol.ZERO_HASH, **options: Any) -> Any:
        offer = self.offers.get(model)
        price = price or (offer.to_model_offer().price if offer else protocol.Price(input_per_1k=1, output_per_1k=1))
        return open_session(self.consumer_host, self.consumer_ops.identity, provider=self.provider_id,
                            addrs=tuple(peer_addrs(self.provider_host)), model=model, price=price, listing_seq=1,
                            channel=channel, spend_limit=spend_limit if spend_limit is not None else channel.cap,
                            max_context=offer.max_context if offer else 4096, receipts=self.consumer_receipts,
                            clock=self.clock, idle_timeout_s=30, commitment=commitment, **options)


@asynccontextmanager
async def session_rig(offers: dict[str, Offer], backends: dict[str, Backend], *, accept: bool = True,
                      provider_cls: type[ProviderService] = ProviderService, mint: int = 10_000_000,
                      tag: str = "rig", dynamic_pricing: DynamicPricing | None = None,
                      **service_options: Any) -> AsyncIterator[Rig]:
    """Run the rig; ``service_options`` go to the ``ProviderService`` (sla, claim_interval_s, …)."""
    clock = Clock()
    agent_id, provider_id, consumer_id = identity(f"{tag}-agent"), identity(f"{tag}-provider"), identity(f"{tag}-consumer")
    with tempfile.TemporaryDirectory() as tmp:
        async with AsyncExitStack() as stack:
            agent_host = await stack.enter_async_context(open_host(agent_id, LOOPBACK))
            provider_host = await stack.enter_async_context(open_host(provider_id, LOOPBACK))
            consumer_host = await stack.enter_async_context(open_host(consumer_id, LOOPBACK))
            ledger = Ledger(Path(tmp) / "escrow.db")
            stack.callback(ledger.close)
            agent = EscrowAgent(ledger, agent_id)
            now = int(clock())
            agent.handle(protocol.sign(protocol.EscrowMint(request_id=b"m" * 16, party=agent_id.peer_id,
                                                           to=consumer_id.peer_id, amount=mint, issued_at=now),
                                       "sig", agent_id), now)
            agent_addr = peer_addrs(agent_host)[0]
            provider_receipts = ReceiptStore(Path(tmp) / "provider-receipts.db")
            consumer_receipts = ReceiptStore(Path(tmp) / "consumer-receipts.db")
            stack.callback(provider_receipts.close)
            stack.callback(consumer_receipts.close)

            started: set[str] = set()

            async def backend_for(offer: Offer) -> Backend:
                if offer.model not in started:
                    await backends[offer.model].start()
                    started.add(offer.model)
                return backends[offer.model]

            storefront = Storefront(provider_id, tuple(offers.values()), backend_for, Admission(),
                                    accept_escrow=(agent_id.peer_id,) if accept else (),
                                    dynamic_pricing=dynamic_pricing, wall_clock=clock)
            service = provider_cls(provider_id, storefront, EscrowClient(provider_host), provider_receipts,
                                   wall_clock=clock, **service_options)
            provider_host.set_stream_handler(SESSION_PROTOCOL, service.handle)
            await provider_host.connect(parse_peer_addr(agent_addr))
            await consumer_host.connect(parse_peer_addr(agent_addr))
            ops = EscrowOps(consumer_id, EscrowClient(consumer_host), clock)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_escrow, agent_host, agent, clock)
                await nursery.start(service.serve_settlement)
                yield Rig(agent, agent_addr, service, provider_host, consumer_host, ops, consumer_receipts, offers, clock)
                nursery.cancel_scope.cancel()
