"""The composition root: ``open_node`` builds every part of a running node, wires them, runs
their background tasks for the duration of a block, and yields ``Node`` — a frozen record of
the parts. The daemon, the demo and the library (``open_swarm``) all build on it.

Who gets what (nothing else is shared):

    net        host, market                           (no other role)
    escrow     EscrowClient -> EscrowOps; the agent role when asked
    provider   Admission -> Storefront (offers, backends, listing) -> HealthMonitor, ProviderService
    consumer   TrustBook, Renter (market, escrow, receipts, trust), HeldSessions
    verify     SpotChecker (trust, evidence book, its own backends), the evidence topic (market);
               hooked into the renter, which offers it every settled call
    shared     ReceiptStore (both sides' receipts), the config, the home

The HTTP faces (``node.api``) are not built here: the daemon serves them over a ``Node``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import multiaddr
import trio

import protocol
from protocol import RECEIPT_PROTOCOL, SESSION_PROTOCOL
from wallet import EscrowAgent, Identity, Ledger

from ._clock import SYSTEM_WALL_CLOCK, WallClock
from ._config import NodeConfig, check_announce_addr, load_config, save_offers
from ._errors import InvalidRequest, NotFound
from ._home import Home, hold_home, private_file
from ._receipts import ReceiptStore
from .chain import ChainLink, open_chain_link, parse_chain_spec
from .consumer import HeldSessions, Preferences, ProviderRow, Renter, TrustBook, rank
from .consumer._delivery import ReceiptDelivery, attach
from .escrow import EscrowClient, EscrowOps, serve_escrow
from .insight import OfferedModel
from .insight._service import Insight, open_insight
from .net import (
    AddressBook,
    Market,
    MarketConfig,
    PeerInfo,
    Relay,
    RelayClient,
    RelayLimits,
    autonat_server,
    connection_manager,
    keep_alive,
    open_host,
    open_market,
    parse_peer_addr,
    peer_addrs,
    serve_relay,
)
from .provider import HealthMonitor, Offer, ProviderService, SlaTracker, probe_capabilities
from .provider._admission import Admission
from .provider._receipt_intake import ReceiptIntake
from .provider._storefront import OfferUnloadable, Storefront
from .provider.backends import Backend, open_backend
from .reputation import Reputation, blend, open_reputation
from .verify._service import Verification, checked_call, evidence_json, open_verification

__all__ = ["Node", "ApiBinding", "open_node", "resolve_config"]

_logger = logging.getLogger(__name__)


def _all_loopback(addrs: tuple[str, ...]) -> bool:
    try:
        hosts = [multiaddr.Multiaddr(a).value_for_protocol("ip4") for a in addrs]
        return bool(hosts) and all(h is not None and ipaddress.ip_address(h).is_loopback for h in hosts)
    except Exception:
        return False


@dataclasses.dataclass
class ApiBinding:
    """Where the node's HTTP API listens, once the daemon has bound it ("" before, or without one)."""

    url: str = ""


