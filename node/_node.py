"""A running node: host, market, escrow role, provider and renter, held sessions — everything
but the HTTP face. ``open_node`` runs one for the duration of a block; the daemon, the demo and
the library (``open_swarm``) all build on it.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import multiaddr
import trio

import protocol
from protocol import SESSION_PROTOCOL
from wallet import EscrowAgent, Identity, Ledger

from ._config import NodeConfig, load_config, save_offers
from ._home import Home
from ._receipts import ReceiptStore
from .consumer._held_sessions import HeldSessions
from .consumer._renter import Renter
from .consumer._routing import Preferences, rank
from .consumer._trust import TrustBook
from .escrow._client import EscrowClient
from .escrow._ops import EscrowOps
from .escrow._service import serve_escrow
from .net._host import PeerInfo, open_host, parse_peer_addr, peer_addrs
from .net._market import Market, MarketConfig, open_market
from .provider._capabilities import derive_max_jobs, hardware_of, probe_capabilities
from .provider._health import HealthMonitor
from .provider._offers import Offer
from .provider._session_service import ProviderService
from .provider._sla import SlaTracker
from .provider.backends._base import Backend
from .provider.backends._factory import open_backend

__all__ = ["NodeService", "open_node", "resolve_config"]

_logger = logging.getLogger(__name__)


def _all_loopback(addrs: tuple[str, ...]) -> bool:
    try:
        hosts = [multiaddr.Multiaddr(a).value_for_protocol("ip4") for a in addrs]
        return bool(hosts) and all(h is not None and ipaddress.ip_address(h).is_loopback for h in hosts)
    except Exception:
        return False


class NodeService:
    """What the API and CLI see of a running node."""

    def __init__(self, home: Home, identity: Identity, market: Market, config: NodeConfig, capabilities: dict[str, Any],
                 escrow_agent: EscrowAgent | None = None, receipts: ReceiptStore | None = None,
                 api_key: Callable[[str], str] | None = None, models_dir: Path | None = None):
        self.home = home
        self.escrow_agent = escrow_agent
        client = EscrowClient(market.host, escrow_agent, market.dht)
        self.escrow = EscrowOps(identity, client, time.time)
        self.receipts = receipts if receipts is not None else ReceiptStore(home.path / "receipts.db")
        self._api_key = api_key
        self.models_dir = models_dir or home.path
        self._backends: dict[tuple[str, str], Backend] = {}
        self._backend_lock = trio.Lock()
        self._listed_available = True
        self.perf: dict[str, dict[str, int]] = {}
        self._offers_changed = trio.Event()
        self._load_errors: dict[str, str] = {}
        self.health = HealthMonitor(config.health, lambda: list(self._offers), self._loaded_backend,
                                    lambda: probe_capabilities()["gpus"], self.publish, self._load_errors.get)
        self.provider = ProviderService(identity, lambda: dict(self._offers), self.accepted_agents, self.backend_for,
                                        client, self.receipts, is_available=self.available,
                                        on_outcome=self.health.record, listed_of=self.current_offer,
                                        contracts=lambda: self.config.contracts,
                                        sla=SlaTracker(config.sla, market.listed_fraction))
        self.trust = TrustBook(home.path / "trust.db")
        self.renter = Renter(market, self.escrow, escrow_agent, self.receipts, self.trust,
                             contracts=config.client_contracts)
        self.sessions = HeldSessions(self.renter)
        self.identity = identity
        self.market = market
        self.host = market.host
        self.config = config
        self.capabilities = capabilities
        self._offers = {o.model: o for o in config.offers}
        self._started = time.monotonic()
        self.api_url = ""

    def accepted_agents(self) -> set[str]:
        """Escrow agents this node's offers accept: the configured ones, and itself if it is one."""
        own = {self.identity.peer_id} if self.escrow_agent is not None else set()
        return set(self.config.accept_escrow) | own

    def utilization(self, model: str) -> float:
        offer = self._offers.get(model)
        return self.provider.active[model] / offer.max_concurrent if offer else 0.0

    def current_offer(self, offer: Offer) -> protocol.ModelOffer:
        """The offer as listed now: the dynamic price at current utilization (or the base price),
        the measured tokens/s, and the concurrency the memory allows (never above the configured)."""
        listed = offer.to_model_offer()
        perf = self.perf.get(offer.model)
        if perf is not None:
            jobs = perf["max_jobs"]
            listed = dataclasses.replace(listed, tokens_per_s=min(perf["tokens_per_s"], 1 << 24),
                                         max_concurrent=min(listed.max_concurrent, jobs) if jobs else
                                         listed.max_concurrent)
        if self.config.dynamic_pricing is None:
            return listed
        price = self.config.dynamic_pricing.price(listed.price, self.utilization(offer.model))
        return dataclasses.replace(listed, price=price)

    async def adjust_prices(self) -> None:
        """Re-evaluate dynamic prices every interval; republish when one moved."""
        dynamic = self.config.dynamic_pricing
        if dynamic is None:
            return
        listed = {}
        while True:
            now = {o.model: self.current_offer(o).price for o in self._offers.values()}
            if now != listed:
                listed = now
                self.publish()
            await trio.sleep(dynamic.adjustment_interval_s)

    async def warm(self) -> None:
        """Load each offered model once it is offered, benchmark it, and republish with the figures."""
        while True:
            for offer in list(self._offers.values()):
                if offer.model in self.perf or offer.model in self._load_errors:
                    continue
                try:
                    backend = await self.backend_for(offer)
                    self.perf[offer.model] = await self._benchmark(backend)
                except Exception as exc:  # any backend failure: unhealthy (not listed) until the offer changes
                    self._load_errors[offer.model] = f"could not load: {exc}"
                    await self.health.check_once()
                self.publish()
            await self._offers_changed.wait()
            self._offers_changed = trio.Event()

    async def _benchmark(self, backend: Backend) -> dict[str, int]:
        tokens = 0

        async def count(text: str, n: int) -> None:
            nonlocal tokens
            tokens += n

        start = time.monotonic()
        await backend.generate([{"role": "user", "content": "Benchmark."}], max_tokens=32, temperature_milli=0,
                               top_p_milli=1000, stop=(), on_piece=count)
        elapsed = max(time.monotonic() - start, 1e-6)
        jobs = derive_max_jobs(self.capabilities, backend.footprint_mb(), backend.on_gpu())
        return {"tokens_per_s": int(tokens / elapsed), "max_jobs": jobs or 0}

    def _loaded_backend(self, model: str) -> Backend | None:
        offer = self._offers.get(model)
        return self._backends.get((offer.backend, offer.model)) if offer else None

    async def backend_for(self, offer: Offer) -> Backend:
        """The started backend serving ``offer`` (started on first use, then kept)."""
        key = (offer.backend, offer.model)
        async with self._backend_lock:
            if key not in self._backends:
                self._backends[key] = await open_backend(offer.backend, self.models_dir, offer.model, self._api_key)
            return self._backends[key]

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
        self.receipts.close()
        self.trust.close()

    async def observe_uptime(self, interval_s: float = 30.0) -> None:
        """Credit providers whose listings stay alive (trust's uptime term)."""
        while True:
            now = self.market.now()
            alive = [lst.provider for lst in self.market.view.listings(now) if lst.provider != self.identity.peer_id]
            await trio.to_thread.run_sync(self.trust.observe_alive, alive, now)
            await trio.sleep(interval_s)

    def offers(self) -> list[Offer]:
        return list(self._offers.values())

    def _listing_template(self) -> protocol.Listing | None:
        if not self._offers:
            return None
        return protocol.Listing(
            provider=self.identity.peer_id,
            addrs=tuple(peer_addrs(self.host))[:16],
            seq=0,
            issued_at=0,
            expires_at=0,
            provider_type="self_hosted",
            models=tuple(self.current_offer(o) for o in self._offers.values() if self.health.healthy(o.model)),
            escrow_agents=tuple(sorted(self.accepted_agents()))[:16],
            hardware=hardware_of(self.capabilities),
        )

    def available(self) -> bool:
        """Inside the operator's availability schedule right now."""
        return self.config.schedule.available(datetime.datetime.now(datetime.timezone.utc))

    def publish(self) -> None:
        """(Re)publish the listing — or withdraw it when there is nothing to sell right now."""
        self._listed_available = self.available()
        self.market.set_listing(self._listing_template() if self._listed_available else None)

    async def watch_schedule(self, interval_s: float = 15.0) -> None:
        """Withdraw the listing when availability ends and republish when it starts again."""
        while True:
            await trio.sleep(interval_s)
            if self.available() != self._listed_available:
                _logger.warning("availability schedule: now %s", "open" if self.available() else "closed")
                self.publish()

    def _persist(self) -> None:
        save_offers(self.home.config, tuple(self._offers.values()))
        for model in list(self.perf):  # a changed offer is measured afresh
            if model not in self._offers:
                del self.perf[model]
        self._load_errors.clear()
        self._offers_changed.set()
        self.publish()

    def add_offer(self, fields: dict[str, Any]) -> Offer:
        """Add or replace the offer for a model; persisted and republished at once.

        Raises:
            ValueError, TypeError: a missing or invalid field.
        """
        offer = Offer(**fields)
        if len(self._offers) >= 32 and offer.model not in self._offers:
            raise ValueError("a node lists at most 32 models")
        self._offers[offer.model] = offer
        self._persist()
        return offer

    def remove_offer(self, model: str) -> bool:
        if self._offers.pop(model, None) is None:
            return False
        self._persist()
        return True

    def status(self) -> dict[str, Any]:
        now = self.market.now()
        return {
            "peer_id": self.identity.peer_id,
            "addrs": peer_addrs(self.host),
            "api_url": self.api_url,
            "connected_peers": len(self.host.get_connected_peers()),
            "listings_known": len(self.market.view.listings(now)),
            "offers": len(self._offers),
            "uptime_s": self.uptime_s(),
            "escrow_agent": self.escrow_agent is not None,
            "available": self.available(),
            "unhealthy": dict(self.health.unhealthy),
            "capabilities": self.capabilities,
            "models": {m: {"healthy": self.health.healthy(m), **self.perf.get(m, {})} for m in self._offers},
        }

    def uptime_s(self) -> int:
        return int(time.monotonic() - self._started)

    def market_stats(self) -> dict[str, Any]:
        return {**self.market.view.stats(), "published": self.market.published_count}

    async def providers(self, model: str | None, sort: str) -> list[dict[str, Any]]:
        """Market rows (the CLI contract's shape), ordered by ``sort``; with ``model`` the DHT is
        asked too. Every listed provider is shown, whatever its trust."""
        if model is not None:
            await self.market.lookup(model)
        now = self.market.now()
        rows = [(r.listing, r.offer) for r in self.market.view.rows(now, model)]
        ranked = rank(rows, Preferences(sort=sort, trust_floor=-1.0, explore=0.0), prompt_tokens=1000,
                      max_tokens=1000, stats=self.trust.get, agent_for=lambda lst: "")
        out = []
        for c in ranked:
            lst, offer, s = c.listing, c.offer, c.stats
            out.append(
                {
                    "peer_id": lst.provider,
                    "model": offer.name,
                    "input_price": offer.price.input_per_1k,
                    "output_price": offer.price.output_per_1k,
                    "max_context": offer.max_context,
                    "min_charge": offer.price.min_charge,
                    "rate_limit": offer.rate_limit_rpm,
                    "max_concurrent": offer.max_concurrent,
                    "trust": round(s.score, 1),
                    "latency_ms": None if s.ttft_s is None else int(s.ttft_s * 1000),
                    "tokens_per_s": None if s.tps is None else round(s.tps, 1),
                    "benchmark_tokens_per_s": offer.tokens_per_s or None,
                    "escrows": list(lst.escrow_agents),
                    "gpus": [{"name": g.name, "memory_total_mb": g.memory_total_mb} for g in lst.hardware.gpus],
                    "addrs": list(lst.addrs),
                    "expires_at": lst.expires_at,
                }
            )
        return out


