"""The daemon: one host, the market, the local API; ``run_daemon`` runs them until cancelled.

Lifecycle: the host listens, the market starts, offers from the config are published, the API
binds, then ``daemon.json`` ({peer_id, addrs, api_url, pid}) is written — its presence means
"ready". Cancelling ``run_daemon`` (SIGINT/SIGTERM in ``node start``) closes the API, the market's
tasks, the DHT and gossip services and the host with its connections, and removes ``daemon.json``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import time
from typing import Any, Callable

import hypercorn.config
import hypercorn.trio
import multiaddr
import trio

import protocol
from wallet import EscrowAgent, Identity, Ledger

from ._api import build_app
from ._capabilities import hardware_of, probe_capabilities
from ._config import NodeConfig, Offer, load_config, save_offers
from ._daemon_files import api_token, daemon_info_path, write_private
from ._backends import Backend, open_backend
from ._escrow_ops import EscrowOps
from ._escrow_service import EscrowClient, serve_escrow
from ._receipts import ReceiptStore
from ._held_sessions import HeldSessions
from ._renting import Renter
from ._session_service import SESSION_PROTOCOL, ProviderService
from ._home import Home
from ._host import open_host, parse_peer_addr, peer_addrs
from ._market import Market, MarketConfig, open_market

__all__ = ["NodeService", "run_daemon"]

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
                 api_key: Callable[[str], str] | None = None):
        self.home = home
        self.escrow_agent = escrow_agent
        client = EscrowClient(market.host, escrow_agent, market.dht)
        self.escrow = EscrowOps(identity, client, time.time)
        self.receipts = receipts if receipts is not None else ReceiptStore(home.path / "receipts.db")
        self._api_key = api_key
        self._backends: dict[tuple[str, str], Backend] = {}
        self._backend_lock = trio.Lock()
        self.provider = ProviderService(identity, lambda: dict(self._offers), self.accepted_agents, self.backend_for,
                                        client, self.receipts)
        self.renter = Renter(market, self.escrow, escrow_agent, self.receipts)
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

    async def backend_for(self, offer: Offer) -> Backend:
        """The started backend serving ``offer`` (started on first use, then kept)."""
        key = (offer.backend, offer.model)
        async with self._backend_lock:
            if key not in self._backends:
                self._backends[key] = await open_backend(offer.backend, self.home.path, offer.model, self._api_key)
            return self._backends[key]

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
        self.receipts.close()

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
            models=tuple(o.to_model_offer() for o in self._offers.values()),
            escrow_agents=tuple(sorted(self.accepted_agents()))[:16],
            hardware=hardware_of(self.capabilities),
        )

    def publish(self) -> None:
        self.market.set_listing(self._listing_template())

    def _persist(self) -> None:
        save_offers(self.home.config, tuple(self._offers.values()))
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
            "uptime_s": int(time.monotonic() - self._started),
            "escrow_agent": self.escrow_agent is not None,
            "capabilities": self.capabilities,
        }

    def market_stats(self) -> dict[str, Any]:
        return {**self.market.view.stats(), "published": self.market.published_count}

    async def providers(self, model: str | None, sort: str) -> list[dict[str, Any]]:
        """Market rows (the CLI contract's shape); with ``model``, the DHT is asked too."""
        if model is not None:
            await self.market.lookup(model)
        now = self.market.now()
        rows = []
        for row in self.market.view.rows(now, model):
            lst, offer = row.listing, row.offer
            rows.append(
                {
                    "peer_id": lst.provider,
                    "model": offer.name,
                    "input_price": offer.price.input_per_1k,
                    "output_price": offer.price.output_per_1k,
                    "max_context": offer.max_context,
                    "min_charge": offer.price.min_charge,
                    "rate_limit": offer.rate_limit_rpm,
                    "max_concurrent": offer.max_concurrent,
                    "trust": None,  # no trust score is kept yet: unknown, not a made-up number
                    "latency_ms": None,  # nor latency measurements
                    "escrows": list(lst.escrow_agents),
                    "gpus": [{"name": g.name, "memory_total_mb": g.memory_total_mb} for g in lst.hardware.gpus],
                    "addrs": list(lst.addrs),
                    "expires_at": lst.expires_at,
                }
            )
        if sort == "cheapest":
            rows.sort(key=lambda r: (r["input_price"] + r["output_price"], r["peer_id"]))
        elif sort == "fastest":  # unmeasured providers last, then cheapest
            rows.sort(key=lambda r: (r["latency_ms"] is None, r["latency_ms"] or 0, r["input_price"] + r["output_price"]))
        else:
            rows.sort(key=lambda r: (r["trust"] is None, -(r["trust"] or 0), r["input_price"] + r["output_price"]))
        return rows


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


async def _serve_api(service: NodeService, api: str, token: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    config = hypercorn.config.Config()
    config.bind = [api]
    config.accesslog = None
    config.errorlog = logging.getLogger("node.api")
    config.graceful_timeout = 1.0
    await hypercorn.trio.serve(build_app(service, token), config, task_status=task_status)


def _check_loopback_api(api: str) -> None:
    host = api.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"the API listens on loopback only, not {api!r}")


async def run_daemon(
    home: Home,
    identity: Identity,
    *,
    listen: tuple[str, ...] | None = None,
    bootstrap: tuple[str, ...] = (),
    api: str | None = None,
    accept_escrow: tuple[str, ...] = (),
    escrow: bool = False,
    api_key: Callable[[str], str] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the node until cancelled. ``task_status.started`` receives the daemon info.

    Raises:
        ConfigError: a bad config file. ValueError: a bad address. OSError: cannot listen.
    """
    config = load_config(home.config)
    config = dataclasses.replace(
        config,
        listen=tuple(listen) if listen else config.listen,
        bootstrap=tuple(dict.fromkeys(config.bootstrap + tuple(bootstrap))),
        api=api or config.api,
        accept_escrow=tuple(dict.fromkeys(config.accept_escrow + tuple(accept_escrow))),
    )
    _check_loopback_api(config.api)
    for agent_id in config.accept_escrow:
        protocol.public_key_from_peer_id(agent_id)
    market_config = MarketConfig(max_peers_per_subnet=0 if _all_loopback(config.listen) else None)
    capabilities = probe_capabilities()
    token = api_token(home, create=True)
    agent = EscrowAgent(Ledger(home.path / "escrow.db"), identity) if escrow else None
    try:
        async with open_host(identity, config.listen) as host, open_market(host, identity, market_config) as market:
            service = NodeService(home, identity, market, config, capabilities, agent, api_key=api_key)
            try:
                await _serve(service, config, token, task_status)
            finally:
                with trio.CancelScope(shield=True):
                    await service.aclose()
    finally:
        if agent is not None:
            agent.ledger.close()


async def _serve(service: NodeService, config: NodeConfig, token: str, task_status: Any) -> None:
    home, identity, market, host = service.home, service.identity, service.market, service.host
    info_path = daemon_info_path(home)
    service.publish()
    host.set_stream_handler(SESSION_PROTOCOL, service.provider.handle)
    async with trio.open_nursery() as nursery:
        if service.escrow_agent is not None:
            await nursery.start(serve_escrow, host, service.escrow_agent)
        nursery.start_soon(_bootstrap, market, config.bootstrap)
        await nursery.start(service.sessions.serve)
        binds = await nursery.start(_serve_api, service, config.api, token)
        service.api_url = binds[0]
        info = {"peer_id": identity.peer_id, "addrs": peer_addrs(host), "api_url": service.api_url, "pid": os.getpid()}
        write_private(info_path, json.dumps(info, indent=2).encode() + b"\n")
        try:
            task_status.started(info)
            await trio.sleep_forever()
        finally:
            info_path.unlink(missing_ok=True)
            nursery.cancel_scope.cancel()