@dataclasses.dataclass(frozen=True)
class Node:
    """A running node: its parts, and the questions the API, the CLI and the library ask of them."""

    home: Home
    identity: Identity
    config: NodeConfig
    capabilities: dict[str, Any]
    market: Market
    storefront: Storefront
    health: HealthMonitor
    provider: ProviderService
    escrow: EscrowOps
    escrow_agent: EscrowAgent | None
    receipts: ReceiptStore
    trust: TrustBook
    renter: Renter
    sessions: HeldSessions
    started_at: float  # seconds since the epoch, by wall_clock
    wall_clock: WallClock
    addresses: AddressBook
    relay_client: RelayClient
    api: ApiBinding = dataclasses.field(default_factory=ApiBinding)
    relay: list[Relay] = dataclasses.field(default_factory=list)  # the relay role, once started (--relay)
    verification: Verification | None = None  # spot checks and evidence (node/verify)
    reputation: Reputation | None = None  # attestations and network trust (node/reputation)
    insight: Insight | None = None  # market observations, figures and advice (node/insight)
    chain: ChainLink | None = None  # the chain of [node] chain (node/chain): x402 payments are settled on it

    @property
    def host(self) -> Any:
        return self.market.host

    @property
    def api_url(self) -> str:
        return self.api.url

    # ---- the provider's storefront, for the control API --------------------------------------

    def offers(self) -> list[Offer]:
        return self.storefront.offers()

    async def add_offer(self, fields: dict[str, Any]) -> Offer:
        """Add or replace the offer for a model once its model is loaded and benchmarked; then
        persisted and republished at once. Replacing an offer's backend swaps the model every
        session of it serves from its next call on.

        Raises:
            ValueError, TypeError: a missing or invalid field, or already ``MAX_OFFERS`` models.
            InvalidRequest: (field ``backend``) the backend names something that cannot serve: no
                such folder or file, no such key, files that are not a model.
            BackendError: the backend's upstream server cannot be reached or fails.
            Nothing is changed (offers, config file, listing) when any of these is raised.
        """
        offer = Offer(**fields)
        try:
            return await self.storefront.add_offer(offer)
        except OfferUnloadable as exc:
            if exc.upstream:
                raise
            raise InvalidRequest(str(exc), field="backend") from exc

    def remove_offer(self, model: str) -> bool:
        return self.storefront.remove_offer(model)

    def publish(self) -> None:
        self.storefront.publish()

    # ---- what the node knows ------------------------------------------------------------------

    def uptime_s(self) -> int:
        """Seconds since the node started (by the wall clock: reports read it from worker threads,
        where trio's clock cannot be read)."""
        return max(0, int(self.wall_clock() - self.started_at))

    def status(self) -> dict[str, Any]:
        now = self.market.now()
        store = self.storefront
        return {
            "peer_id": self.identity.peer_id,
            "addrs": peer_addrs(self.host),
            "reach": self.reach(),
            "api_url": self.api.url,
            "connected_peers": len(self.host.get_connected_peers()),
            "listings_known": len(self.market.view.listings(now)),
            "offers": len(store.offers()),
            "uptime_s": self.uptime_s(),
            "escrow_agent": self.escrow_agent is not None,
            "available": store.available(),
            "unhealthy": dict(store.unhealthy),
            "capabilities": self.capabilities,
            "models": {o.model: {"healthy": store.healthy(o.model),
                                 **(dataclasses.asdict(store.benchmarks[o.model]) if o.model in store.benchmarks
                                    else {})}
                       for o in store.offers()},
            "verification": self.verification.status() if self.verification is not None else None,
            "reputation": self.reputation.status() if self.reputation is not None else None,
            "insight": self.insight.status() if self.insight is not None else None,
        }

    def evidence(self, provider: str | None = None) -> list[dict[str, Any]]:
        """The evidence bundles this node holds (against ``provider``, or all), newest first."""
        if self.verification is None:
            return []
        book = self.verification.evidence
        providers = [provider] if provider is not None else sorted(book.counts())
        return [evidence_json(e, confirmed) for p in providers for e, confirmed in book.against(p)]

    async def market_figures(self, model: str, hours: int) -> dict[str, Any]:
        """``node market --model M``: the market's prices, trend, completion and demand over ``hours``."""
        if self.insight is None:
            raise NotFound("this node keeps no market data")
        return (await self.insight.market(model, hours)).to_json()

    async def advice(self, hours: int) -> dict[str, Any]:
        """``node advise``: this node's offers against the market over ``hours``."""
        if self.insight is None:
            raise NotFound("this node keeps no market data")
        return (await self.insight.advise(hours)).to_json()

    def reach(self) -> dict[str, Any]:
        """How peers reach this node: reachability (AutoNAT), the addresses published and where each
        comes from, the relays it holds reservations on, and the relay role's counters when it runs one."""
        doc = self.addresses.status()
        doc["relays_held"] = [str(r) for r in self.relay_client.held]
        doc["relay_role"] = None
        if self.relay:
            relay = self.relay[0]
            relay.holds(self.host.get_id())  # drops expired reservations first
            doc["relay_role"] = {"reservations": len(relay.reservations), "circuits": relay.open_circuits,
                                 "refused": dict(relay.refused), "cut": relay.cut}
        return doc

    def market_stats(self) -> dict[str, Any]:
        return {**self.market.view.stats(), "published": self.market.published_count}

    async def providers(self, model: str | None, sort: str, *, ask_dht: bool = True) -> list[ProviderRow]:
        """The market's providers (of ``model``, or all), ordered by ``sort``; with ``model`` (and
        ``ask_dht``) the DHT is asked too. Every listed provider is shown, whatever its trust."""
        if model is not None and ask_dht:
            await self.market.lookup(model)
        now = self.market.now()
        rows = [(r.listing, r.offer) for r in self.market.view.rows(now, model)]
        ranked = rank(rows, Preferences(sort=sort, trust_floor=-1.0, explore=0.0), prompt_tokens=1000,
                      max_tokens=1000, stats=self.trust.get, agent_for=lambda lst: "")
        return [ProviderRow(c) for c in ranked]


