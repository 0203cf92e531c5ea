"""The storefront: what this node sells right now, and the listing that says so.

It owns the offers (and saves them when they change), the loaded backends, their benchmark
figures, which models are healthy, the availability schedule, dynamic prices, the fixed-rate
contracts and the escrow agents we accept; from those it builds the listing and publishes it
(or withdraws it when there is nothing to sell). The session service and the health monitor are
given this object; nothing reaches into its state any other way.

Background work, each a ``serve_*``-style loop the composition root starts: ``warm`` (load
and benchmark each new offer), ``adjust_prices`` (republish when a dynamic price moves) and
``watch_schedule`` (withdraw and republish at the schedule's edges).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import AbstractSet, Any, Awaitable, Callable

import trio

import protocol

from .._contracts import Contract
from ..net import Market, peer_addrs
from ._admission import Admission
from ._capabilities import derive_max_jobs, hardware_of
from ._offers import Offer
from ._pricing_models import DynamicPricing
from ._schedule import Schedule
from .backends import Backend

__all__ = ["Storefront", "BackendFactory", "MAX_OFFERS"]

_logger = logging.getLogger(__name__)

#: starts the backend serving an offer (``open_backend`` in a node; scripted ones in tests)
BackendFactory = Callable[[Offer], Awaitable[Backend]]
MAX_OFFERS = 32


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One offer's measured figures, published in the listing."""

    tokens_per_s: int
    max_jobs: int  # sessions its memory allows at once; 0: unknown


