"""The storefront: what this node sells right now, and the listing that says so.

It owns the offers (and saves them when they change), the loaded backends, their benchmark
figures, which models are healthy, the availability schedule, dynamic prices, the fixed-rate
contracts and the escrow agents we accept; from those it builds the listing and publishes it
(or withdraws it when there is nothing to sell). The session service and the health monitor are
given this object; nothing reaches into its state any other way.

Background work, each a ``serve_*``-style loop the composition root starts: ``warm`` (load
and benchmark the offers the node started with, close backends set aside), ``adjust_prices``
(republish when a dynamic price moves) and ``watch_schedule`` (withdraw and republish at the
schedule's edges).

Adding an offer loads and benchmarks its model first (``add_offer``): a model that cannot load
changes nothing (not the offers, not the config file, not the listing) and the caller hears why.
Sessions hold a model's ``LiveBackend``, never a backend itself, so replacing an offer's backend
swaps what every session serves from its next call on; the old backend finishes the calls it
is running and is then closed.

What a model serves (``features``): the loaded backend's ``features()`` (an offer's declared ones
narrow it), else the offer's ``default_features`` until it loads; the listing carries it and the
session service refuses a call needing anything else. An embeddings model is benchmarked by
embedding, its speed listed as input tokens per second.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from contextlib import asynccontextmanager
from typing import AbstractSet, Any, AsyncIterator, Awaitable, Callable, Sequence

import trio

import protocol

from .._calls import CallOptions
from .._contracts import Contract
from ..net import Market, peer_addrs
from ._admission import Admission
from ._capabilities import derive_max_jobs, hardware_of
from ._offers import Offer
from ._pricing_models import DynamicPricing
from ._schedule import Schedule
from .backends import Backend, BackendError, Generation, OnPiece
from .backends._base import Embedded

__all__ = ["Storefront", "BackendFactory", "MAX_OFFERS", "LiveBackend", "OfferUnloadable", "BENCHMARK_TIMEOUT_S"]

_logger = logging.getLogger(__name__)
_NO_OPTIONS = CallOptions()

#: starts the backend serving an offer (``open_backend`` in a node; scripted ones in tests)
BackendFactory = Callable[[Offer], Awaitable[Backend]]
MAX_OFFERS = 32
#: the longest an offer's benchmark (32 tokens) may take before the offer is refused as not answering
BENCHMARK_TIMEOUT_S = 120.0


class OfferUnloadable(BackendError):
    """An offer's model could not be loaded or benchmarked; nothing was changed.

    Attributes:
        upstream: the failure is an upstream server's (unreachable, failing: a gateway's error);
            otherwise the offer names something unusable (no folder or file, no key, not a model).
    """

    def __init__(self, message: str, *, upstream: bool) -> None:
        super().__init__(message)
        self.upstream = upstream


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One offer's measured figures, published in the listing."""

    tokens_per_s: int
    max_jobs: int  # sessions its memory allows at once; 0: unknown


def _cannot(offer: Offer, exc: BaseException) -> str:
    return f"cannot offer {offer.model!r} with backend {offer.backend!r}: {str(exc) or type(exc).__name__}"


