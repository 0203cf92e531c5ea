"""What this machine can sell: GPUs through NVML (nvidia-ml-py), else CPU and RAM.

No driver, no library or any NVML failure means "no GPU" — never a crash.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import protocol

__all__ = ["probe_capabilities", "hardware_of", "derive_max_jobs"]

_logger = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _probe_gpus(nvml: Any) -> list[dict[str, Any]]:
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        _logger.info("no GPU: NVML unavailable (%s)", exc)
        return []
    gpus = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpu: dict[str, Any] = {
                "name": _text(nvml.nvmlDeviceGetName(handle)),
                "memory_total_mb": int(memory.total) // (1 << 20),
                "memory_free_mb": int(memory.free) // (1 << 20),
            }
            try:
                gpu["utilization_pct"] = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                gpu["temperature_c"] = int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            except nvml.NVMLError:  # not every device reports these
                pass
            gpus.append(gpu)
    except nvml.NVMLError as exc:
        _logger.warning("NVML failed while probing GPUs: %s", exc)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    return gpus


def probe_capabilities(nvml: Any = None) -> dict[str, Any]:
    """``{gpus: [{name, memory_total_mb, memory_free_mb, …}], cpu_count, ram_mb}``.

    Args:
        nvml: the NVML module (``pynvml``); tests pass a fake one. Imported when omitted.
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:  # nvidia-ml-py missing: no GPU
            nvml = None
    gpus = _probe_gpus(nvml) if nvml is not None else []
    try:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        ram_mb = 0
    return {"gpus": gpus, "cpu_count": os.cpu_count() or 0, "ram_mb": ram_mb}


def hardware_of(capabilities: dict[str, Any]) -> protocol.Hardware:
    """The listing's hardware record of a capabilities probe."""
    return protocol.Hardware(
        gpus=tuple(protocol.Gpu(name=g["name"][:128], memory_total_mb=g["memory_total_mb"]) for g in capabilities["gpus"]),
        cpu_count=min(capabilities["cpu_count"], 4096),
        ram_mb=capabilities["ram_mb"],
    )


def derive_max_jobs(capabilities: dict[str, Any], footprint_mb: int | None, on_gpu: bool) -> int | None:
    """How many jobs of a model of ``footprint_mb`` the memory allows (each job needs the weights'
    size again for activations and cache, a rule of thumb), or None when unknown."""
    if not footprint_mb:
        return None
    if on_gpu and capabilities["gpus"]:
        free = sum(g.get("memory_free_mb", g["memory_total_mb"]) for g in capabilities["gpus"])
    else:
        free = capabilities["ram_mb"] // 2  # leave half the RAM to the system
    return max(1, (free - footprint_mb) // footprint_mb)
