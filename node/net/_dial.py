"""Dialling a known peer so that its restart costs seconds, not minutes; and a peer cache so a
restarted node finds the network again (and the network learns its new address).

py-libp2p 0.8.1's ``Swarm.dial_peer`` has four traps for a peer that restarted:
- a peer all of whose addresses failed is refused without a dial for 60 s (its negative cache);
- it dials only the first TCP address the peerstore holds (one per transport class), which after a
  restart on a new port is the dead old one, for as long as the peerstore keeps it;
- it retries each address three times with backoff (0.7 s on a refused port) before trying another;
- ``KadDHT.find_peer`` answers from the local routing table and peerstore first: the stale address.

``dial`` avoids all four: it lifts the negative cache, dials every known address itself (one attempt
each, a new one every 250 ms or on failure, the caller's explicit ones first), and when all fail asks
the address sources (the market registers the DHT's network walk and the gossiped listing's ``addrs``)
for fresh ones, backing off 0.1 s → 1 s between rounds until the caller's deadline. The address that
worked goes first in the peerstore, so libp2p's own dials (``new_stream``, the DHT) use it too. One
dial per peer at a time: concurrent callers wait for it and share its connection.

Every failure is a ``DialFailed`` whose message names the cause: the exception's type and text,
down to the root (``ConnectionRefusedError: …``), never an empty string (``describe``).

``PeerCache`` (``open_host(peer_cache=…)``): the connected peers' addresses are saved in the home
(at most ``PEER_CACHE_MAX`` peers, ``PEER_CACHE_ADDRS`` addresses each) whenever they changed,
checked once a second (connected peers first, then the others it knew); at start every saved peer is dialled once. A node
restarted on a new port (an escrow agent nobody could find) so reconnects to the peers it knew,
and pushes identify to each (py-libp2p does not re-identify a peer whose protocols it cached, so
they would keep only the old address): each learns the new one, and the DHT answers others with it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.identity.identify_push.identify_push import push_identify_to_peer
from libp2p.peer.id import ID

__all__ = ["DialFailed", "Dialer", "dialer", "dial", "describe", "PeerCache", "PEER_CACHE_MAX", "PEER_CACHE_ADDRS"]

_logger = logging.getLogger(__name__)

#: a source of fresh addresses for a peer (the DHT, the market's listing); called when all known fail
AddrSource = Callable[[ID], Awaitable[Sequence[multiaddr.Multiaddr]]]

STAGGER_S = 0.25  # the next address is tried after this long, or as soon as the previous one failed
MAX_ADDRS = 16  # addresses tried per round (a hostile listing or DHT answer can name many)
SOURCE_TIMEOUT_S = 5.0  # the most one source may take (bounded by the caller's deadline too)
ROUND_BACKOFF_S = (0.1, 0.25, 0.5, 1.0)  # pauses between rounds (the peer may be restarting right now)
PEER_CACHE_MAX = 64
PEER_CACHE_ADDRS = 4
_REMEMBERED_FAILURES = 1024


class DialFailed(Exception):
    """A peer could not be connected to; the message names the cause. Callers translate it into
    their own error (``ProviderFailed``, ``EscrowUnreachable``)."""


def describe(exc: BaseException) -> str:
    """``exc`` as ``Type: text``, followed by its root cause's (``← Type: text``); never empty.

    A libp2p dial error is a ``SwarmException`` from a ``MultiError`` from an ``OpenConnectionError``
    from the ``OSError`` that says what happened: each level is named once, texts that repeat dropped.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 6:
        seen.add(id(current))
        text = str(current).strip()
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        nested = getattr(current, "exceptions", None)  # MultiError / ExceptionGroup: the first one
        current = current.__cause__ or current.__context__ or (nested[0] if nested else None)
    if len(parts) > 2:
        parts = [parts[0], parts[-1]]
    return " ← ".join(dict.fromkeys(parts))


def _addrs_of(host: IHost, peer: ID) -> list[multiaddr.Multiaddr]:
    """The peerstore's addresses of ``peer``, without their /p2p/ part (identify adds it, dials don't)."""
    try:
        return [_without_peer(a) for a in host.get_peerstore().addrs(peer)]
    except Exception:  # PeerStoreError: unknown or expired
        return []


def _dialable(addr: multiaddr.Multiaddr) -> bool:
    """A TCP address, direct or through a relay (``…/p2p/RELAY/p2p-circuit``)."""
    protocols = {p.name for p in addr.protocols()}
    if "p2p-circuit" in protocols:
        return str(addr).endswith("/p2p-circuit") and "/p2p/" in str(addr) and "tcp" in protocols
    return "tcp" in protocols and not protocols & {"ws", "wss", "quic", "quic-v1"}


