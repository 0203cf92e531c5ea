"""Tiers chosen at open and batch discounts: the pinned price, tier capacity, unknown tiers."""

from __future__ import annotations

import pytest

import protocol
from node import open_swarm
from node.consumer._renter import RentError
from node.consumer._session_client import SessionRejected

TIERS = [{"name": "basic", "input_price": 100_000, "output_price": 200_000, "max_concurrent": 4, "priority": 1},
         {"name": "premium", "input_price": 300_000, "output_price": 600_000, "max_concurrent": 1, "priority": 3}]


async def test_tiers_and_batches_end_to_end(tmp_path):
    async with open_swarm(tmp_path / "p", passphrase="pw", escrow=True) as provider:
        await provider.offer("tiny", input_price=200_000, output_price=400_000, max_concurrent=8, tiers=TIERS,
                       batch_min_calls=5, batch_discount_permille=500)
        async with open_swarm(tmp_path / "c", passphrase="pw", bootstrap=provider.addrs) as consumer:
            await provider.mint(consumer.peer_id, 5_000_000)
            await consumer.wait_for("tiny")
            agent = provider.peer_id
            async with consumer.session("tiny", budget=500_000, escrow=agent, tier="premium") as premium:
                assert premium.info["price"] == {"input": 300_000, "output": 600_000}
                reply = await premium.call("hi", max_tokens=4)
                assert reply["cost"]["amount"] == protocol.call_cost(
                    protocol.Price(input_per_1k=300_000, output_per_1k=600_000),
                    reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"])
                with pytest.raises((SessionRejected, RentError)) as busy:  # premium holds one session at a time
                    async with consumer.session("tiny", budget=100_000, escrow=agent, tier="premium"):
                        pass
                assert "capacity" in str(busy.value)
                async with consumer.session("tiny", budget=100_000, escrow=agent, batch_calls=5) as batch:
                    assert batch.info["price"] == {"input": 100_000, "output": 200_000}  # half price
            with pytest.raises(RentError, match="enterprise"):
                async with consumer.session("tiny", budget=100_000, escrow=agent, tier="enterprise"):
                    pass