async def _observe_uptime(node: Node, interval_s: float = 30.0) -> None:
    """Credit providers whose listings stay alive (trust's uptime term)."""
    while True:
        now = node.market.now()
        alive = [lst.provider for lst in node.market.view.listings(now) if lst.provider != node.identity.peer_id]
        await trio.to_thread.run_sync(node.trust.observe_alive, alive, now)
        await trio.sleep(interval_s)


#: a lost bootstrap peer is redialled after 0.5 s, backing off to this (a healed partition, a
#: restarted peer: found again within it)
BOOTSTRAP_BACKOFF_MAX_S = 15.0
#: how often a connected bootstrap peer's connection is checked
BOOTSTRAP_CHECK_S = 1.0


async def _bootstrap(market: Market, addrs: tuple[str, ...]) -> None:
    """Keep a connection to each bootstrap peer for the node's whole life: dial until connected
    (backing off to ``BOOTSTRAP_BACKOFF_MAX_S`` between attempts), and dial again whenever the
    connection is lost (a partition, the peer restarted), so a node never stays cut off from the
    network it joined through."""

    async def one(addr: str) -> None:
        info = parse_peer_addr(addr)
        connection_manager(market.host).protect(info.peer_id)  # never pruned as idle
        delay, was_connected = 0.5, False
        while True:
            if info.peer_id in market.host.get_connected_peers():
                if not was_connected:
                    _logger.info("connected to bootstrap peer %s", addr)
                was_connected, delay = True, 0.5
                await trio.sleep(BOOTSTRAP_CHECK_S)
                continue
            if was_connected:
                _logger.info("lost bootstrap peer %s; redialling", addr)
                was_connected = False
            try:
                with trio.fail_after(10):
                    await market.host.connect(info)
                continue
            except Exception as exc:  # unreachable for now: keep trying, quietly
                _logger.info("bootstrap peer %s unreachable (%s); retrying in %.1fs", addr, exc, delay)
            await trio.sleep(delay)
            delay = min(BOOTSTRAP_BACKOFF_MAX_S, delay * 2)

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
                   api: str | None = None, accept_escrow: tuple[str, ...] = (), announce: tuple[str, ...] = (),
                   relay: bool = False, chain: str | None = None, x402: bool = False) -> NodeConfig:
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
        announce=tuple(dict.fromkeys(tuple(check_announce_addr(a) for a in announce) + config.announce)),
        relay=relay or config.relay,
        chain=chain or config.chain,
        x402=x402 or config.x402,
    )
    if chain:
        parse_chain_spec(chain)  # ValueError, saying what a chain is
    if config.x402 and not config.chain:
        raise ValueError("--x402 takes payments on a chain: name one with --chain (evm:embedded, or evm:URL#ESCROW)")
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
    wall_clock: WallClock = SYSTEM_WALL_CLOCK,
) -> AsyncIterator[Node]:
    """Run a node (without its HTTP API) for the duration of the block.

    Args:
        escrow: also run the escrow agent role (its ledger is ``HOME/escrow.db``).
        api_key: reads an upstream API key from the keystore by name (``openai:`` backends).
        models_dir: where ``builtin`` builds its model (default: the home).
        mdns: also find (and join) peers on the local network without bootstrap addresses.
        wall_clock: seconds since the epoch, for expiries, receipts and schedules (every part of
            the node reads this one; durations read trio's clock).

    Raises:
        HomeInUse: another process runs a node on ``home`` (its ``node.lock``, held for the
            block's whole life, before any database of the home is opened).
    """
    with hold_home(home):
        async with _run_node(home, identity, config, escrow=escrow, api_key=api_key, models_dir=models_dir,
                             mdns=mdns, wall_clock=wall_clock) as node:
            yield node