class Storefront:
    """Offers, backends, benchmarks, health, schedule, prices and the published listing."""

    def __init__(
        self,
        identity: protocol.Signer,
        offers: tuple[Offer, ...],
        backend_factory: BackendFactory,
        admission: Admission,
        *,
        accept_escrow: tuple[str, ...] = (),
        own_agent: str | None = None,
        schedule: Schedule = Schedule(),
        dynamic_pricing: DynamicPricing | None = None,
        contracts: tuple[Contract, ...] = (),
        capabilities: dict[str, Any] | None = None,
        market: Market | None = None,
        persist: Callable[[tuple[Offer, ...]], None] | None = None,
        wall_clock: Callable[[], float],
    ) -> None:
        """
        Args:
            own_agent: this node's peer id when it is an escrow agent itself (always accepted).
            market: where the listing is published (None: nowhere, as in tests of the session service).
            persist: saves the offers when they change (the daemon writes config.toml).
            wall_clock: seconds since the epoch, for the schedule.
        """
        self.peer_id = protocol.peer_id_from_public_key(identity.public_key)
        self._offers = {o.model: o for o in offers}
        self._backend_factory = backend_factory
        self.admission = admission
        self._accept_escrow = tuple(accept_escrow)
        self._own_agent = own_agent
        self.schedule = schedule
        self.dynamic_pricing = dynamic_pricing
        self.contracts = contracts
        self.capabilities = capabilities or {}
        self._market = market
        self._persist = persist
        self._wall_clock = wall_clock
        self._backends: dict[tuple[str, str], Backend] = {}
        self._backend_lock = trio.Lock()
        self.benchmarks: dict[str, Benchmark] = {}
        self.load_errors: dict[str, str] = {}
        self.unhealthy: dict[str, str] = {}  # model -> why (set by the health monitor)
        self._listed_available = True
        self._offers_changed = trio.Event()

    # ---- what is for sale -----------------------------------------------------------------

    def offers(self) -> list[Offer]:
        return list(self._offers.values())

    def offer(self, model: str) -> Offer | None:
        return self._offers.get(model)

    def accepted_agents(self) -> AbstractSet[str]:
        """Escrow agents this node's offers accept: the configured ones, and itself if it is one."""
        own = {self._own_agent} if self._own_agent else set()
        return set(self._accept_escrow) | own

    def available(self) -> bool:
        """Inside the operator's availability schedule right now."""
        return self.schedule.available(dt.datetime.fromtimestamp(self._wall_clock(), dt.timezone.utc))

    def healthy(self, model: str) -> bool:
        return model not in self.unhealthy

    def listed(self, offer: Offer) -> protocol.ModelOffer:
        """The offer as listed now: the dynamic price at current utilization (or the base price),
        the measured tokens/s, and the concurrency the memory allows (never above the configured)."""
        listed = offer.to_model_offer()
        bench = self.benchmarks.get(offer.model)
        if bench is not None:
            listed = dataclasses.replace(listed, tokens_per_s=min(bench.tokens_per_s, 1 << 24),
                                         max_concurrent=min(listed.max_concurrent, bench.max_jobs) if bench.max_jobs
                                         else listed.max_concurrent)
        if self.dynamic_pricing is None:
            return listed
        price = self.dynamic_pricing.price(listed.price,
                                           self.admission.utilization(offer.model, offer.max_concurrent))
        return dataclasses.replace(listed, price=price)

    def add_offer(self, offer: Offer) -> Offer:
        """Add or replace the offer for a model; saved and republished at once.

        Raises:
            ValueError: already ``MAX_OFFERS`` models are listed.
        """
        if len(self._offers) >= MAX_OFFERS and offer.model not in self._offers:
            raise ValueError(f"a node lists at most {MAX_OFFERS} models")
        self._offers[offer.model] = offer
        self._changed()
        return offer

    def remove_offer(self, model: str) -> bool:
        if self._offers.pop(model, None) is None:
            return False
        self._changed()
        return True

    def _changed(self) -> None:
        if self._persist is not None:
            self._persist(tuple(self._offers.values()))
        for model in list(self.benchmarks):  # a changed offer is measured afresh
            if model not in self._offers:
                del self.benchmarks[model]
        self.load_errors.clear()
        self._offers_changed.set()
        self.publish()

    # ---- backends ---------------------------------------------------------------------------

    async def backend_for(self, offer: Offer) -> Backend:
        """The started backend serving ``offer`` (started on first use, then kept).

        Raises:
            BackendError: it cannot be started.
        """
        key = (offer.backend, offer.model)
        async with self._backend_lock:
            if key not in self._backends:
                self._backends[key] = await self._backend_factory(offer)
            return self._backends[key]

    def loaded_backend(self, model: str) -> Backend | None:
        offer = self._offers.get(model)
        return self._backends.get((offer.backend, offer.model)) if offer else None

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
        self._backends.clear()

    # ---- the listing ------------------------------------------------------------------------

    def set_unhealthy(self, found: dict[str, str]) -> None:
        """The health monitor's verdict; the listing changes when the set of unhealthy models does."""
        changed = found.keys() != self.unhealthy.keys()
        self.unhealthy = dict(found)
        if changed:
            self.publish()

    def listing(self) -> protocol.Listing | None:
        """The listing to publish now (seq and times are the market's), or None: nothing to sell."""
        if not self._offers or not self.available():
            return None
        host = self._market.host if self._market is not None else None
        return protocol.Listing(
            provider=self.peer_id,
            addrs=tuple(peer_addrs(host))[:16] if host is not None else (),
            seq=0,
            issued_at=0,
            expires_at=0,
            provider_type="self_hosted",
            models=tuple(self.listed(o) for o in self._offers.values() if self.healthy(o.model)),
            escrow_agents=tuple(sorted(self.accepted_agents()))[:16],
            hardware=hardware_of(self.capabilities),
        )

    def publish(self) -> None:
        """(Re)publish the listing — or withdraw it when there is nothing to sell right now."""
        self._listed_available = self.available()
        if self._market is not None:
            self._market.set_listing(self.listing())

    # ---- background work ----------------------------------------------------------------------

    async def warm(self, on_load_error: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Load each offered model once it is offered, benchmark it, and republish with the figures.
        A model that cannot load is not sold (``load_errors``) until its offer changes."""
        while True:
            for offer in list(self._offers.values()):
                if offer.model in self.benchmarks or offer.model in self.load_errors:
                    continue
                try:
                    backend = await self.backend_for(offer)
                    self.benchmarks[offer.model] = await self._benchmark(backend)
                except Exception as exc:  # any backend failure: unhealthy (not listed) until the offer changes
                    self.load_errors[offer.model] = f"could not load: {exc}"
                    if on_load_error is not None:
                        await on_load_error()
                self.publish()
            await self._offers_changed.wait()
            self._offers_changed = trio.Event()

    async def _benchmark(self, backend: Backend) -> Benchmark:
        tokens = 0

        async def count(text: str, n: int) -> None:
            nonlocal tokens
            tokens += n

        start = trio.current_time()
        await backend.generate([{"role": "user", "content": "Benchmark."}], max_tokens=32, temperature_milli=0,
                               top_p_milli=1000, stop=(), on_piece=count)
        elapsed = max(trio.current_time() - start, 1e-6)
        jobs = derive_max_jobs(self.capabilities, backend.footprint_mb(), backend.on_gpu())
        return Benchmark(tokens_per_s=int(tokens / elapsed), max_jobs=jobs or 0)

    async def adjust_prices(self) -> None:
        """Re-evaluate dynamic prices every interval; republish when one moved."""
        dynamic = self.dynamic_pricing
        if dynamic is None:
            return
        listed: dict[str, protocol.Price] = {}
        while True:
            now = {o.model: self.listed(o).price for o in self._offers.values()}
            if now != listed:
                listed = now
                self.publish()
            await trio.sleep(dynamic.adjustment_interval_s)

    async def watch_schedule(self, interval_s: float = 15.0) -> None:
        """Withdraw the listing when availability ends and republish when it starts again."""
        while True:
            await trio.sleep(interval_s)
            if self.available() != self._listed_available:
                _logger.warning("availability schedule: now %s", "open" if self.available() else "closed")
                self.publish()
