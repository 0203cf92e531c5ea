"""GPU probing: the real probing code against no driver and against a fake NVML module."""

from __future__ import annotations

import types

import pytest

from node.provider._capabilities import hardware_of, probe_capabilities


class FakeNVMLError(Exception):
    pass


def fake_nvml(gpus, fail_init=False):
    mod = types.SimpleNamespace(NVMLError=FakeNVMLError, NVML_TEMPERATURE_GPU=0, shutdowns=[])

    def init():
        if fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: mod.shutdowns.append(1)
    mod.nvmlDeviceGetCount = lambda: len(gpus)
    mod.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    mod.nvmlDeviceGetName = lambda h: h["name"]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["total"], free=h["free"])
    mod.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h["util"])
    mod.nvmlDeviceGetTemperature = lambda h, sensor: h["temp"]
    return mod


def test_no_driver_means_no_gpu():
    caps = probe_capabilities(fake_nvml([], fail_init=True))
    assert caps["gpus"] == [] and caps["cpu_count"] >= 1 and caps["ram_mb"] > 0
    assert probe_capabilities()["gpus"] == []  # this machine: real pynvml, no driver


def test_gpus_through_nvml():
    nvml = fake_nvml([{"name": b"NVIDIA H100 80GB HBM3", "total": 80 << 30, "free": 79 << 30, "util": 7, "temp": 41}])
    caps = probe_capabilities(nvml)
    assert caps["gpus"] == [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81920, "memory_free_mb": 80896,
                             "utilization_pct": 7, "temperature_c": 41}]
    assert nvml.shutdowns == [1]
    hw = hardware_of(caps)
    assert hw.gpus[0].name == "NVIDIA H100 80GB HBM3" and hw.gpus[0].memory_total_mb == 81920


def test_max_jobs_from_memory():
    from node.provider._capabilities import derive_max_jobs

    gpu = {"gpus": [{"name": "H100", "memory_total_mb": 81920, "memory_free_mb": 80000}], "cpu_count": 16,
           "ram_mb": 131072}
    assert derive_max_jobs(gpu, 16000, on_gpu=True) == 4  # (80000 - 16000) // 16000
    assert derive_max_jobs(gpu, 16000, on_gpu=False) == 3  # half the RAM: (65536 - 16000) // 16000
    assert derive_max_jobs(gpu, 100000, on_gpu=True) == 1  # never below one
    assert derive_max_jobs(gpu, None, on_gpu=True) is None


async def test_offered_models_are_benchmarked_and_published(tmp_path):
    from node import open_swarm
    from node._errors import InvalidRequest

    async with open_swarm(tmp_path / "p", passphrase="pw") as swarm:
        await swarm.offer("tiny", input_price=1, output_price=1, max_concurrent=64)
        assert "tiny" in swarm.service.storefront.benchmarks  # measured before the offer answered
        with pytest.raises(InvalidRequest, match="no model folder"):
            await swarm.offer("broken", backend="transformers:/no/such/folder", input_price=1, output_price=1)
        listed = {m.name: m for m in swarm.service.market._own.models}
        assert set(listed) == {"tiny"}  # the model that cannot load is not sold
        assert listed["tiny"].tokens_per_s > 0 and 1 <= listed["tiny"].max_concurrent <= 64
        status = swarm.service.status()["models"]
        assert status["tiny"]["healthy"] and "broken" not in status