async def _bootstrap(market: Market, addrs: tuple[str, ...]) -> None:
    """Dial each bootstrap peer until connected, backing off to 30 s between attempts."""

    async def one(addr: str) -> None:
        info = parse_peer_addr(addr)
        delay = 0.5
        while True:
            try:
                await market.host.connect(info)
                _logger.info("connected to bootstrap peer %s", addr)
                return
            except Exception as exc:  # unreachable for now: keep trying, quietly
                _logger.info("bootstrap peer %s unreachable (%s); retrying in %.0fs", addr, exc, delay)
            await trio.sleep(delay)
            delay = min(30.0, delay * 2)

    async with trio.open_nursery() as nursery:
        for addr in addrs:
            nursery.start_soon(one, addr)


async def _join_discovered(host: Any, interval_s: float = 1.0) -> None:
    """Connect to peers that local discovery (mDNS) put in the peerstore; retry a failed one later."""
    me, next_try = host.get_id(), {}
    while True:
        now = trio.current_time()
        connected = set(host.get_connected_peers())
        for peer in host.get_peerstore().peer_ids():
            if peer == me or peer in connected or next_try.get(peer, 0) > now:
                continue
            addrs = host.get_peerstore().addrs(peer)
            if not addrs:
                continue
            try:
                with trio.move_on_after(5):
                    await host.connect(PeerInfo(peer, addrs))
            except Exception as exc:  # gone, or not one of us
                _logger.debug("local peer %s unreachable: %s", peer, exc)
                next_try[peer] = now + 30
        await trio.sleep(interval_s)