class LiveBackend(Backend):
    """The backend a model is served by right now: what sessions hold.

    ``swap`` points it at another backend; a call started before keeps the backend it started on,
    every call after goes to the new one. A backend swapped out is closed when its last running
    call ends (``swap`` hands it back to be closed at once when none runs).
    """

    def __init__(self, model: str, backend: Backend) -> None:
        self.model = model
        self._current: Backend | None = backend
        self._running: dict[int, int] = {}  # id(backend) -> its calls in flight
        self._retiring: dict[int, Backend] = {}  # swapped out with calls in flight

    @property
    def current(self) -> Backend | None:
        return self._current

    @property
    def spec(self) -> str:  # type: ignore[override]
        return self._current.spec if self._current is not None else ""

    @property
    def parallel(self) -> int | None:  # type: ignore[override]
        return self._current.parallel if self._current is not None else 1

    def footprint_mb(self) -> int | None:
        return self._current.footprint_mb() if self._current is not None else None

    def on_gpu(self) -> bool:
        return self._current.on_gpu() if self._current is not None else False

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self._current.kind if self._current is not None else "chat"

    def features(self) -> tuple[str, ...]:
        return self._current.features() if self._current is not None else ()

    def commitment(self) -> protocol.ModelCommitment | None:
        return self._current.commitment() if self._current is not None else None

    def reproducible(self) -> bool:
        return self._current.reproducible() if self._current is not None else False

    def swap(self, backend: Backend | None) -> Backend | None:
        """Serve ``backend`` from the next call on (None: no longer offered; calls then fail).

        Returns:
            the old backend when no call runs on it (the caller closes it), else None (its
            last call closes it).
        """
        old, self._current = self._current, backend
        if old is None or old is backend:
            return None
        if id(old) in self._running:
            self._retiring[id(old)] = old
            return None
        return old

    @asynccontextmanager
    async def _using(self) -> AsyncIterator[Backend]:
        backend = self._current
        if backend is None:
            raise BackendError(f"{self.model} is no longer offered")
        key = id(backend)
        self._running[key] = self._running.get(key, 0) + 1
        try:
            yield backend
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
                retired = self._retiring.pop(key, None)
                if retired is not None:
                    with trio.CancelScope(shield=True):
                        await retired.aclose()

    # A plain call reaches the backend without ``options``, as before they existed (a backend
    # written for plain chat keeps working); one that asks more hands them on.

    async def count_prompt_tokens(self, messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> int:
        async with self._using() as backend:
            if options == _NO_OPTIONS:
                return await backend.count_prompt_tokens(messages)
            return await backend.count_prompt_tokens(messages, options)

    async def generate(self, messages: Sequence[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece,
                       options: CallOptions = _NO_OPTIONS) -> Generation:
        extra = {} if options == _NO_OPTIONS else {"options": options}
        async with self._using() as backend:
            return await backend.generate(messages, max_tokens=max_tokens, temperature_milli=temperature_milli,
                                          top_p_milli=top_p_milli, stop=stop, on_piece=on_piece, **extra)

    async def count_input_tokens(self, texts: Sequence[str]) -> int:
        async with self._using() as backend:
            return await backend.count_input_tokens(texts)  # type: ignore[attr-defined]

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> Embedded:
        async with self._using() as backend:
            return await backend.embed(texts, dimensions)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        """Close every backend this one holds, running calls or not (the node is stopping)."""
        backends = list(self._retiring.values()) + ([self._current] if self._current is not None else [])
        self._current, self._retiring = None, {}
        for backend in backends:
            await backend.aclose()


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
        self._backends: dict[str, LiveBackend] = {}  # model -> what its sessions are served by
        self._backend_lock = trio.Lock()  # one lazy load at a time
        self._offer_lock = trio.Lock()  # one offer change (load, benchmark, switch) at a time
        self._swapped_out: list[Backend] = []  # idle backends to close (``warm`` closes them)
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

    def set_accepted_agents(self, agents: tuple[str, ...]) -> None:
        """Replace the configured escrow agents (``node escrow accept``) and republish at once, so
        consumers see the listing with them; sessions already admitted keep their channels."""
        self._accept_escrow = tuple(dict.fromkeys(agents))
        self.publish()

    def available(self) -> bool:
        """Inside the operator's availability schedule right now."""
        return self.schedule.available(dt.datetime.fromtimestamp(self._wall_clock(), dt.timezone.utc))

    def healthy(self, model: str) -> bool:
        return model not in self.unhealthy

    def features(self, offer: Offer) -> tuple[str, ...]:
        """What ``offer``'s model serves now: its loaded backend's ``features()`` (narrowed to the
        declared ones, when the offer declares any), else the offer's defaults until it loads."""
        live = self._backends.get(offer.model)
        claimed = live.features() if live is not None else ()
        if not claimed:
            return offer.default_features()
        if offer.features:  # an openai: backend claims the declared ones; another may claim less
            claimed = tuple(f for f in claimed if f in offer.features)
        return tuple(dict.fromkeys(claimed))[:16]

    def listed(self, offer: Offer) -> protocol.ModelOfferV2:
        """The offer as listed now: the dynamic price at current utilization (or the base price),
        the measured tokens/s, the concurrency the memory allows (never above the configured),
        what it serves (``features``), and the commitment to the model its loaded backend serves
        (none until it is loaded)."""
        live = self._backends.get(offer.model)
        committed = live.commitment() if live is not None else None
        listed = protocol.ModelOfferV2(**{f.name: getattr(offer.to_model_offer(), f.name)
                                          for f in dataclasses.fields(protocol.ModelOffer)},
                                       commitment=committed, reproducible=committed is not None and live.reproducible())
        listed = dataclasses.replace(listed, features=self.features(offer))
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

    async def add_offer(self, offer: Offer) -> Offer:
        """Add or replace the offer for a model once its model is loaded and benchmarked; then
        saved and republished at once. A replaced offer with another backend swaps what every
        session of the model serves (``LiveBackend.swap``); one with the same backend keeps the
        loaded model (a price change does not reload it).

        Raises:
            ValueError: already ``MAX_OFFERS`` models are listed.
            OfferUnloadable: the model cannot be loaded or does not answer its benchmark; the
                offers, the config file and the listing are as they were.
        """
        async with self._offer_lock:
            if len(self._offers) >= MAX_OFFERS and offer.model not in self._offers:
                raise ValueError(f"a node lists at most {MAX_OFFERS} models")
            current = self._offers.get(offer.model)
            offers = {**self._offers, offer.model: offer}
            if current is not None and current.backend == offer.backend and offer.model not in self.load_errors:
                await self._measure(offer)  # the same backend serves on: loaded (or loading) once
                self._save(offers)
            else:
                backend, bench = await self._load(offer)
                try:
                    self._save(offers)
                except BaseException:
                    await self._close_idle(backend)
                    raise
                live = self._backends.get(offer.model)  # a session may have loaded the old one meanwhile
                if live is None:
                    self._backends[offer.model] = LiveBackend(offer.model, backend)
                else:
                    await self._close_idle(live.swap(backend))
                self.benchmarks[offer.model] = bench
            self._offers = offers
            self._changed(saved=True)
            return offer

    def remove_offer(self, model: str) -> bool:
        """Stop selling ``model``: withdrawn at once, its backend closed once its running calls end."""
        if self._offers.pop(model, None) is None:
            return False
        live = self._backends.pop(model, None)
        if live is not None:
            idle = live.swap(None)
            if idle is not None:
                self._swapped_out.append(idle)  # closed by ``warm``, woken by the change
        self._changed()
        return True

    async def _load(self, offer: Offer) -> tuple[Backend, Benchmark]:
        """A newly started backend for ``offer``, and its benchmark.

        Raises:
            OfferUnloadable: with the reason (the backend, if it started, is closed).
        """
        try:
            backend = await self._backend_factory(offer)
        except Exception as exc:  # any backend's load failure: the offer names something unusable
            raise OfferUnloadable(_cannot(offer, exc), upstream=False) from exc
        try:
            return backend, await self._benchmark_checked(offer, backend)
        except BaseException:
            await self._close_idle(backend)
            raise

    async def _measure(self, offer: Offer) -> None:
        """Make sure ``offer``'s model is loaded (through the shared lazy load: the one ``warm`` or a
        session started is waited for, not repeated) and benchmarked.

        Raises:
            OfferUnloadable: with the reason.
        """
        try:
            live = await self.backend_for(offer)
        except Exception as exc:
            raise OfferUnloadable(_cannot(offer, exc), upstream=False) from exc
        if offer.model not in self.benchmarks:
            self.benchmarks[offer.model] = await self._benchmark_checked(offer, live)

    async def _benchmark_checked(self, offer: Offer, backend: Backend) -> Benchmark:
        """``backend``'s benchmark, within ``BENCHMARK_TIMEOUT_S``.

        Raises:
            OfferUnloadable: it failed (an upstream's failure for ``openai:``) or took too long.
        """
        upstream = offer.backend.startswith("openai:")
        try:
            with trio.fail_after(BENCHMARK_TIMEOUT_S):
                return await self._benchmark(backend)
        except trio.TooSlowError as exc:
            slow = TimeoutError(f"it did not answer a 32-token benchmark within {BENCHMARK_TIMEOUT_S:.0f} s")
            raise OfferUnloadable(_cannot(offer, slow), upstream=upstream) from exc
        except Exception as exc:  # the upstream failed, or the loaded model cannot generate
            raise OfferUnloadable(_cannot(offer, exc), upstream=upstream) from exc

    async def _close_idle(self, backend: Backend | None) -> None:
        if backend is not None:
            with trio.CancelScope(shield=True):
                await backend.aclose()

    def _save(self, offers: dict[str, Offer]) -> None:
        """Persist ``offers`` (before they are taken up: a failed write changes nothing).

        Raises:
            OSError, ConfigError: the config file cannot be written.
        """
        if self._persist is not None:
            self._persist(tuple(offers.values()))

    def _changed(self, *, saved: bool = False) -> None:
        if not saved:
            self._save(self._offers)
        for model in list(self.benchmarks):  # a changed offer is measured afresh
            if model not in self._offers:
                del self.benchmarks[model]
        self.load_errors.clear()
        self._offers_changed.set()
        self.publish()

    # ---- backends ---------------------------------------------------------------------------

    async def backend_for(self, offer: Offer) -> Backend:
        """The live backend serving ``offer``'s model (loaded on first use, then kept; an
        ``add_offer`` swaps what it serves).

        Raises:
            BackendError: it cannot be started.
        """
        live = self._backends.get(offer.model)
        if live is not None:
            return live
        async with self._backend_lock:
            live = self._backends.get(offer.model)
            if live is None:
                backend = await self._backend_factory(offer)
                live = self._backends.get(offer.model)  # ``add_offer`` may have installed one meanwhile
                if live is None:
                    live = self._backends[offer.model] = LiveBackend(offer.model, backend)
                else:
                    await self._close_idle(backend)
            return live

    def loaded_backend(self, model: str) -> Backend | None:
        return self._backends.get(model) if model in self._offers else None

    async def aclose(self) -> None:
        for live in self._backends.values():
            await live.aclose()
        self._backends.clear()
        for backend in self._swapped_out:
            await backend.aclose()
        self._swapped_out.clear()

    # ---- the listing ------------------------------------------------------------------------

    def set_unhealthy(self, found: dict[str, str]) -> None:
        """The health monitor's verdict; the listing changes when the set of unhealthy models does."""
        changed = found.keys() != self.unhealthy.keys()
        self.unhealthy = dict(found)
        if changed:
            self.publish()

    def listing(self) -> protocol.ListingV2 | None:
        """The listing to publish now (seq and times are the market's), or None: nothing to sell."""
        if not self._offers or not self.available():
            return None
        host = self._market.host if self._market is not None else None
        return protocol.ListingV2(
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
        """Load and benchmark each offer not measured yet (those the node started with: an added
        one is measured before it is added), republish with the figures, and close the backends
        a removed offer set aside. A model that cannot load is not sold (``load_errors``) until
        its offer changes."""
        while True:
            while self._swapped_out:
                await self._close_idle(self._swapped_out.pop())
            for offer in list(self._offers.values()):
                if offer.model in self.benchmarks or offer.model in self.load_errors:
                    continue
                try:
                    backend = await self.backend_for(offer)
                    bench = await self._benchmark(backend)
                except Exception as exc:  # any backend failure: unhealthy (not listed) until the offer changes
                    if self._offers.get(offer.model) is offer:  # not replaced while it loaded
                        self.load_errors[offer.model] = f"could not load: {exc}"
                        if on_load_error is not None:
                            await on_load_error()
                else:
                    if self._offers.get(offer.model) is offer:
                        self.benchmarks[offer.model] = bench
                self.publish()
            await self._offers_changed.wait()
            self._offers_changed = trio.Event()

    async def _benchmark(self, backend: Backend) -> Benchmark:
        """Generate 32 tokens (an embeddings model: embed a sentence) and time it."""
        tokens = 0

        async def count(text: str, n: int, **extras: Any) -> None:
            nonlocal tokens
            tokens += n

        start = trio.current_time()
        if backend.kind == "embeddings":
            tokens = (await backend.embed(["Benchmark the embedding of one sentence."])).tokens_in  # type: ignore[attr-defined]
        else:
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
