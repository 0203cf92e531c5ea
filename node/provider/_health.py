"""Health monitoring of what this node sells: periodic checks, withdrawal, recovery, alerts.

Each check (every ``interval_s``): a GPU with less free memory than ``min_free_gpu_mb`` makes
every model unhealthy; per model, a loaded backend must answer a one-message tokenization within
``backend_timeout_s`` (liveness), and its recent calls (the last ``window`` served) must succeed
at ``min_success_rate`` or better. An unhealthy model is withdrawn from the listing until a later
check finds it healthy again; every change is an alert — a WARNING in the log and a count in
``/metrics``. Config (``[health]`` in config.toml), with these defaults::

    [health]
    interval_s = 30
    backend_timeout_s = 10
    min_success_rate = 0.5
    window = 20
    min_free_gpu_mb = 0
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable

import trio

from ._capabilities import probe_capabilities

if TYPE_CHECKING:
    from ._storefront import Storefront

__all__ = ["HealthConfig", "HealthMonitor", "parse_health"]

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """The ``[health]`` table: how often to check, and what counts as unhealthy."""

    interval_s: float = 30.0
    backend_timeout_s: float = 10.0
    min_success_rate: float = 0.5
    window: int = 20
    min_free_gpu_mb: int = 0


def parse_health(raw: dict[str, Any] | None) -> HealthConfig:
    """A ``[health]`` table. Raises ValueError for unknown keys or values out of range."""
    raw = dict(raw or {})
    names = {f.name for f in dataclasses.fields(HealthConfig)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    cfg = HealthConfig(**raw)
    if not (cfg.interval_s > 0 and cfg.backend_timeout_s > 0 and 0 <= cfg.min_success_rate <= 1 and cfg.window >= 1
            and cfg.min_free_gpu_mb >= 0):
        raise ValueError("interval and timeout > 0, min_success_rate in 0..1, window >= 1, min_free_gpu_mb >= 0")
    return cfg


class HealthMonitor:
    """Checks what the storefront sells and tells it which models are unhealthy."""

    def __init__(self, config: HealthConfig, storefront: "Storefront",
                 gpus: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        """
        Args:
            gpus: the GPU probe (NVML by default), read in a worker thread at each check.
        """
        self.config = config
        self.storefront = storefront
        self._gpus = gpus or (lambda: probe_capabilities()["gpus"])
        self.outcomes: dict[str, collections.deque[bool]] = {}
        self.alerts = 0

    @property
    def unhealthy(self) -> dict[str, str]:
        """model -> why, as of the last check (or a load failure)."""
        return self.storefront.unhealthy

    def healthy(self, model: str) -> bool:
        return self.storefront.healthy(model)

    def record(self, model: str, ok: bool) -> None:
        """A served call's outcome (backend failures count against the model)."""
        self.outcomes.setdefault(model, collections.deque(maxlen=self.config.window)).append(ok)

    async def _liveness(self, model: str) -> str | None:
        backend = self.storefront.loaded_backend(model)
        if backend is None:  # not loaded yet: nothing to check until it serves
            return None
        with trio.move_on_after(self.config.backend_timeout_s) as scope:
            try:
                await backend.count_prompt_tokens([{"role": "user", "content": "health check"}])
            except Exception as exc:  # whatever the backend raises, it is not live
                return f"backend failed its liveness check: {exc}"
        if scope.cancelled_caught:
            return f"backend did not answer within {self.config.backend_timeout_s:.0f}s"
        return None

    async def check_once(self) -> dict[str, str]:
        """Run every check now; returns the unhealthy models with the reason."""
        found: dict[str, str] = {}
        gpu_problem = None
        if self.config.min_free_gpu_mb:
            low = [g for g in await trio.to_thread.run_sync(self._gpus)
                   if g.get("memory_free_mb", 0) < self.config.min_free_gpu_mb]
            if low:
                gpu_problem = f"GPU {low[0]['name']} has {low[0].get('memory_free_mb')} MiB free"
        for offer in self.storefront.offers():
            model = offer.model
            why = gpu_problem or self.storefront.load_errors.get(model) or await self._liveness(model)
            recent = self.outcomes.get(model)
            if why is None and recent and len(recent) >= min(5, self.config.window):
                rate = sum(recent) / len(recent)
                if rate < self.config.min_success_rate:
                    why = f"only {rate:.0%} of the last {len(recent)} calls succeeded"
            if why is not None:
                found[model] = why
        for model in found.keys() - self.unhealthy.keys():
            _logger.warning("ALERT %s is unhealthy (%s): withdrawn from the listing", model, found[model])
        for model in self.unhealthy.keys() - found.keys():
            _logger.warning("ALERT %s recovered: listed again", model)
            self.outcomes.pop(model, None)  # a fresh start after recovery
        self.alerts += len(found.keys() ^ self.unhealthy.keys())
        self.storefront.set_unhealthy(found)
        return found

    async def run(self) -> None:
        while True:
            await trio.sleep(self.config.interval_s)
            await self.check_once()

