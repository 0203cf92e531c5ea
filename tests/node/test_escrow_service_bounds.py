"""The escrow agent's streams are bounded (issue 11, findings 6 and 12): a stalled partial frame or
an idle stream is reset within its deadline, an oversize frame prefix at once, the largest
legitimate request still fits; a peer over its refusal limit is answered without the ledger lock,
and a peer with many streams holds one place in the lock's queue. In-memory streams, trio's
autojumping mock clock (virtual time: no sleeps, no sockets), worker-thread work run inline.
"""

from __future__ import annotations

import types
from contextlib import asynccontextmanager

import pytest
import trio

import protocol
from node.escrow._service import FRAME_TIMEOUT_S, IDLE_TIMEOUT_S, MAX_REQUEST, serve_escrow
from node.net._streams import FramedStream, StreamClosed
from protocol import ESCROW_PROTOCOL, EscrowBudgetCreate, EscrowMint, EscrowQuery, EscrowWithdraw
from tests.node.memory_stream import memory_stream_pair
from tests.support import identity
from tests.wallet.escrow_support import AGENT, signed
from wallet import EscrowAgent, Ledger

NOW = 1_000_000
ALICE, MALLORY = identity("bounds-alice"), identity("bounds-mallory")
WHITELIST = tuple(identity(f"bounds-member-{i}").peer_id for i in range(1024))


class FakeHost:
    """Keeps the stream handler ``serve_escrow`` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, object] = {}

    def set_stream_handler(self, proto, handler) -> None:
        self.handlers[proto] = handler


@pytest.fixture
def inline_threads(monkeypatch):
    """Ledger work inline: a task waiting on a worker thread counts as blocked, and the mock clock
    would jump past every deadline during a millisecond of fsync."""

    async def run_sync(fn, *args, **_options):
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


@pytest.fixture
def agent(tmp_path, inline_threads):
    a = EscrowAgent(Ledger(tmp_path / "escrow.db"), AGENT)
    a.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=5_000), NOW)
    yield a
    a.check()
    a.ledger.close()


@asynccontextmanager
async def escrow_service(agent):
    """The service on a fake host; yields ``connect(peer)``: a client stream to it from ``peer``."""
    host = FakeHost()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_escrow(host, agent, lambda: NOW + trio.current_time(),
                                                             sweep_interval_s=3600, task_status=task_status))
        handler = host.handlers[ESCROW_PROTOCOL]

        def connect(peer: str):
            client, server = memory_stream_pair()
            server.muxed_conn = types.SimpleNamespace(peer_id=peer)
            nursery.start_soon(handler, server)
            return client

        yield connect
        nursery.cancel_scope.cancel()


async def ended_after(client) -> float:
    """How long (virtual seconds) until the agent ends the stream."""
    start = trio.current_time()
    with trio.fail_after(IDLE_TIMEOUT_S + 60):
        with pytest.raises(StreamClosed):
            while True:
                await FramedStream(client).receive()
    return trio.current_time() - start


async def ask(client, request):
    framed = FramedStream(client)
    await framed.send(request)
    return await framed.receive(expect=(protocol.EscrowResponse,))


async def test_a_partial_frame_that_stalls_is_reset_within_the_frame_deadline(agent, autojump_clock):
    async with escrow_service(agent) as connect:
        client = connect(MALLORY.peer_id)
        request = protocol.frame(protocol.encode(signed(EscrowQuery, MALLORY, NOW)))
        await client.write(request[:-1])  # all but the last byte, then nothing
        assert await ended_after(client) == pytest.approx(FRAME_TIMEOUT_S)


async def test_an_idle_stream_is_reset_within_the_idle_deadline_also_after_a_request(agent, autojump_clock):
    async with escrow_service(agent) as connect:
        idle = connect(MALLORY.peer_id)
        assert await ended_after(idle) == pytest.approx(IDLE_TIMEOUT_S)
        served = connect(ALICE.peer_id)
        assert (await ask(served, signed(EscrowQuery, ALICE, NOW))).ok
        assert await ended_after(served) == pytest.approx(IDLE_TIMEOUT_S)


async def test_an_oversize_frame_prefix_is_refused_at_once(agent, autojump_clock):
    async with escrow_service(agent) as connect:
        client = connect(MALLORY.peer_id)
        await client.write(protocol.encode_varint(MAX_REQUEST + 1))  # announces 64 KiB + 1, sends no body
        assert await ended_after(client) == 0


async def test_the_largest_legitimate_request_fits_and_a_stream_serves_request_after_request(agent, autojump_clock):
    budget = signed(EscrowBudgetCreate, ALICE, NOW, amount=1_000, whitelist=WHITELIST, per_session_limit=100,
                    expires_at=NOW + 3600)
    assert len(protocol.frame(protocol.encode(budget))) > 48 * 1024  # why the limit is 64 KiB, not 16
    async with escrow_service(agent) as connect:
        client = connect(ALICE.peer_id)
        created = await ask(client, budget)
        assert created.ok and created.budgets[0].whitelist == tuple(sorted(WHITELIST))
        assert (await ask(client, signed(EscrowQuery, ALICE, NOW))).balance == protocol.Balance(available=4_000,
                                                                                                locked=1_000)


async def test_a_peer_over_its_refusal_limit_is_answered_without_the_ledger_lock(agent, autojump_clock, monkeypatch):
    handled = []
    real = agent.prepare  # the first step after the event loop's screen: a worker thread
    monkeypatch.setattr(agent, "prepare", lambda request, now, source=None: handled.append(source) or real(
        request, now, source))
    async with escrow_service(agent) as connect:
        flood = connect(MALLORY.peer_id)
        answers = [(await ask(flood, signed(EscrowWithdraw, MALLORY, NOW, amount=1))).error for _ in range(1_000)]
        assert answers[:30] == ["insufficient_funds"] * 30 and set(answers[30:]) == {"rate_limited"}
        assert len(handled) == 30  # the other 970 never queued for the lock or a thread
        honest = await ask(connect(ALICE.peer_id), signed(EscrowWithdraw, ALICE, NOW, amount=1_000))
        assert honest.ok and honest.paid == 1_000
    assert agent.balance(ALICE.peer_id) == protocol.Balance(available=4_000, locked=0)


async def test_a_peer_with_many_streams_holds_one_place_in_the_queue(agent, autojump_clock, monkeypatch):
    order = []

    async def slow_thread(fn, *args, **_options):  # each request's checks take a virtual second
        await trio.sleep(1)
        if fn == agent.prepare:
            order.append(args[2])
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", slow_thread)
    async with escrow_service(agent) as connect:
        mallory = [FramedStream(connect(MALLORY.peer_id)) for _ in range(10)]
        for stream in mallory:  # ten requests in flight at once, one per stream
            await stream.send(signed(EscrowQuery, MALLORY, NOW))
        honest = await ask(connect(ALICE.peer_id), signed(EscrowQuery, ALICE, NOW))
        assert honest.ok
        assert order.index(ALICE.peer_id) <= 1, order  # behind at most the one Mallory request in the queue
        for stream in mallory:
            assert (await stream.receive(expect=(protocol.EscrowResponse,))).ok
    assert order.count(MALLORY.peer_id) == 10
