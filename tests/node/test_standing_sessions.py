"""Standing sessions (``consumer/_standing.py``), with real nodes: one-shot calls reuse one session
and one channel, every call is paid exactly its receipt, and what the channel did not spend comes
back when the session closes; a session the provider dropped while it idled is replaced without
failing the call (its channel paid what was counter-signed on it); a channel too close to its
expiry is not reused."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from node import open_swarm
from tests.e2e.fast_upstream import fast_upstream

MINTED = 50_000_000


@asynccontextmanager
async def _market(tmp_path):
    """An agent that sells ``m`` from a fast upstream, and a consumer holding MINTED there."""
    with fast_upstream() as upstream:
        async with open_swarm(tmp_path / "agent", passphrase="pw", escrow=True) as agent:
            await agent.offer("m", backend=f"openai:{upstream}", input_price=1_000, output_price=2_000)
            async with open_swarm(tmp_path / "consumer", passphrase="pw", bootstrap=agent.addrs) as consumer:
                await agent.mint(consumer.peer_id, MINTED)
                await consumer.wait_for("m")
                yield agent, consumer


async def _settled(consumer, agent_id: str) -> dict:
    with trio.fail_after(30):  # the close settles the channel and refunds the rest
        while (balance := await consumer.balance(agent_id))["locked"]:
            await trio.sleep(0.05)
    return balance


async def test_one_shot_calls_share_one_session_and_one_channel_and_pay_exactly_their_receipts(tmp_path):
    async with _market(tmp_path) as (agent, consumer):
        standing = consumer.service.renter.standing
        standing.idle_s = 3600  # stays open for the whole test
        docs = [await consumer.run("m", f"call {i}", max_tokens=8) for i in range(4)]
        assert (standing.opened, standing.reused, standing.held()) == (1, 3, 1)
        assert len({d["escrow"]["channel_id"] for d in docs}) == 1  # one channel for all four
        costs = [d["cost"]["amount"] for d in docs]
        assert [d["cost"]["cumulative"] for d in docs] == [sum(costs[:i + 1]) for i in range(4)]
        locked = (await consumer.balance(agent.peer_id))["locked"]
        assert locked == docs[0]["escrow"]["cap"] > sum(costs)  # held for the next calls, no more

        standing.retire_all()
        balance = await _settled(consumer, agent.peer_id)
        assert balance["available"] == MINTED - sum(costs)
        assert (await agent.balance(agent.peer_id))["available"] == sum(costs)  # the provider's earnings
        with trio.fail_after(30):
            while standing.held():  # its task ends once the provider has ended the stream
                await trio.sleep(0.05)


async def test_a_standing_session_dropped_while_idle_is_replaced_and_the_call_succeeds(tmp_path):
    async with _market(tmp_path) as (agent, consumer):
        standing = consumer.service.renter.standing
        standing.idle_s = 3600
        first = await consumer.run("m", "one", max_tokens=8)
        (idle,) = [s for kept in standing._idle.values() for s in kept]
        await idle.handle._framed.reset()  # the provider went away (a restart) while it idled
        second = await consumer.run("m", "two", max_tokens=8)
        assert [a["provider"] for a in second["attempts"]] == [agent.peer_id]  # no failover needed
        assert standing.opened == 2 and second["escrow"]["channel_id"] != first["escrow"]["channel_id"]
        standing.retire_all()
        # the dropped session's channel paid its call; its rest waits for the channel's expiry
        # (no close could be signed on a dead stream); the new one settles and refunds at once
        rest = first["escrow"]["cap"] - first["cost"]["amount"]
        with trio.fail_after(30):
            while (balance := await consumer.balance(agent.peer_id))["locked"] != rest:
                await trio.sleep(0.05)
        assert balance["available"] == MINTED - first["escrow"]["cap"] - second["cost"]["amount"]


async def test_a_channel_close_to_its_expiry_is_not_reused(tmp_path):
    async with _market(tmp_path) as (agent, consumer):
        standing = consumer.service.renter.standing
        standing.idle_s = 3600
        standing.min_life_s = 10_000  # longer than any channel lives: never reused
        docs = [await consumer.run("m", f"call {i}", max_tokens=8) for i in range(2)]
        assert (standing.opened, standing.reused) == (2, 0)
        balance = await _settled(consumer, agent.peer_id)  # each was retired after its call
        assert balance["available"] == MINTED - sum(d["cost"]["amount"] for d in docs)
