"""A burst of escrow requests from one node to a remote agent queues at the client instead of
being reset by the agent's per-peer stream cap (issue #12, bursts): before, 33 of 50 channel
opens at once failed with ``escrow_unreachable: StreamReset``."""

from __future__ import annotations

import time

import trio

from node.escrow import EscrowClient
from node.escrow._client import REQUESTS_PER_AGENT
from node.escrow._service import serve_escrow
from node.net._host import ESCROW_STREAMS_PER_PEER, open_host, peer_addrs
from protocol import EscrowMint, EscrowOpen
from tests.support import identity
from tests.wallet.escrow_support import signed
from wallet import EscrowAgent, Ledger

AGENT, ALICE, BOB = identity("burst-agent"), identity("burst-alice"), identity("burst-bob")
N = 5 * ESCROW_STREAMS_PER_PEER


async def test_many_concurrent_channel_opens_to_one_agent_all_succeed(tmp_path):
    assert REQUESTS_PER_AGENT < ESCROW_STREAMS_PER_PEER
    agent = EscrowAgent(Ledger(tmp_path / "escrow.db"), AGENT)
    now = int(time.time())
    agent.handle(signed(EscrowMint, AGENT, now, to=ALICE.peer_id, amount=N * 1_000), now)
    try:
        async with open_host(AGENT, ["/ip4/127.0.0.1/tcp/0"]) as agent_host, \
                open_host(ALICE, ["/ip4/127.0.0.1/tcp/0"]) as alice_host, trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_escrow(agent_host, agent, sweep_interval_s=3600,
                                                                 task_status=task_status))
            address = peer_addrs(agent_host)[0]
            client = EscrowClient(alice_host)
            answers = []

            async def open_one() -> None:
                answers.append(await client.call(address, signed(EscrowOpen, ALICE, now, provider=BOB.peer_id,
                                                                 cap=1_000, expires_at=now + 3600)))

            with trio.fail_after(60):
                async with trio.open_nursery() as burst:
                    for _ in range(N):
                        burst.start_soon(open_one)
            assert [a.error for a in answers if not a.ok] == []
            assert len(answers) == N
            nursery.cancel_scope.cancel()
        agent.check()
        assert agent.ledger.totals()["locked"] == N * 1_000
    finally:
        agent.ledger.close()
