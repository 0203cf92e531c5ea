"""The market service: signed listings over the Kademlia DHT (source of truth) and GossipSub
(the fast path), feeding a validated ``MarketView``.

Rules:
- A listing lives in the DHT under ``listing_key(provider)``; our DHT validator accepts
  it only if it decodes strictly, is signed by that provider, is not expired and is small;
  between two records the higher ``seq`` wins. For every model a provider serves it announces
  a provider record under ``model_key(model)``, so a consumer finds providers by model.
- Gossip on ``inferswarm/listings/1`` (1 s heartbeat) with a topic validator that runs the same
  checks and files every refusal in the view's counters; refused messages are not relayed.
- Our own listing is re-signed with a new ``seq`` and republished at half its TTL and on every
  change, at most once per ``publish_interval_s`` (gossip drops bursts silently).
- The subscription is drained continuously (py-libp2p drops on a full buffer).
- Whoever waits for the market waits on ``wait_changed`` (the view's version, a trio.Event
  swapped on each change), never on a polling sleep.
- Hostile peers (docs/DESIGN.md "Resource bounds"): the DHT stores only namespaces with a validator
  (``strict_validation``), the view is capped (``MarketConfig.max_listings`` …) and keeps providers
  with the highest ``keep_score`` (the daemon's trust), and ``lookup`` asks the DHT for three times
  what it returns, merges what the view already holds (first), and drops providers whose listing
  cannot be found, so Sybil provider records cannot push an honest provider out.
- The host's dialer (``_dial``) asks ``fresh_addrs`` for a peer whose known addresses all failed.
- A node with fewer than ``min_peers`` connections looks itself up in the DHT and dials the closest
  peers it learns of (``_neighbour_loop``): nodes join a mesh, not a star around their bootstrap peers.
- When peers we were not connected to join (a healed partition, a restart, a newcomer), our listing
  is republished a couple of heartbeats later (``rejoin_republish_*``): gossip does not replay what a
  peer missed, and a listing that expired in a long partition would otherwise wait for half its TTL.
Every task lives in the nursery of ``open_market``; leaving the block stops them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

import protocol
from protocol import DHT_NAMESPACE, LISTING_TOPIC, Listing
from wallet import Identity

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from ._dial import dialer
from ._host import connection_manager
from ._market_view import MAX_BYTES, MAX_LISTINGS, MAX_PER_MODEL, MarketView

__all__ = ["MarketConfig", "Market", "open_market", "listing_key", "model_key"]

_logger = logging.getLogger(__name__)


# py-libp2p's DHT server ignores FIND_NODE for keys that are neither a multihash nor at most
# 50 bytes, so a lookup of a longer key never leaves the first peer: both keys stay short.


def listing_key(peer_id: str) -> str:
    """The DHT key of a provider's listing (45 bytes): ``/isw/`` + 160 bits of sha256(peer id)."""
    return f"/{DHT_NAMESPACE}/" + hashlib.sha256(b"inferswarm/listing/" + peer_id.encode()).hexdigest()[:40]


