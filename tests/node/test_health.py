"""Health monitoring: failing models are withdrawn and come back when they recover."""

from __future__ import annotations

import logging

import pytest
import trio

from node.provider import Offer
from node.provider._admission import Admission
from node.provider._health import HealthConfig, HealthMonitor, parse_health
from node.provider._storefront import LiveBackend, Storefront
from tests.support import identity


class Backend:
    def __init__(self) -> None:
        self.mode = "ok"

    async def count_prompt_tokens(self, messages):
        if self.mode == "raise":
            raise RuntimeError("CUDA error: device lost")
        if self.mode == "hang":
            await trio.sleep_forever()
        return 3


class CountingStorefront(Storefront):
    """A storefront with no market: counts how often the listing would be republished."""

    def __init__(self, backends):
        offers = tuple(Offer(model=m, backend="builtin", input_price=1, output_price=1) for m in backends)

        async def never(offer):
            raise AssertionError("the health monitor never starts a backend")

        super().__init__(identity("health"), offers, never, Admission(), wall_clock=lambda: 0.0)
        for offer in offers:
            if backends[offer.model] is not None:  # None: not loaded yet
                self._backends[offer.model] = LiveBackend(offer.model, backends[offer.model])
        self.changes = []

    def publish(self):
        self.changes.append(1)


def monitor(backends, gpus=(), **cfg):
    store = CountingStorefront(backends)
    m = HealthMonitor(HealthConfig(backend_timeout_s=0.2, **cfg), store, gpus=lambda: list(gpus))
    return m, store.changes


async def test_a_dead_backend_is_withdrawn_then_recovers(caplog):
    caplog.set_level(logging.WARNING)
    a, b = Backend(), Backend()
    m, changes = monitor({"a": a, "b": b})
    assert await m.check_once() == {} and changes == []
    a.mode = "raise"
    b.mode = "hang"
    bad = await m.check_once()
    assert set(bad) == {"a", "b"} and "liveness" in bad["a"] and "did not answer" in bad["b"]
    assert not m.healthy("a") and changes == [1] and m.alerts == 2
    assert "ALERT a is unhealthy" in caplog.text
    a.mode = b.mode = "ok"
    assert await m.check_once() == {} and m.healthy("a") and changes == [1, 1] and m.alerts == 4
    assert "ALERT a recovered" in caplog.text


async def test_a_low_success_rate_withdraws_the_model():
    m, _ = monitor({"a": Backend()}, min_success_rate=0.6, window=10)
    for ok in (True, False, False, True, False):
        m.record("a", ok)
    assert "40%" in (await m.check_once())["a"]
    assert await m.check_once() != {}  # still bad: the same outcomes
    m.outcomes["a"].extend([True] * 10)
    assert await m.check_once() == {}


async def test_unloaded_models_and_gpu_memory():
    m, _ = monitor({"a": None}, gpus=[{"name": "H100", "memory_free_mb": 100}], min_free_gpu_mb=1000)
    assert "H100" in (await m.check_once())["a"]
    m, _ = monitor({"a": None}, gpus=[{"name": "H100", "memory_free_mb": 5000}], min_free_gpu_mb=1000)
    assert await m.check_once() == {}  # nothing loaded yet: nothing to fail


def test_config_is_checked():
    assert parse_health({"interval_s": 5}).interval_s == 5
    with pytest.raises(ValueError, match="unknown"):
        parse_health({"intervall": 5})
    with pytest.raises(ValueError):
        parse_health({"min_success_rate": 2})


async def test_an_unhealthy_model_leaves_the_listing(tmp_path):
    from node import open_swarm

    async with open_swarm(tmp_path / "h", passphrase="pw") as swarm:
        await swarm.offer("a", input_price=1, output_price=1)
        await swarm.offer("b", input_price=1, output_price=1)
        assert [m.name for m in swarm.service.market._own.models] == ["a", "b"]
        swarm.service.storefront.set_unhealthy({"a": "test"})
        assert [m.name for m in swarm.service.market._own.models] == ["b"]
        assert swarm.service.status()["unhealthy"] == {"a": "test"}
