"""The provider's session service and the consumer's session client joined by an in-memory
stream pair: no libp2p host, no socket, trio's autojumping mock clock, the in-process escrow agent.

A full call ends with a doubly-signed receipt and the channel settled; a provider that stalls is
timed out by the consumer's idle timeout in virtual time; garbage from the consumer ends its
session, and the provider is still paid for what was counter-signed before it.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
import trio

import protocol
from node._receipts import ReceiptStore
from node.consumer._session_client import ConsumerSessionHandle, ProviderFailed, SessionRejected, open_session_on
from node.consumer._trust import START, TrustBook
from node.escrow._client import EscrowClient
from node.escrow._ops import EscrowOps
from node.provider._admission import Admission
from node.provider._offers import Offer
from node.provider._session_service import ProviderService
from node.provider._storefront import Storefront
from node.provider.backends import Backend
from tests.node.memory_stream import MemoryStream, memory_stream_pair
from tests.node.session_rig import ScriptedBackend
from tests.support import identity
from wallet import EscrowAgent, Ledger

USER = [{"role": "user", "content": "Say something."}]
EPOCH = 1_700_000_000
IDLE_S = 30.0
CAP = 100_000
MINTED = 1_000_000


def wall_clock() -> float:
    """The wall clock both sides are given: the mock clock's time, from a fixed epoch."""
    return EPOCH + trio.current_time()


@pytest.fixture
def inline_threads(monkeypatch):
    """Run worker-thread work (SQLite: the ledger, the receipt stores) inline. The mock clock
    jumps as soon as every task is blocked, and a task waiting on a worker thread counts as
    blocked: a millisecond of fsync would otherwise fire every pending timeout."""

    async def run_sync(fn, *args, **_options):
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


@dataclass
class Parties:
    """An escrow agent (in-process, with the consumer's credit minted), a provider service and
    the consumer's escrow operations, all on the same wall clock."""

    agent: EscrowAgent
    service: ProviderService
    offer: Offer
    consumer_ops: EscrowOps
    consumer_receipts: ReceiptStore

    def paid(self, who: str) -> int:
        return self.agent.balance(who).available


@pytest.fixture
def parties(tmp_path: Path, inline_threads) -> Iterator[Parties]:
    agent_id, provider_id, consumer_id = identity("mem-agent"), identity("mem-provider"), identity("mem-consumer")
    ledger = Ledger(tmp_path / "escrow.db")
    agent = EscrowAgent(ledger, agent_id)
    agent.handle(protocol.sign(protocol.EscrowMint(request_id=b"m" * 16, party=agent_id.peer_id, to=consumer_id.peer_id,
                                                   amount=MINTED, issued_at=EPOCH), "sig", agent_id), EPOCH)
    escrow = EscrowClient(None, local_agent=agent, clock=wall_clock)  # no host: the agent answers in-process
    # "builtin" names a backend kind; the storefront is handed each test's scripted backend
    offer = Offer(model="m", backend="builtin", input_price=500_000, output_price=1_500_000, max_context=2048)
    backends: dict[str, Backend] = {}

    async def backend_for(o: Offer) -> Backend:
        return backends[o.model]

    storefront = Storefront(provider_id, (offer,), backend_for, Admission(), accept_escrow=(agent_id.peer_id,),
                            wall_clock=wall_clock)
    provider_receipts = ReceiptStore(tmp_path / "provider.db", wall_clock)
    consumer_receipts = ReceiptStore(tmp_path / "consumer.db", wall_clock)
    service = ProviderService(provider_id, storefront, escrow, provider_receipts, wall_clock=wall_clock)
    service.backends = backends  # type: ignore[attr-defined]  # where a test puts its backend
    yield Parties(agent, service, offer, EscrowOps(consumer_id, escrow, wall_clock), consumer_receipts)
    provider_receipts.close()
    consumer_receipts.close()
    ledger.close()


@dataclass
class Joined:
    session: ConsumerSessionHandle
    consumer_end: MemoryStream  # the consumer's end of the pair, for writing past the client
    provider_done: trio.Event  # the provider's handler has returned
    stop: Callable[[], None]  # cancel both sides (a provider stuck in its backend never lets go)


@asynccontextmanager
async def joined(p: Parties, backend: Backend, trust: TrustBook | None = None,
                 price: protocol.Price | None = None) -> AsyncIterator[Joined]:
    """The provider's handler and a consumer session on one memory stream pair, over a new channel.
    Leaving the block closes the session and waits for the provider to let go by itself."""
    p.service.backends["m"] = backend  # type: ignore[attr-defined]
    provider = p.service.identity.peer_id
    channel = await p.consumer_ops.open_grant(p.agent.identity.peer_id, provider, CAP, 3600)
    consumer_end, provider_end = memory_stream_pair()
    provider_done = trio.Event()

    async def provide() -> None:
        await p.service.handle(provider_end)
        provider_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(provide)
        async with open_session_on(consumer_end, p.consumer_ops.identity, provider=provider, model="m",
                                   price=price or p.service.storefront.listed(p.offer).price, listing_seq=1,
                                   channel=channel, spend_limit=CAP, max_context=p.offer.max_context,
                                   receipts=p.consumer_receipts, clock=wall_clock,
                                   idle_timeout_s=IDLE_S, trust=trust) as session:
            yield Joined(session, consumer_end, provider_done, nursery.cancel_scope.cancel)
        with trio.fail_after(60):  # the session's end settles, then the provider ends the stream
            await provider_done.wait()