def _trusted_agents(config: NodeConfig, agent: EscrowAgent | None) -> list[str]:
    """The agents whose settlements make attestations count here: this node's own and the ones its
    operator accepted (``node escrow accept``). Not the agents it merely paid through: a provider
    names those, and one that runs its own agent could sign settlements for its Sybils."""
    return ([agent.identity.peer_id] if agent is not None else []) + list(config.accept_escrow)


def _offered(offers: list[Offer]) -> list[OfferedModel]:
    return [OfferedModel(o.model, o.input_price, o.output_price, o.max_concurrent) for o in offers]


def _session_ended(reputation: Reputation, insight: Insight) -> Callable[[Any], None]:
    def ended(report: Any) -> None:
        reputation.report(report)
        insight.failed(report.offer.name, report.failures)
    return ended


def _network_blend(reputation: Reputation) -> Callable[[Any], tuple[float, float, int]]:
    def routed(local: Any) -> tuple[float, float, int]:
        view = reputation.view(local.peer_id)
        return blend(local.score, local.calls, view, local.violator), view.score, view.weight
    return routed


def _spot_check(verification: Verification) -> Callable[[Any, Any, Any], None]:
    """The renter's hook: every settled call goes to the spot checker (which samples)."""

    def offer(listing: Any, offer: Any, result: Any) -> None:
        call = checked_call(listing, offer, result)
        if call is not None:
            verification.checker.offer(call)

    return offer


@asynccontextmanager
async def _open_network(home: Home, identity: Identity, config: NodeConfig, mdns: bool, market_config: MarketConfig,
                        wall_clock: WallClock, trust: TrustBook, relay_addrs: Callable[[], list[str]],
                        ) -> AsyncIterator[tuple[Any, AddressBook, Market]]:
    """The host, its address book and AutoNAT server, and the market on it. The book is installed
    before any peer is dialled or identified, so identify tells peers only dialable addresses from
    the first connection on (and advertises AutoNAT)."""
    async with open_host(identity, config.listen, mdns, peer_cache=home.path / "peers.json") as host:
        autonat_server(host)
        addresses = AddressBook(host, announce=config.announce, relay_addrs=relay_addrs)
        async with open_market(host, identity, market_config, clock=wall_clock,
                               keep_score=lambda peer: trust.get(peer).score) as market:
            yield host, addresses, market


