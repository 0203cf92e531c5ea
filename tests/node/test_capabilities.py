"""GPU probing: the real probing code against no driver and against a fake NVML module."""

from __future__ import annotations

import types

from node._capabilities import hardware_of, probe_capabilities


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
