"""The job queue: fair share without starvation, weights, capacity and timeouts (mock clock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from node.provider._queue import JobQueue, QueueFull, QueueTimeout


async def _serve(queue, order, consumer, weight=1.0, positions=None, work=1.0):
    async def report(p):
        if positions is not None:
            positions.append(p)

    async with queue.slot(consumer, weight, report):
        order.append(consumer)
        await trio.sleep(work)


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_a_burst_from_one_consumer_does_not_starve_another(autojump_clock):
    queue, order = JobQueue(slots=1, max_waiting=100, timeout_s=1000), []
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(_serve, queue, order, "greedy")
            await trio.sleep(0.001)
        nursery.start_soon(_serve, queue, order, "polite")  # arrives last, behind a burst of ten
    assert order.index("polite") <= 2  # served after at most one more of the burst, not after all ten


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_weights_give_proportional_shares(autojump_clock):
    queue, order = JobQueue(slots=1, max_waiting=100, timeout_s=1000), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, queue, order, "blocker")
        await trio.sleep(0.001)
        for _ in range(12):
            nursery.start_soon(_serve, queue, order, "premium", 3.0)
            nursery.start_soon(_serve, queue, order, "basic", 1.0)
            await trio.sleep(0.001)
    first = order[1:13]
    assert first.count("premium") == 9 and first.count("basic") == 3  # 3:1 while both wait


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_capacity_timeout_and_positions(autojump_clock):
    queue, order = JobQueue(slots=1, max_waiting=2, timeout_s=10), []
    positions: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, queue, order, "a", 1.0, None, 3.0)
        await trio.sleep(0.001)
        nursery.start_soon(_serve, queue, order, "b", 1.0, None, 3.0)
        await trio.sleep(0.001)
        nursery.start_soon(_serve, queue, order, "c", 1.0, positions, 1.0)
        await trio.sleep(0.001)
        with pytest.raises(QueueFull):
            async with queue.slot("d"):
                pass
    assert positions == [2, 1]  # told its place, and told again when it moved up
    assert order == ["a", "b", "c"]
    slow = JobQueue(slots=1, max_waiting=5, timeout_s=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, slow, [], "holder", 1.0, None, 10.0)
        await trio.sleep(0.001)
        with pytest.raises(QueueTimeout):
            async with slow.slot("late"):
                pass
        assert slow.waiting == 0