@asynccontextmanager
async def _run_node(home: Home, identity: Identity, config: NodeConfig, *, escrow: bool,
                    api_key: Callable[[str], str] | None, models_dir: Path | None, mdns: bool,
                    wall_clock: WallClock) -> AsyncIterator[Node]:
    """``open_node``'s body, under the home's lock."""
    market_config = MarketConfig(max_peers_per_subnet=0 if _all_loopback(config.listen) else None)
    capabilities = probe_capabilities()
    agent = EscrowAgent(Ledger(private_file(home.path / "escrow.db")), identity) if escrow else None
    models = models_dir or home.path

    async def start_backend(offer: Offer) -> Backend:
        return await open_backend(offer.backend, models, offer.model, api_key, offer.features)

    # before the network: a chain that cannot be reached stops the start with one line
    chain = await open_chain_link(parse_chain_spec(config.chain), identity) if config.chain else None
    trust = TrustBook(home.path / "trust.db")  # also what a full market view keeps listings by
    relay_clients: list[RelayClient] = []  # the relay client, once the DHT it asks exists
    try:
        async with _open_network(home, identity, config, mdns, market_config, wall_clock, trust,
                                 relay_addrs=lambda: relay_clients[0].circuit_addrs() if relay_clients else []) \
                as (host, addresses, market):
            receipts = ReceiptStore(home.path / "receipts.db", wall_clock)
            delivery = ReceiptDelivery(home.path / "receipts.db", wall_clock)  # receipts in doubt, resent
            attach(receipts, delivery)
            client = EscrowClient(host, agent, market.dht, wall_clock)
            escrow_ops = EscrowOps(identity, client, wall_clock)
            storefront = Storefront(
                identity, config.offers, start_backend, Admission(),
                accept_escrow=config.accept_escrow, own_agent=identity.peer_id if agent is not None else None,
                schedule=config.schedule, dynamic_pricing=config.dynamic_pricing, contracts=config.contracts,
                capabilities=capabilities, market=market, persist=lambda offers: save_offers(home.config, offers),
                wall_clock=wall_clock)
            health = HealthMonitor(config.health, storefront)
            provider = ProviderService(identity, storefront, client, receipts, health=health,
                                       sla=SlaTracker(config.sla, market.listed_fraction), wall_clock=wall_clock,
                                       claim_margin_s=config.claim_margin_s)
            renter = Renter(market, escrow_ops, agent, receipts, trust, clock=wall_clock,
                            contracts=config.client_contracts)
            renter.standing.idle_s = config.standing_idle_s
            relay_client = RelayClient(host, dht=market.dht, own_addrs=addresses.published)
            relay_clients.append(relay_client)
            try:
                async with open_verification(identity, config.spot_checks, home.path, trust=trust,
                                             wall_clock=wall_clock, market=market,
                                             open_backend=lambda spec: open_backend(spec, models, api_key=api_key)
                                             ) as verification, \
                        open_reputation(identity, home.path, market=market, escrow=escrow_ops, wall_clock=wall_clock,
                                        trusted_agents=lambda: _trusted_agents(config, agent)) as reputation, \
                        open_insight(identity, home.path, receipts=receipts, market=market, wall_clock=wall_clock,
                                     turned_away=lambda: provider.turned_away,
                                     offers=lambda: _offered(storefront.offers()),
                                     has_history=reputation.book.has_history) as insight, \
                        trio.open_nursery() as nursery:
                    renter.on_settled = _spot_check(verification)
                    renter.on_session_end = _session_ended(reputation, insight)
                    trust.network = _network_blend(reputation)
                    node = Node(home=home, identity=identity, config=config, capabilities=capabilities,
                                market=market, storefront=storefront, health=health, provider=provider,
                                escrow=escrow_ops, escrow_agent=agent, receipts=receipts, trust=trust,
                                renter=renter, sessions=HeldSessions(renter), started_at=wall_clock(),
                                wall_clock=wall_clock, addresses=addresses, relay_client=relay_client,
                                verification=verification, reputation=reputation, insight=insight, chain=chain)
                    if agent is not None:
                        await nursery.start(serve_escrow, host, agent, wall_clock)
                    await nursery.start(provider.serve_settlement)
                    host.set_stream_handler(SESSION_PROTOCOL, provider.handle)
                    host.set_stream_handler(RECEIPT_PROTOCOL, ReceiptIntake(provider).handle)
                    await nursery.start(delivery.serve, host)
                    await nursery.start(node.sessions.serve)
                    await nursery.start(renter.standing.serve)
                    if config.relay:
                        node.relay.append(await nursery.start(
                            lambda task_status: serve_relay(host, RelayLimits(), dht=market.dht, task_status=task_status)))
                    await nursery.start(relay_client.run, addresses.need_relay)
                    addresses.on_change(lambda _addrs: storefront.publish())  # the listing names them
                    await nursery.start(addresses.run)
                    nursery.start_soon(_bootstrap, market, config.bootstrap)
                    nursery.start_soon(keep_alive, host)
                    nursery.start_soon(_observe_uptime, node)
                    nursery.start_soon(storefront.watch_schedule)
                    nursery.start_soon(health.run)
                    nursery.start_soon(storefront.adjust_prices)
                    nursery.start_soon(storefront.warm, health.check_once)
                    if mdns:
                        nursery.start_soon(_join_discovered, host)
                    storefront.publish()
                    try:
                        yield node
                    finally:
                        provider.stop_settling()
                        nursery.cancel_scope.cancel()
            finally:
                trust.network = None  # the reputation book is closed with its block
                with trio.CancelScope(shield=True):
                    await storefront.aclose()
                    delivery.close()
                    receipts.close()
    finally:
        trust.close()
        if agent is not None:
            agent.ledger.close()