def _is_circuit(addr: multiaddr.Multiaddr) -> bool:
    return "/p2p-circuit" in str(addr)


def _without_peer(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """``addr`` without its final /p2p/<peer> part; a circuit address keeps its relay's
    (``…/p2p/RELAY/p2p-circuit/p2p/PEER`` -> ``…/p2p/RELAY/p2p-circuit``)."""
    text = str(addr)
    if "/p2p-circuit" in text:
        head, _, _ = text.partition("/p2p-circuit")
        return multiaddr.Multiaddr(head + "/p2p-circuit")
    return multiaddr.Multiaddr(text.split("/p2p/")[0]) if "/p2p/" in text else addr


def _direct_first(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    return [a for a in addrs if not _is_circuit(a)] + [a for a in addrs if _is_circuit(a)]


class Dialer:
    """One host's dialler: per-peer dial locks, address sources, the last failure of each peer."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self.sources: list[AddrSource] = []
        self._locks: dict[ID, trio.Lock] = {}
        self._waiting: dict[ID, int] = {}
        self.last_failure: OrderedDict[str, str] = OrderedDict()

    def add_source(self, source: AddrSource) -> None:
        """Ask ``source`` for fresh addresses of a peer whose known ones all failed."""
        self.sources.append(source)

    def _connected(self, peer: ID) -> bool:
        return any(not getattr(c, "is_closed", False) for c in self.host.get_network().get_connections(peer))

    def _remember(self, peer: ID, cause: str) -> None:
        key = str(peer)
        self.last_failure.pop(key, None)
        self.last_failure[key] = cause
        while len(self.last_failure) > _REMEMBERED_FAILURES:
            self.last_failure.popitem(last=False)

    async def dial(self, peer: ID, addrs: Sequence[multiaddr.Multiaddr] = (), *, deadline: float) -> None:
        """Connect to ``peer`` (if not connected) before ``deadline`` (``trio.current_time()`` based):
        ``addrs`` first, then what the peerstore holds, then fresh addresses from the sources,
        round after round.

        Raises:
            DialFailed: not connected by the deadline; names the last cause.

        Cancellation: safe; a dial cancelled half-way leaves no connection behind it.
        """
        if self._connected(peer):
            return
        lock = self._locks.setdefault(peer, trio.Lock())
        self._waiting[peer] = self._waiting.get(peer, 0) + 1
        try:
            with trio.move_on_after(max(0.0, deadline - trio.current_time())):
                async with lock:
                    if self._connected(peer):
                        return
                    await self._dial_locked(peer, [_without_peer(a) for a in addrs], deadline)
                    return
            cause = self.last_failure.get(str(peer), "another dial of it was still in progress")
            raise DialFailed(f"not connected within the deadline: {cause}")
        finally:
            self._waiting[peer] -= 1
            if not self._waiting[peer]:
                del self._waiting[peer]
                self._locks.pop(peer, None)

    async def _dial_locked(self, peer: ID, explicit: list[multiaddr.Multiaddr], deadline: float) -> None:
        unblock = getattr(self.host.get_network(), "unblock_peer", lambda _peer: None)
        tried: set[str] = set()
        causes: list[str] = []
        rounds = 0
        while True:
            unblock(peer)  # py-libp2p's 60 s negative cache: this dialler decides when to try again
            known = [a for a in dict.fromkeys(explicit + _addrs_of(self.host, peer)) if _dialable(a)]
            todo = [a for a in known if str(a) not in tried]
            if not todo:  # every known address failed: ask the sources for fresh ones
                found = [a for a in dict.fromkeys(await self._fresh(peer, deadline)) if _dialable(a)]
                todo = [a for a in found if str(a) not in tried]
                if not todo:  # nothing new: the peer may be coming back where it was, try all again
                    rounds += 1
                    pause = ROUND_BACKOFF_S[min(rounds - 1, len(ROUND_BACKOFF_S) - 1)]
                    cause = causes[-1] if causes else "no known address (peerstore, DHT and listing hold none)"
                    self._remember(peer, cause)
                    if trio.current_time() + pause >= deadline:
                        raise DialFailed(f"{len(tried)} address(es) tried, {rounds} round(s); last: {cause}")
                    await trio.sleep(pause)
                    tried.clear()
                    continue
            todo = _direct_first(todo)[:MAX_ADDRS]
            won = await self._race(peer, todo, deadline, causes)
            tried.update(str(a) for a in todo)
            if won is not None:
                self._prefer(peer, won, known)
                unblock(peer)
                self.last_failure.pop(str(peer), None)
                return
            self._remember(peer, causes[-1])
            if trio.current_time() >= deadline:
                raise DialFailed(f"{len(tried)} address(es) tried; last: {causes[-1]}")

    async def _fresh(self, peer: ID, deadline: float) -> list[multiaddr.Multiaddr]:
        """Every source's addresses for ``peer``, asked at once, each bounded in time."""
        found: list[multiaddr.Multiaddr] = []
        if not self.sources:
            return found

        async def ask(source: AddrSource) -> None:
            with trio.move_on_after(max(0.0, min(SOURCE_TIMEOUT_S, deadline - trio.current_time() - 0.05))):
                try:
                    found.extend(list(await source(peer))[:MAX_ADDRS])
                except Exception as exc:  # a source that cannot answer now
                    _logger.debug("address source for %s failed: %s", peer, describe(exc))

        async with trio.open_nursery() as nursery:
            for source in self.sources:
                nursery.start_soon(ask, source)
        return [_without_peer(a) for a in found]

    async def _race(self, peer: ID, addrs: list[multiaddr.Multiaddr], deadline: float,
                    causes: list[str]) -> multiaddr.Multiaddr | None:
        """Dial ``addrs`` (one attempt each, staggered); the first connection wins, the others are
        cancelled (and any that also connected closed)."""
        network = self.host.get_network()
        once = getattr(network, "_dial_addr_single_attempt", None) or network.dial_addr
        limiter = getattr(network, "_global_dial_limiter", None) or trio.CapacityLimiter(MAX_ADDRS)
        won: list[multiaddr.Multiaddr] = []
        extra: list[object] = []

        async def attempt(addr: multiaddr.Multiaddr, failed: trio.Event, scope: trio.CancelScope) -> None:
            try:
                if _is_circuit(addr):  # through a relay (its own dial of the relay takes the limiter)
                    from ._relay import dial_circuit
                    conn = await dial_circuit(self.host, addr, peer, deadline=deadline)
                else:
                    async with limiter:  # py-libp2p's bound on dials in flight (32), which its own dials keep
                        conn = await once(addr, peer)
            except Exception as exc:
                causes.append(f"{addr}: {describe(exc)}")
                failed.set()
                return
            if won:
                extra.append(conn)
            else:
                won.append(addr)
                scope.cancel()

        with trio.move_on_after(max(0.0, deadline - trio.current_time())) as timeout:
            async with trio.open_nursery() as nursery:
                for addr in addrs:
                    failed = trio.Event()
                    nursery.start_soon(attempt, addr, failed, nursery.cancel_scope)
                    with trio.move_on_after(STAGGER_S):
                        await failed.wait()
        if timeout.cancelled_caught and not won:
            causes.append(f"no connection within the deadline ({len(addrs)} address(es) still dialling: "
                          f"{', '.join(str(a) for a in addrs[:3])})")
        for conn in extra:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await conn.close()  # type: ignore[attr-defined]
                except Exception:  # already going
                    pass
        return won[0] if won else None

    async def dial_direct(self, peer: ID, addrs: Sequence[multiaddr.Multiaddr], *, deadline: float) -> None:
        """A direct connection to ``peer`` through ``addrs`` even if a relayed one exists (DCUtR).

        Raises:
            DialFailed: none connected by the deadline; names the last cause.
        """
        todo = [a for a in dict.fromkeys(_without_peer(a) for a in addrs) if _dialable(a) and not _is_circuit(a)]
        if not todo:
            raise DialFailed("no direct address to dial")
        getattr(self.host.get_network(), "unblock_peer", lambda _peer: None)(peer)
        causes: list[str] = []
        won = await self._race(peer, todo[:MAX_ADDRS], deadline, causes)
        if won is None:
            raise DialFailed(f"{len(todo)} direct address(es) tried; last: {causes[-1] if causes else '?'}")
        self._prefer(peer, won, _addrs_of(self.host, peer))

    def _prefer(self, peer: ID, good: multiaddr.Multiaddr, known: list[multiaddr.Multiaddr]) -> None:
        """The address that worked first in the peerstore (libp2p dials only the first TCP one);
        a circuit address never goes first (libp2p's own dials would try it as plain TCP)."""
        if _is_circuit(good):
            return
        store = self.host.get_peerstore()
        rest = [a for a in known if str(a) != str(good)][:PEER_CACHE_ADDRS]
        try:
            store.clear_addrs(peer)
            store.add_addrs(peer, [good, *rest], 3600)
        except Exception as exc:  # a peerstore at its limit: the connection still stands
            _logger.debug("could not reorder %s's addresses: %s", peer, exc)


def dialer(host: IHost) -> Dialer:
    """The host's dialer (made on first use)."""
    found = host.__dict__.get("_isw_dialer")
    if found is None:
        found = host.__dict__["_isw_dialer"] = Dialer(host)
    return found


async def dial(host: IHost, peer: ID, addrs: Sequence[multiaddr.Multiaddr | str] = (), *,
               timeout_s: float) -> None:
    """``dialer(host).dial`` within ``timeout_s`` from now; ``addrs`` may be strings.

    Raises:
        DialFailed: not connected in time, or an address that is not a multiaddr; names the cause.
    """
    try:
        parsed = [multiaddr.Multiaddr(a) if isinstance(a, str) else a for a in addrs]
    except Exception as exc:  # multiaddr raises several unrelated types
        raise DialFailed(f"a bad address: {describe(exc)}") from exc
    await dialer(host).dial(peer, parsed, deadline=trio.current_time() + timeout_s)


class PeerCache:
    """The peers this node was connected to, saved in ``path`` (JSON, 0600), dialled at start."""

    def __init__(self, host: IHost, path: Path) -> None:
        self.host = host
        self.path = path
        self.saved: dict[str, list[str]] = {}

    def load(self) -> dict[str, list[str]]:
        """The saved peers (an unreadable or malformed file is an empty cache)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        peers = {}
        for peer, addrs in list(data.items())[:PEER_CACHE_MAX]:
            if isinstance(peer, str) and isinstance(addrs, list):
                peers[peer] = [a for a in addrs if isinstance(a, str)][:PEER_CACHE_ADDRS]
        return peers

    def snapshot(self) -> dict[str, list[str]]:
        """The connected peers' dialable addresses (what identify said they listen on, or what we
        dialled), at most ``PEER_CACHE_MAX`` peers and ``PEER_CACHE_ADDRS`` addresses each."""
        me = self.host.get_id()
        peers = {}
        for peer in [p for p in self.host.get_connected_peers() if p != me][:PEER_CACHE_MAX]:
            addrs = [str(a) for a in _addrs_of(self.host, peer) if _dialable(a)][:PEER_CACHE_ADDRS]
            if addrs:
                peers[peer.to_base58()] = addrs
        return peers

    def write(self, peers: dict[str, list[str]]) -> None:
        """Replace the file with ``peers`` (atomically, mode 0600).

        Raises:
            OSError: the file cannot be written.
        """
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(peers, f)
        os.replace(tmp, self.path)

    async def rejoin(self, timeout_s: float = 10.0) -> int:
        """Dial every saved peer at once (each within ``timeout_s``); returns how many connected."""
        connected = 0

        async def one(peer: str, addrs: list[str]) -> None:
            nonlocal connected
            pid = ID.from_base58(peer)
            try:
                await dial(self.host, pid, addrs, timeout_s=timeout_s)
            except Exception as exc:  # gone for good, or not yet back: others will find us
                _logger.info("remembered peer %s unreachable: %s", peer, describe(exc))
                return
            connected += 1
            # it knew us before: py-libp2p does not identify a peer whose protocols it has cached, so
            # it would keep only our old address (and hand it out in DHT answers): tell it the new one
            with trio.move_on_after(timeout_s):
                try:
                    await push_identify_to_peer(self.host, pid)
                except Exception as exc:  # best effort: the connection itself stands
                    _logger.debug("identify push to %s failed: %s", peer, describe(exc))

        async with trio.open_nursery() as nursery:
            for peer, addrs in self.load().items():
                if peer != self.host.get_id().to_base58():
                    nursery.start_soon(one, peer, addrs)
        return connected

    async def run(self, interval_s: float = 1.0) -> None:
        """Rejoin (in the background), and save whenever the connected peers or their addresses
        changed (until cancelled)."""
        self.saved = self.load()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.rejoin)
            await self._keep(interval_s)

    async def _keep(self, interval_s: float) -> None:
        while True:
            now = self.snapshot()  # the connected first, then those we knew before (a hint for next time)
            peers = dict(list({**now, **{p: a for p, a in self.saved.items() if p not in now}}.items())[:PEER_CACHE_MAX])
            if peers != self.saved:
                self.saved = peers
                try:
                    await trio.to_thread.run_sync(self.write, peers)
                except OSError as exc:  # a full or read-only disk: the cache is only a hint
                    _logger.warning("cannot save the peer cache %s: %s", self.path, exc)
            await trio.sleep(interval_s)