async def test_a_full_call_is_counter_signed_stored_on_both_sides_and_settled(parties, autojump_clock):
    async with joined(parties, ScriptedBackend()) as j:
        result = await j.session.call(USER, 8)
        r = result.receipt
        protocol.verify(r, "provider_sig", protocol.public_key_from_peer_id(r.provider))
        protocol.verify(r, "consumer_sig", protocol.public_key_from_peer_id(r.consumer))
        assert result.text == "Hello world" and r.output_hash == protocol.output_hash(result.text)
        assert r.cost == protocol.call_cost(j.session.machine.price, r.tokens_in, r.tokens_out) > 0
        assert r.issued_at == EPOCH  # the injected wall clock, at virtual time zero
    # leaving the block closed the session cooperatively: the channel is settled already
    assert parties.paid(r.provider) == r.cumulative
    assert parties.paid(r.consumer) == MINTED - r.cumulative
    provider_side, consumer_side = parties.service.receipts.list(), parties.consumer_receipts.list()
    assert [(s["receipt_id"], s["claimed"]) for s in provider_side] == [(protocol.receipt_hash(r).hex(), True)]
    assert [s["receipt_id"] for s in consumer_side] == [protocol.receipt_hash(r).hex()]
    assert parties.service.active["m"] == 0
    parties.agent.check()


async def test_a_stalled_provider_is_timed_out_by_the_idle_timeout_in_virtual_time(parties, autojump_clock):
    real_start = time.perf_counter()
    async with joined(parties, ScriptedBackend(hang=True)) as j:  # one chunk, then silence
        started = trio.current_time()
        with pytest.raises(ProviderFailed, match=f"sent nothing for {IDLE_S:.0f}s"):
            await j.session.call(USER, 8)
        waited = trio.current_time() - started
        # nothing was counter-signed, so nothing is stored or owed
        assert j.session.machine.receipts == [] and parties.service.receipts.list() == []
        j.stop()  # the provider's handler is still inside its backend
    assert waited == pytest.approx(IDLE_S)  # the mock clock jumped straight to the idle deadline
    assert time.perf_counter() - real_start < IDLE_S / 3  # and nobody waited for it
    assert parties.paid(parties.service.identity.peer_id) == 0


@pytest.mark.parametrize("garbage", [
    b"\x05\xff\xfe\xfd\xfc\xfb",  # a frame that is not a message
    protocol.encode_varint(1 << 40),  # a terabyte announced
    b"\x0a\x08garbage!" * 50,  # plausible-looking, wrong
], ids=["not-a-message", "oversize", "plausible"])
async def test_garbage_from_the_consumer_ends_its_session_and_what_was_signed_is_still_paid(
        parties, autojump_clock, garbage):
    async with joined(parties, ScriptedBackend()) as j:
        honest = await j.session.call(USER, 8)
        await j.consumer_end.write(garbage)  # past the session client, straight onto the stream
        with trio.fail_after(60):
            await j.provider_done.wait()  # the provider ended the session by itself
        leftover = b""
        while chunk := await j.consumer_end.read(1 << 16):
            leftover += chunk
        assert leftover == b""  # no answer to garbage: the end of the stream
        assert parties.service.active["m"] == 0  # its seat is free again
        # with no cooperative close, the provider claimed the last counter-signed receipt
        assert parties.paid(honest.receipt.provider) == honest.receipt.cumulative
    parties.agent.check()


async def test_the_session_handle_records_every_outcome_in_the_trust_book(parties, autojump_clock, tmp_path):
    """Callers never record outcomes themselves: a served call, a stalled one and a refused open
    each reach the trust book through the session."""
    trust = TrustBook(tmp_path / "trust.db")
    provider = parties.service.identity.peer_id
    try:
        async with joined(parties, ScriptedBackend(pieces=[("Hi", 1)], hang=True), trust) as j:
            with pytest.raises(ProviderFailed):  # the provider stalls: the handle's idle timeout fires
                await j.session.call(USER, 8)
            j.stop()
        stalled = trust.get(provider)
        assert stalled.failures == 1 and stalled.score < START
        parties.service.storefront._backends.clear()  # the next session gets a backend that answers
        async with joined(parties, ScriptedBackend(), trust) as j:
            await j.session.call(USER, 8)
        served = trust.get(provider)
        assert served.calls == 1 and served.ttft_s is not None and served.score > stalled.score
        refused = False
        try:  # a price the provider does not sell at
            async with joined(parties, ScriptedBackend(), trust, price=protocol.Price(input_per_1k=1,
                                                                                       output_per_1k=1)):
                pass
        except* SessionRejected:
            refused = True
        assert refused
        # a price it does not sell at costs a little trust (a Sybil answering price_changed must pay for it)
        assert trust.get(provider).failures == 2 and trust.get(provider).score < served.score
    finally:
        trust.close()