def resolve_config(home: Home, listen: tuple[str, ...] | None = None, bootstrap: tuple[str, ...] = (),
                   api: str | None = None, accept_escrow: tuple[str, ...] = ()) -> NodeConfig:
    """The config file with command-line overrides applied, checked.

    Raises:
        ConfigError, ValueError: a bad file or a bad value.
    """
    config = load_config(home.config)
    config = dataclasses.replace(
        config,
        listen=tuple(listen) if listen else config.listen,
        bootstrap=tuple(dict.fromkeys(config.bootstrap + tuple(bootstrap))),
        api=api or config.api,
        accept_escrow=tuple(dict.fromkeys(config.accept_escrow + tuple(accept_escrow))),
    )
    for agent_id in config.accept_escrow:
        protocol.public_key_from_peer_id(agent_id)
    return config


@asynccontextmanager
async def open_node(
    home: Home,
    identity: Identity,
    config: NodeConfig,
    *,
    escrow: bool = False,
    api_key: Callable[[str], str] | None = None,
    models_dir: Path | None = None,
    mdns: bool = False,
) -> AsyncIterator["NodeService"]:
    """Run a node (without its HTTP API) for the duration of the block; ``mdns`` also finds
    (and joins) peers on the local network without bootstrap addresses."""
    market_config = MarketConfig(max_peers_per_subnet=0 if _all_loopback(config.listen) else None)
    capabilities = probe_capabilities()
    agent = EscrowAgent(Ledger(home.path / "escrow.db"), identity) if escrow else None
    try:
        async with open_host(identity, config.listen, mdns) as host, open_market(host, identity, market_config) as market:
            service = NodeService(home, identity, market, config, capabilities, agent, api_key=api_key,
                                  models_dir=models_dir)
            try:
                async with trio.open_nursery() as nursery:
                    if agent is not None:
                        await nursery.start(serve_escrow, host, agent)
                    host.set_stream_handler(SESSION_PROTOCOL, service.provider.handle)
                    await nursery.start(service.sessions.serve)
                    nursery.start_soon(_bootstrap, market, config.bootstrap)
                    nursery.start_soon(service.observe_uptime)
                    nursery.start_soon(service.watch_schedule)
                    nursery.start_soon(service.health.run)
                    nursery.start_soon(service.adjust_prices)
                    nursery.start_soon(service.warm)
                    if mdns:
                        nursery.start_soon(_join_discovered, host)
                    service.publish()
                    try:
                        yield service
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await service.aclose()
    finally:
        if agent is not None:
            agent.ledger.close()