def model_key(model: str) -> str:
    """The DHT provider-record key of a model name: a sha256 multihash, hex-encoded."""
    return "1220" + hashlib.sha256(b"inferswarm/model/" + model.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class MarketConfig:
    """Market tuning: gossip heartbeat, listing TTL and republish interval, DHT subnet limits."""

    listing_ttl_s: int = 300
    heartbeat_s: int = 1
    publish_interval_s: float = 0.25
    expire_interval_s: float = 1.0
    routing_interval_s: float = 1.0
    # Kademlia's per-subnet cap (2) is a Sybil defence on the internet; on loopback or one LAN
    # every peer shares a subnet, so tests and local swarms turn it off (0).
    max_peers_per_subnet: int | None = None
    subscribe: bool = True
    # the view's caps (see _market_view): providers in all, per model, encoded bytes
    max_listings: int = MAX_LISTINGS
    max_per_model: int = MAX_PER_MODEL
    max_listing_bytes: int = MAX_BYTES
    # concurrent inbound DHT requests served (py-libp2p: 12, which 12 idle streams used to fill);
    # each read now has a deadline and each peer at most 8 DHT streams (node.net._host)
    dht_inbound_handlers: int = 64
    lookup_timeout_s: float = 15.0
    lookup_fetches: int = 8  # listings fetched from the DHT at once during a lookup
    # a peer (re)joins (a healed partition, a restart, a newcomer): our listing is republished
    # this long after (the gossip mesh forms at the next heartbeats), at most once per ..._every_s
    rejoin_republish_delay_s: float = 2.0
    rejoin_republish_every_s: float = 10.0
    # below this many connections we look ourselves up in the DHT and connect to our neighbourhood:
    # without it every node knows only its bootstrap peers, the swarm is a star and gossip (6-12 mesh
    # peers a node) leaves leaves out; checked every neighbours_every_s (sooner until it first worked)
    min_peers: int = 8
    neighbours_every_s: float = 30.0


class _ListingValidator(Validator):
    """The DHT's view of our namespace: strict decode, provider signature, expiry, size."""

    def __init__(self, clock: WallClock) -> None:
        self._clock = clock

    def validate(self, key: str, value: bytes) -> None:
        listing = protocol.decode_listing(value, int(self._clock()))
        if key != listing_key(listing.provider):
            raise protocol.TermsMismatch(f"listing of {listing.provider} stored under {key}")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, value in enumerate(values):
            try:
                listing = protocol.decode(value, max_size=protocol.MAX_LISTING_BYTES, expect=protocol.LISTING_TYPES)
                protocol.verify(listing, "sig", protocol.public_key_from_peer_id(listing.provider))
            except protocol.ProtocolError:
                continue
            if listing.seq > best_seq:
                best, best_seq = i, listing.seq
        return best


class Market:
    """A node's handle on the market. Create with ``open_market``."""

    def __init__(
        self,
        host: IHost,
        identity: Identity,
        dht: KadDHT,
        pubsub: Pubsub,
        view: MarketView,
        config: MarketConfig,
        clock: WallClock,
    ) -> None:
        self.host = host
        self.identity = identity
        self.dht = dht
        self.pubsub = pubsub
        self.view = view
        self.config = config
        self._clock = clock
        self._own: Listing | None = None  # the template of our listing (unsigned, no times)
        self._published: Listing | None = None
        self._changed = trio.Event()  # our own listing's template changed
        self._view_changed = trio.Event()  # set, then replaced, on every change of the view
        view.watch(self._on_view_change)
        self._dht_wake = trio.Event()
        self._dht_pending: tuple[Listing, bytes] | None = None
        self.published_count = 0
        self.dht_written_seq = 0  # the newest of our listings the DHT holds
        self._started = self._clock()
        self._listed_s = 0.0  # seconds with a listing of ours alive, up to _listed_mark
        self._listed_mark: float | None = None

    def now(self) -> int:
        return int(self._clock())

    def _on_view_change(self) -> None:
        self._view_changed.set()
        self._view_changed = trio.Event()

    async def wait_changed(self, since: int | None = None) -> int:
        """Wait until the view changes: a listing added, replaced or expired.

        Read ``view.version`` before looking at the view and pass it as ``since``: a change that
        lands between the look and the wait then returns at once instead of being missed.

        Args:
            since: the version last seen (default: the current one, i.e. the next change).

        Returns:
            The view's version after the change.

        Cancellation: safe; nothing is consumed, so a cancelled wait loses no change.
        """
        since = self.view.version if since is None else since
        while self.view.version == since:
            await self._view_changed.wait()
        return self.view.version

    @property
    def own_listing(self) -> Listing | None:
        """The listing we last signed and published, if any."""
        return self._published

    def listed_fraction(self) -> float:
        """Share (0..1) of this node's running time during which it had a listing published."""
        now = self._clock()
        listed = self._listed_s + (now - self._listed_mark if self._listed_mark is not None else 0.0)
        return round(listed / max(now - self._started, 1e-9), 4)

    def set_listing(self, listing: Listing | None) -> None:
        """Publish ``listing`` (its seq, times and signature are filled in) soon, and keep it
        fresh; ``None`` or no models withdraws it (it then expires everywhere)."""
        self._own = listing if listing is not None and listing.models else None
        self._changed.set()

    def _sign(self, template: Listing) -> Listing:
        now = self.now()
        prev_seq = self._published.seq if self._published is not None else 0
        seq = max(prev_seq + 1, int(self._clock() * 1000))  # survives restarts: time-based
        listing = dataclasses.replace(
            template,
            provider=self.identity.peer_id,
            seq=seq,
            issued_at=now,
            expires_at=now + self.config.listing_ttl_s,
            sig=b"",
        )
        return protocol.sign(listing, "sig", self.identity)

    async def _publish_once(self, template: Listing) -> None:
        if self._listed_mark is None:
            self._listed_mark = self._clock()
        listing = self._sign(template)
        data = protocol.encode(listing, max_size=protocol.MAX_LISTING_BYTES)
        self._published = listing
        self.view.offer(data, self.now())
        await self.pubsub.publish(LISTING_TOPIC, data)
        self.published_count += 1
        # the DHT write walks the network: it runs beside gossip, never in front of it
        self._dht_pending = (listing, data)
        self._dht_wake.set()

    async def _dht_loop(self) -> None:
        """Write the newest published listing (and its model provider records) to the DHT."""
        while True:
            await self._dht_wake.wait()
            self._dht_wake = trio.Event()
            pending, self._dht_pending = self._dht_pending, None
            if pending is None:
                continue
            listing, data = pending
            with trio.move_on_after(30):
                try:
                    await self.dht.put_value(listing_key(listing.provider), data)
                    for offer in listing.models:
                        await self.dht.provide(model_key(offer.name))
                    self.dht_written_seq = listing.seq
                except Exception as exc:  # a half-built network: the next republish retries
                    _logger.info("DHT publish of listing seq %s incomplete: %s", listing.seq, exc)

    async def _publish_loop(self) -> None:
        while True:
            if self._own is None:
                self._published = None
                if self._listed_mark is not None:
                    self._listed_s += self._clock() - self._listed_mark
                    self._listed_mark = None
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            await self._publish_once(self._own)
            # republish at half the TTL, or sooner on change, but never faster than the pace
            await trio.sleep(self.config.publish_interval_s)
            with trio.move_on_after(max(1.0, self.config.listing_ttl_s / 2 - self.config.publish_interval_s)):
                await self._changed.wait()
            self._changed = trio.Event()

    def _gossip_validator(self, forwarder: ID, msg: object) -> bool:
        return self.view.is_acceptable(getattr(msg, "data", b""), self.now())

    async def _drain_loop(self, subscription: object) -> None:
        async for _ in subscription:  # type: ignore[attr-defined]
            pass  # the topic validator already took each message in

    async def _routing_loop(self) -> None:
        """Fold connected peers into the DHT routing table (py-libp2p does not on its own)."""
        known: set[ID] = set()
        while True:
            for peer in self.host.get_connected_peers():
                if peer not in known:
                    try:
                        if await self.dht.add_peer(peer):
                            known.add(peer)
                    except Exception as exc:  # a peer that went away meanwhile
                        _logger.debug("routing table add of %s failed: %s", peer, exc)
            known &= set(self.host.get_connected_peers())
            await trio.sleep(self.config.routing_interval_s)

    async def _neighbour_loop(self) -> None:
        """Keep at least ``min_peers`` connections: look ourselves up in the DHT (the lookup's queries
        connect to the peers they ask) and dial the closest peers found, at most ``min_peers`` at once."""
        me = self.host.get_id()
        pause = self.config.routing_interval_s * 2
        while True:
            await trio.sleep(pause)
            connected = set(self.host.get_connected_peers()) - {me}
            if not connected or len(connected) >= self.config.min_peers:
                pause = self.config.neighbours_every_s if connected else self.config.routing_interval_s * 2
                continue
            found: list[ID] = []
            with trio.move_on_after(self.config.lookup_timeout_s):
                try:
                    found = await self.dht.peer_routing.find_closest_peers_network(me.to_bytes())
                except Exception as exc:  # a half-built network: try again later
                    _logger.debug("neighbourhood lookup failed: %s", exc)
            wanted = [p for p in found if p != me and p not in self.host.get_connected_peers()]
            wanted = wanted[: max(0, self.config.min_peers - len(connected))]

            async def one(peer: ID) -> None:
                try:
                    await dialer(self.host).dial(peer, deadline=trio.current_time() + 5)
                except Exception as exc:  # gone, or unreachable from here
                    _logger.debug("neighbour %s unreachable: %s", peer, exc)

            async with trio.open_nursery() as nursery:
                for peer in wanted:
                    nursery.start_soon(one, peer)
            pause = self.config.neighbours_every_s

    async def _rejoin_loop(self) -> None:
        """Republish our listing soon after peers we were not connected to appear (see the rules)."""
        connected = set(self.host.get_connected_peers())
        last = -math.inf
        while True:
            await trio.sleep(self.config.routing_interval_s)
            now_connected = set(self.host.get_connected_peers())
            joined, connected = now_connected - connected, now_connected
            if not joined or self._own is None:
                continue
            wait = max(self.config.rejoin_republish_delay_s, last + self.config.rejoin_republish_every_s
                       - trio.current_time())
            await trio.sleep(wait)
            if self._own is not None:
                _logger.debug("%d peer(s) joined: republishing our listing", len(joined))
                last = trio.current_time()
                self._changed.set()

    async def _expire_loop(self) -> None:
        while True:
            self.view.expire(self.now())
            await trio.sleep(self.config.expire_interval_s)

    async def fresh_addrs(self, peer: ID) -> list[multiaddr.Multiaddr]:
        """Addresses of ``peer`` learnt afresh (the dialer's source when all known ones failed): the
        DHT walked towards it (each answer's addresses land in the peerstore) and its listing, as the
        view holds it and as the DHT holds it now (a restarted provider republishes at start)."""

        async def walk() -> None:
            try:
                await self.dht.peer_routing.find_closest_peers_network(peer.to_bytes())
            except Exception as exc:  # a half-built network: the listing may still say
                _logger.debug("DHT walk towards %s failed: %s", peer, exc)

        async def listing() -> None:
            await self.fetch_listing(peer.to_base58())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(walk)
            nursery.start_soon(listing)
        found: list[multiaddr.Multiaddr] = []
        held = self.view.listing(peer.to_base58(), self.now())
        for addr in (held.addrs if held is not None else ()):
            try:
                found.append(multiaddr.Multiaddr(addr))
            except Exception:  # a listing's address that is not a multiaddr: skipped
                continue
        try:
            found += list(self.host.get_peerstore().addrs(peer))
        except Exception:  # still unknown
            pass
        return found

    async def fetch_listing(self, provider: str) -> Listing | None:
        """Read a provider's listing from the DHT into the view."""
        with trio.move_on_after(15):
            try:
                data = await self.dht.get_value(listing_key(provider))
            except Exception as exc:
                _logger.info("DHT get of %s failed: %s", provider, exc)
                return None
            if data is not None:
                self.view.offer(data, self.now())
                return self.view.listing(provider, self.now())
        return None

    async def lookup(self, model: str, count: int = 20) -> list[Listing]:
        """Find up to ``count`` providers of ``model``: the view's listings first (highest
        ``keep_score`` first), then the DHT's provider records, whose listings are fetched.

        The DHT is asked for ``3 * count`` records and duplicates dropped, so Sybil provider records
        cannot crowd out an honest provider; one whose listing cannot be found is left out.

        Returns:
            The valid listings found that offer ``model`` (empty if the DHT lookup timed out and
            the view holds none).
        """
        now = self.now()
        infos: list = []
        with trio.move_on_after(self.config.lookup_timeout_s):
            try:
                infos = await self.dht.find_providers(model_key(model), 3 * count)
            except Exception as exc:  # a half-built network: what the view holds still answers
                _logger.info("DHT provider lookup of %s failed: %s", model, exc)
        known = sorted({row.listing.provider for row in self.view.rows(now, model)},
                       key=lambda p: -self.view.score(p))
        peers = list(dict.fromkeys(known + [info.peer_id.to_base58() for info in infos]))  # dedupe, keep order
        unknown = [p for p in peers if self.view.listing(p, now) is None]
        limiter = trio.CapacityLimiter(self.config.lookup_fetches)

        async def fetch(peer: str) -> None:
            async with limiter:
                await self.fetch_listing(peer)

        with trio.move_on_after(self.config.lookup_timeout_s):
            async with trio.open_nursery() as nursery:
                for peer in unknown:
                    nursery.start_soon(fetch, peer)
        found: list[Listing] = []
        for peer in peers:
            listing = self.view.listing(peer, self.now())
            if listing is not None and any(m.name == model for m in listing.models):
                found.append(listing)
        return found[:count]


@asynccontextmanager
async def open_market(
    host: IHost,
    identity: Identity,
    config: MarketConfig = MarketConfig(),
    view: MarketView | None = None,
    clock: WallClock = SYSTEM_WALL_CLOCK,
    keep_score: Callable[[str], float] | None = None,
) -> AsyncIterator[Market]:
    """Run the DHT, gossip and the market's loops on ``host`` for the duration of the block.

    Args:
        view: the view to fill (default: a new one with ``config``'s caps).
        keep_score: provider peer id -> how much the view should keep its listing when full
            (higher keeps; the daemon passes trust). Our own listing is always kept.
    """
    own = identity.peer_id
    if view is None:
        view = MarketView(config.max_listings, config.max_per_model, config.max_listing_bytes)
    if keep_score is not None:
        view.keep_score = keep_score
    scorer = view.keep_score
    view.keep_score = lambda provider: math.inf if provider == own else scorer(provider)
    dht = KadDHT(host, DHTMode.SERVER, max_peers_per_subnet=config.max_peers_per_subnet, strict_validation=True)
    dht.register_validator(DHT_NAMESPACE, _ListingValidator(clock))
    dht._inbound_limiter = trio.CapacityLimiter(config.dht_inbound_handlers)  # py-libp2p's is 12
    try:
        connection_manager(host).keep_peers(dht.routing_table.peer_in_table)
    except LookupError:  # a host not opened by open_host: no connection manager to tell
        pass
    gossipsub = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=config.heartbeat_s,
        time_to_live=30,
    )
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    market = Market(host, identity, dht, pubsub, view, config, clock)
    dialer(host).add_source(market.fresh_addrs)
    pubsub.set_topic_validator(LISTING_TOPIC, market._gossip_validator, False)
    async with background_trio_service(dht), background_trio_service(pubsub), background_trio_service(gossipsub):
        await pubsub.wait_until_ready()
        async with trio.open_nursery() as nursery:
            if config.subscribe:
                subscription = await pubsub.subscribe(LISTING_TOPIC)
                nursery.start_soon(market._drain_loop, subscription)
            nursery.start_soon(market._publish_loop)
            nursery.start_soon(market._dht_loop)
            nursery.start_soon(market._routing_loop)
            nursery.start_soon(market._rejoin_loop)
            nursery.start_soon(market._neighbour_loop)
            nursery.start_soon(market._expire_loop)
            try:
                yield market
            finally:
                nursery.cancel_scope.cancel()
                dialer(host).sources.remove(market.fresh_addrs)
