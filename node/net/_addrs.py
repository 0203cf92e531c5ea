"""The address book: which of our addresses we publish, tell each peer, and whether we are reachable.

Rules: we listen on wildcards but never publish ``0.0.0.0`` or ``::``: a wildcard listen stands for
this machine's interface addresses on its port. Loopback is published only when nothing else can
reach us (the node listens on loopback only, or the machine has no other interface), and identify
tells loopback addresses only to a peer that is itself on loopback. An address peers report seeing
us at (identify's observed address) is trusted once ``observed_min_peers`` distinct observers
(IPv4 address, IPv6 /48) report its IP, each observer counting for its latest report only (one
peer cannot vote for many IPs), or when AutoNAT confirmed it; until then it is only a claim we ask
servers to test, and no server's OK for an IP it (its peer id or its observer group) reported
counts: its dial failure does (the NAT it sees us behind). Operator announcements
(``--announce``) come first.

Order of ``published()``: announced; confirmed by a dial-back; observed by enough peers; public
interface addresses; relay (``/p2p-circuit``) addresses when we need a relay; private interface
addresses (a LAN peer can use them); at most ``max_published``, each ending ``/p2p/<our id>``,
of which at most ``MAX_OBSERVED_PUBLISHED`` observed addresses per IP family, and the relay
addresses keep their slots when we need a relay (what comes before them is cut instead).
Once AutoNAT says private, observed addresses that no dial-back confirmed are not published (they
are the NAT's: a dialer would spend a whole connect timeout on each before the relay address), and
public interface addresses go after the relay addresses.

Reachability (``AutoNAT``, ``_autonat``): unknown at start; a few connected peers that speak AutoNAT
are asked to dial our claims back every ``probe_unknown_s`` while unknown, every ``probe_known_s``
once known, and soon after our claimed addresses change. A server's OK counts only when it names
one of the claims we sent it (else it is no vote at all). An address is confirmed, and the verdict
turns public, only once OKs for it came from ``confirm_groups`` (2) servers in different groups
(IPv4 /24, IPv6 /48) within ``confirmed_ttl_s``, so one hostile server (or several in one
network) cannot make us publish an address or drop our relay address; with a single server off
our network we honestly stay unknown. The exception: a server on loopback confirming a loopback
address, or one on the same private LAN subnet (an interface's network) confirming an address in
it: one is enough there (tests, LAN swarms), and such a server cannot confirm a public IP. A
dial-back failure ("dial_error") is a vote for private from any one server, as in go-libp2p.
``need_relay()`` holds when private, or unknown for ``relay_after_s`` with no confirmed address.

Construction installs two things on the host (py-libp2p 0.8.1 only, ``_identify.apply``): our
identify handler (``for_peer``), and ``published()`` as the host's address factory, so
``host.get_addrs()`` (the DHT's provider records and peer routing, ``peer_addrs``) tells the same.

Bounds: observed IPs kept at most ``MAX_OBSERVED`` (fewest observers evicted), observers per IP at
most ``MAX_OBSERVERS`` (so at most ``MAX_OBSERVED * MAX_OBSERVERS`` observer votes), confirmed
addresses at most ``MAX_CONFIRMED``, each for ``confirmed_ttl_s``; addresses with OKs pending
confirmation at most ``MAX_PENDING``, each with at most ``MAX_OK_GROUPS`` server groups;
one probe round asks at most ``probe_peers`` servers, a server at most once per ``server_cooldown_s``
(under go-libp2p's 3 a minute), each within ``probe_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
from typing import Any, Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from ._autonat import AUTONAT_PROTOCOL, Judge, Reachability, ask_dial_back
from ._circuit import ip_of, is_circuit
from ._identify import install_identify, is_unspecified

__all__ = ["AddressBook", "AddressConfig", "Reachability", "interface_ips", "parse_announce"]

_logger = logging.getLogger(__name__)

MAX_OBSERVED = 32
MAX_OBSERVERS = 64
MAX_CONFIRMED = 16
MAX_PENDING = 32
MAX_OK_GROUPS = 8
MAX_OBSERVED_PUBLISHED = 2

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclasses.dataclass(frozen=True)
class AddressConfig:
    """Timings and thresholds of the address book (the defaults are the daemon's)."""

    max_published: int = 16
    observed_min_peers: int = 3
    confirmed_ttl_s: float = 3600.0
    probe_unknown_s: float = 15.0
    probe_known_s: float = 900.0
    probe_peers: int = 3
    probe_timeout_s: float = 30.0
    server_cooldown_s: float = 60.0
    relay_after_s: float = 60.0
    confirm_groups: int = 2
    interface_refresh_s: float = 30.0
    tick_s: float = 1.0


def _usable(ip: _IP) -> bool:
    """An IP a peer could dial us at (loopback included: it is filtered by who asks)."""
    return not (ip.is_unspecified or ip.is_multicast or ip.is_link_local or (ip.version == 4 and ip.is_reserved))


def _observer_group(ip: _IP) -> str:
    """Who counts as one observer: an IPv4 address, an IPv6 /48."""
    return str(ipaddress.ip_network(f"{ip}/48", strict=False).network_address) if ip.version == 6 else str(ip)


def _server_group(ip: _IP) -> str:
    """Servers in one group agree as one: an IPv4 /24, an IPv6 /48."""
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 48}", strict=False))


def interface_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of this machine's private (non-loopback, non-link-local) interfaces."""
    import ifaddr

    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            text = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
            ip = ip_of(text)
            if ip is None or not _usable(ip) or ip.is_loopback or not ip.is_private:
                continue
            net = ipaddress.ip_network(f"{ip}/{entry.network_prefix}", strict=False)
            if net not in out:
                out.append(net)
    return out


def interface_ips() -> list[_IP]:
    """This machine's interface IPs a peer could dial (loopback included, link-local excluded)."""
    import ifaddr  # zeroconf's dependency, which libp2p requires (a request adds it to ours)

    out: list[_IP] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            text = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
            ip = ip_of(text)
            if ip is not None and _usable(ip) and ip not in out:
                out.append(ip)
    return out


def _tcp(addr: multiaddr.Multiaddr) -> tuple[_IP, int] | None:
    """``(ip, port)`` of a plain ``/ip4|ip6/…/tcp/…`` address, else None."""
    try:
        names = [p.name for p in addr.protocols()]
        if names[:2] not in (["ip4", "tcp"], ["ip6", "tcp"]) or len(names) != 2:
            return None
        ip = ip_of(addr.value_for_protocol(names[0]))
        return (ip, int(addr.value_for_protocol("tcp"))) if ip is not None else None
    except Exception:  # multiaddr raises several unrelated types
        return None


def _ma(ip: _IP, port: int) -> multiaddr.Multiaddr:
    return multiaddr.Multiaddr(f"/ip{ip.version}/{ip}/tcp/{port}")


def _strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    return addr.decapsulate_code(multiaddr.protocols.P_P2P)


def parse_announce(texts: Sequence[str], peer_id: ID) -> list[multiaddr.Multiaddr]:
    """Announced addresses: ``/ip4|ip6|dns|dns4|dns6/…/tcp/<port>``, optionally ``/p2p/<our id>``.

    Raises:
        ValueError: not such an address, an unspecified IP, port 0, or another peer's id, naming it.
    """
    out: list[multiaddr.Multiaddr] = []
    for text in texts:
        try:
            addr = multiaddr.Multiaddr(text)
            names = [p.name for p in addr.protocols()]
        except Exception as exc:  # multiaddr raises several unrelated types
            raise ValueError(f"not an address to announce (e.g. /ip4/203.0.113.5/tcp/4001): {text!r}") from exc
        if names[-1:] == ["p2p"]:
            if addr.value_for_protocol("p2p") != str(peer_id):
                raise ValueError(f"announced address names another peer id: {text!r}")
            addr, names = _strip_p2p(addr), names[:-1]
        if len(names) != 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or names[1] != "tcp":
            raise ValueError(f"not an address to announce (/ip4|ip6|dns4|dns6/<host>/tcp/<port>): {text!r}")
        if is_unspecified(addr):
            raise ValueError(f"announced address is unspecified (0.0.0.0, :: or port 0); peers cannot dial it: {text!r}")
        if names[0] in ("ip4", "ip6") and _tcp(addr) is None:
            raise ValueError(f"not an address to announce (bad IP): {text!r}")
        if str(addr) not in {str(a) for a in out}:
            out.append(addr)
    return out


class AddressBook:
    """Our addresses: published, per peer, and our reachability (module docstring: the rules).

    Args:
        host: the running host (``open_host``); its identify handler and address factory are ours from now.
        announce: operator-announced addresses (``--announce``, ``[node] announce``).
        relay_addrs: our relay (``/p2p-circuit``) addresses now; published when ``need_relay()``.
        config: timings and thresholds.
        clock: seconds for durations (trio's clock; tests may pass their own).

    Raises:
        ValueError: an announced address is malformed, naming it.
        RuntimeError: the installed libp2p is not 0.8.1.
    """

    def __init__(self, host: IHost, *, announce: tuple[str, ...] = (),
                 relay_addrs: Callable[[], list[str]] = lambda: [], config: AddressConfig = AddressConfig(),
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.host = host
        self.config = config
        self._clock = clock
        self._announced = parse_announce(announce, host.get_id())
        self._relay_addrs = relay_addrs
        self._judge = Judge()
        self._started = clock()
        self._observed: dict[_IP, dict[str, tuple[float, str]]] = {}  # IP -> observer group -> (last seen, peer)
        self._votes: dict[str, _IP] = {}  # observer group -> the IP it reported last
        self._oks: dict[str, dict[str, float]] = {}  # address -> server group -> when it said OK
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._confirmed: dict[str, float] = {}  # address -> expiry
        self._asked: dict[ID, float] = {}  # server -> when we last asked it
        self._interfaces: list[_IP] = []
        self._interfaces_at = float("-inf")
        self._last_published: list[str] = []
        self._hooks: list[Callable[[list[str]], None]] = []
        self._changed = trio.Event()
        self._next_probe = float("-inf")
        self._last_claims: frozenset[str] = frozenset()
        self.probes: dict[str, int] = {}  # outcome -> count
        self.last_probe: dict[str, Any] | None = None
        install_identify(host, self.for_peer, self.observe)
        host._addrs_factory = self._addrs_factory  # type: ignore[attr-defined]  # BasicHost's AddrsFactory hook

    # ---- sources

    def _interface_ips(self) -> list[_IP]:
        now = self._clock()
        if now - self._interfaces_at >= self.config.interface_refresh_s:
            try:
                self._interfaces = interface_ips()
                self._networks = interface_networks()
            except Exception as exc:  # a machine whose interfaces cannot be read: keep the last list
                _logger.warning("cannot read this machine's interface addresses: %s", exc)
            self._interfaces_at = now
        return self._interfaces

    def _listen(self) -> list[tuple[_IP, int]]:
        out = []
        for addr in self.host.get_transport_addrs():
            tcp = _tcp(addr)
            if tcp is not None and tcp[1] != 0:
                out.append(tcp)
        return out

    def _expanded(self) -> list[tuple[_IP, int]]:
        """Listen addresses with wildcards replaced by this machine's interface IPs of that family."""
        out: list[tuple[_IP, int]] = []
        for ip, port in self._listen():
            if ip.is_unspecified:
                out.extend((i, port) for i in self._interface_ips() if i.version == ip.version)
            elif _usable(ip):
                out.append((ip, port))
        return list(dict.fromkeys(out))

    def _observed_candidates(self, trusted_only: bool) -> list[multiaddr.Multiaddr]:
        ports = self._listen()
        out = []
        per_family: dict[int, int] = {}
        for ip, observers in sorted(self._observed.items(), key=lambda kv: -len(kv[1])):
            if trusted_only and len(observers) < self.config.observed_min_peers:
                continue
            for lip, port in ports:
                if lip.version != ip.version:
                    continue
                if trusted_only and per_family.get(ip.version, 0) >= MAX_OBSERVED_PUBLISHED:
                    break
                per_family[ip.version] = per_family.get(ip.version, 0) + 1
                out.append(_ma(ip, port))
        return out

    def _confirmed_live(self) -> list[multiaddr.Multiaddr]:
        now = self._clock()
        self._confirmed = {a: t for a, t in self._confirmed.items() if t > now}
        return [multiaddr.Multiaddr(a) for a in sorted(self._confirmed, key=lambda a: -self._confirmed[a])]

    def _relay(self) -> list[multiaddr.Multiaddr]:
        out = []
        try:
            texts = list(self._relay_addrs())[:8]
        except Exception as exc:  # the relay client shutting down
            _logger.debug("relay addresses unavailable: %s", exc)
            return []
        for text in texts:
            try:
                addr = multiaddr.Multiaddr(text)
            except Exception:  # multiaddr raises several unrelated types
                continue
            if "/p2p-circuit" in str(addr):
                out.append(_strip_p2p(addr) if str(addr).rstrip("/").endswith(str(self.host.get_id())) else addr)
        return out

    # ---- observations (identify)

    def observe(self, peer: ID, observed: multiaddr.Multiaddr) -> None:
        """``peer`` reports seeing us at ``observed`` (identify): count its IP once per observer group."""
        tcp = _tcp(_strip_p2p(observed))
        if tcp is None or not _usable(tcp[0]) or tcp[0].is_loopback:
            return
        group = None
        for conn in self.host.get_network().get_connections(peer):
            try:
                if any(is_circuit(a) for a in conn.muxed_conn.get_transport_addresses()):  # type: ignore[attr-defined]
                    return  # a relay's pipe, not our address
                remote = conn.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
            except Exception:
                continue
            ip = ip_of(remote[0]) if remote else None
            if ip is not None:
                group = _observer_group(ip)
                break
        if group is None:
            return
        before = self._votes.get(group)
        if before is not None and before != tcp[0]:  # an observer counts for its latest report only
            self._unvote(before, group)
        observers = self._observed.get(tcp[0])
        if observers is None:
            if len(self._observed) >= MAX_OBSERVED:
                fewest = min(self._observed, key=lambda k: (len(self._observed[k]), max(self._observed[k].values())))
                for g in self._observed.pop(fewest):
                    self._votes.pop(g, None)
            observers = self._observed[tcp[0]] = {}
        if group not in observers and len(observers) >= MAX_OBSERVERS:
            oldest = min(observers, key=observers.__getitem__)
            del observers[oldest]
            self._votes.pop(oldest, None)
        observers[group] = (self._clock(), str(peer))
        self._votes[group] = tcp[0]

    def _unvote(self, ip: _IP, group: str) -> None:
        observers = self._observed.get(ip)
        if observers is not None:
            observers.pop(group, None)
            if not observers:
                del self._observed[ip]
        self._votes.pop(group, None)

    # ---- what we tell

    def _direct(self) -> tuple[list[multiaddr.Multiaddr], list[multiaddr.Multiaddr]]:
        """(public-ish, private interface) direct addresses, loopback excluded, best first."""
        private_verdict = self._judge.status is Reachability.PRIVATE
        # once AutoNAT says private, an observed address is our NAT's (inbound dropped, or a port it
        # never maps): published only if a dial-back confirmed it, never ahead of the relay addresses
        first = list(self._announced) + self._confirmed_live()
        if not private_verdict:
            first += self._observed_candidates(trusted_only=True)
        public, private = [], []
        for ip, port in self._expanded():
            if ip.is_loopback:
                continue
            (private if ip.is_private else public).append(_ma(ip, port))
        if private_verdict:
            private = public + private  # after the relay addresses: a firewalled public interface
        else:
            first += public
        keep = [a for a in first if not ((t := _tcp(a)) and t[0].is_loopback)]
        return keep, [a for a in private if str(a) not in {str(k) for k in keep}]

    def _loopback(self) -> list[multiaddr.Multiaddr]:
        return [_ma(ip, port) for ip, port in self._expanded() if ip.is_loopback]

    def _plain_published(self) -> list[multiaddr.Multiaddr]:
        first, private = self._direct()
        relay = self._relay() if self.need_relay() else []
        if relay:  # the relay addresses keep their slots: what would rank before them is cut instead
            first = first[: max(0, self.config.max_published - len(relay))]
        out = first + relay + private
        if not first and not private:
            out = relay + self._loopback()  # listens on loopback only, or the machine has nothing else
        seen: set[str] = set()
        unique = []
        for addr in out:
            if str(addr) not in seen and not is_unspecified(addr):
                seen.add(str(addr))
                unique.append(addr)
        return unique[: self.config.max_published]

    def published(self) -> list[str]:
        """The addresses for our signed listing, best first, each ending ``/p2p/<our id>`` (at most
        ``max_published``; never unspecified; loopback only when nothing else can reach us)."""
        suffix = f"/p2p/{self.host.get_id()}"
        return [str(a) + suffix for a in self._plain_published()]

    def for_peer(self, remote: multiaddr.Multiaddr | None) -> list[multiaddr.Multiaddr]:
        """What identify tells the peer at ``remote`` (None: unknown): our published addresses, with
        our loopback addresses first when the peer is itself on loopback, never otherwise."""
        plain = self._plain_published()
        tcp = _tcp(_strip_p2p(remote)) if remote is not None else None
        if tcp is not None and tcp[0].is_loopback:
            loop = self._loopback()
            return loop + [a for a in plain if str(a) not in {str(b) for b in loop}]
        return [a for a in plain if not ((t := _tcp(a)) and t[0].is_loopback)]

    def _addrs_factory(self, _candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        return self._plain_published()

    def claims_for(self, remote: multiaddr.Multiaddr | None) -> list[multiaddr.Multiaddr]:
        """The addresses we ask a server at ``remote`` to dial back: announced IPs, observed ones
        (trusted or not; a server's OK for an IP it reported itself is not counted, ``_take_ok``),
        our interface addresses (loopback only to a loopback server); at most 16."""
        tcp = _tcp(_strip_p2p(remote)) if remote is not None else None
        loop_ok = tcp is not None and tcp[0].is_loopback
        out = [a for a in self._announced if _tcp(a) is not None] + self._observed_candidates(trusted_only=False)
        out += [_ma(ip, port) for ip, port in self._expanded() if loop_ok or not ip.is_loopback]
        seen: set[str] = set()
        unique = []
        for addr in out:
            if str(addr) not in seen:
                seen.add(str(addr))
                unique.append(addr)
        return unique[:16]

    # ---- reachability

    @property
    def reachability(self) -> str:
        """``"unknown"``, ``"public"`` or ``"private"`` (AutoNAT's verdict so far)."""
        return self._judge.status.value

    def need_relay(self) -> bool:
        """Private, or unknown for ``relay_after_s`` with no address a dial-back confirmed."""
        if self._judge.status is Reachability.PRIVATE:
            return True
        return (self._judge.status is Reachability.UNKNOWN and not self._confirmed_live()
                and self._clock() - self._started >= self.config.relay_after_s)

    def status(self) -> dict[str, Any]:
        """For ``node status``: reachability, how peers reach us, and where each address comes from."""
        published = self.published()
        relay = [a for a in published if "/p2p-circuit" in a]
        how = "direct" if self._judge.status is Reachability.PUBLIC else ("relay" if relay else "none")
        return {
            "reachability": self.reachability,
            "how": how,
            "reachable": how != "none",
            "need_relay": self.need_relay(),
            "listen": [str(a) for a in self.host.get_transport_addrs()],
            "published": published,
            "announced": [str(a) for a in self._announced],
            "confirmed": [str(a) for a in self._confirmed_live()],
            "observed": [{"ip": str(ip), "peers": len(obs)} for ip, obs in
                         sorted(self._observed.items(), key=lambda kv: -len(kv[1]))],
            "relay": [str(a) for a in self._relay()],
            "probes": dict(self.probes),
            "last_probe": self.last_probe,
        }

    # ---- changes

    def on_change(self, hook: Callable[[list[str]], None]) -> None:
        """Call ``hook(published())`` whenever the published addresses change (from ``run``)."""
        self._hooks.append(hook)

    def wait_changed(self) -> Awaitable[list[str]]:
        """An awaitable for the first change of ``published()`` after this call (seen by ``run`` or
        ``refresh``), giving the new list: take it before looking, await it after."""
        event = self._changed

        async def wait() -> list[str]:
            await event.wait()
            return list(self._last_published)

        return wait()

    def refresh(self) -> bool:
        """Recompute ``published()``; on a change, run the hooks and wake ``wait_changed``."""
        now = self.published()
        if now == self._last_published:
            return False
        self._last_published = now
        for hook in self._hooks:
            try:
                hook(list(now))
            except Exception as exc:  # a hook's failure is the hook's
                _logger.warning("address change hook failed: %s", exc)
        event, self._changed = self._changed, trio.Event()
        event.set()
        return True

    # ---- AutoNAT probing

    def _servers(self, now: float) -> list[tuple[ID, multiaddr.Multiaddr | None]]:
        store = self.host.get_peerstore()
        out = []
        for peer in self.host.get_connected_peers():
            if now - self._asked.get(peer, float("-inf")) < self.config.server_cooldown_s:
                continue
            try:
                if not store.supports_protocols(peer, [str(AUTONAT_PROTOCOL)]):
                    continue
            except Exception:  # not identified yet
                continue
            remote = None
            relayed = False
            for conn in self.host.get_network().get_connections(peer):
                try:
                    relayed = any(is_circuit(a) for a in conn.muxed_conn.get_transport_addresses())  # type: ignore[attr-defined]
                    r = conn.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
                    remote = _ma(ip_of(r[0]), r[1]) if r and ip_of(r[0]) is not None else None  # type: ignore[arg-type]
                except Exception:
                    continue
                break
            if not relayed:
                out.append((peer, remote))
        random.shuffle(out)
        return out[: self.config.probe_peers]

    def _local_server(self, server_ip: _IP, addr_ip: _IP) -> bool:
        """A server that alone may confirm ``addr_ip``: both on loopback, or both in the network of
        one of our private interfaces (it cannot confirm a public IP)."""
        if server_ip.is_loopback or addr_ip.is_loopback:
            return server_ip.is_loopback and addr_ip.is_loopback
        self._interface_ips()  # refreshes the networks too
        return any(server_ip in net and addr_ip in net for net in self._networks)

    def _reported_by(self, ip: _IP, server_ip: _IP, server: ID | None) -> bool:
        """Whether the server (peer ``server`` at ``server_ip``, or another id from its observer
        group) told us it sees us at ``ip``."""
        observers = self._observed.get(ip, {})
        return _observer_group(server_ip) in observers or any(p == str(server) for _, p in observers.values())

    def _take_ok(self, named: multiaddr.Multiaddr | None, claims: Sequence[multiaddr.Multiaddr],
                 remote: multiaddr.Multiaddr | None, server: ID | None = None) -> bool:
        """A server (peer ``server``) at ``remote`` answered OK naming ``named`` after we sent it
        ``claims``: count it (module docstring: the rules); return whether it confirmed the address
        (and was a vote for public). An OK naming no claim of ours, from a server whose IP we do not
        know, or for an IP that server reported seeing us at, is no vote."""
        if named is None or remote is None:
            return False
        addr = _strip_p2p(named)
        mine = _tcp(addr)
        at = _tcp(_strip_p2p(remote))
        if mine is None or at is None or str(addr) not in {str(_strip_p2p(c)) for c in claims}:
            return False
        if self._reported_by(mine[0], at[0], server):
            return False  # a peer's word that it sees us there, then its word that it reached us there
        now = self._clock()
        key = str(addr)
        if not self._local_server(at[0], mine[0]):
            oks = {g: t for g, t in self._oks.get(key, {}).items() if now - t < self.config.confirmed_ttl_s}
            oks[_server_group(at[0])] = now
            while len(oks) > MAX_OK_GROUPS:
                del oks[min(oks, key=oks.__getitem__)]
            self._oks.pop(key, None)
            self._oks[key] = oks
            while len(self._oks) > MAX_PENDING:
                del self._oks[next(iter(self._oks))]  # the least recently answered
            if len(oks) < self.config.confirm_groups:
                return False
        self._confirmed[key] = now + self.config.confirmed_ttl_s
        while len(self._confirmed) > MAX_CONFIRMED:
            del self._confirmed[min(self._confirmed, key=self._confirmed.__getitem__)]
        if self._judge.record("ok"):
            _logger.info("reachability is now %s (%s confirmed by a dial-back)", self.reachability, key)
        return True

    async def probe_once(self) -> int:
        """One round: ask up to ``probe_peers`` servers to dial our claims back; return how many answered."""
        now = self._clock()
        servers = self._servers(now)
        answered = 0

        async def ask(peer: ID, remote: multiaddr.Multiaddr | None) -> None:
            nonlocal answered
            claims = self.claims_for(remote)
            if not claims:
                return
            self._asked[peer] = self._clock()
            outcome = await ask_dial_back(self.host, peer, claims, self.config.probe_timeout_s)
            self.probes[outcome.status] = self.probes.get(outcome.status, 0) + 1
            self.last_probe = {"server": str(peer), "status": outcome.status, "addr": str(outcome.addr or ""),
                               "text": outcome.text}
            if outcome.status == "no_answer":
                return
            answered += 1
            if outcome.status == "ok":
                self._take_ok(outcome.addr, claims, remote, peer)
                return
            if self._judge.record(outcome.status):
                _logger.info("reachability is now %s (%s said %s)", self.reachability, peer, outcome.status)

        async with trio.open_nursery() as nursery:
            for peer, remote in servers:
                nursery.start_soon(ask, peer, remote)
        self._asked = {p: t for p, t in self._asked.items() if self._clock() - t < self.config.server_cooldown_s}
        return answered

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Probe reachability and watch our addresses until cancelled; ``refresh`` every ``tick_s``."""
        self._started = self._clock()
        self.refresh()
        task_status.started()
        while True:
            now = self._clock()
            claims = frozenset(str(a) for a in self.claims_for(None)) | frozenset(self._announced_strs())
            if claims != self._last_claims:
                self._last_claims = claims
                self._next_probe = min(self._next_probe, now + self.config.tick_s)
            if now >= self._next_probe:
                answered = await self.probe_once()
                unknown = self._judge.status is Reachability.UNKNOWN
                wait = self.config.probe_unknown_s if unknown or not answered else self.config.probe_known_s
                self._next_probe = self._clock() + (wait if answered else self.config.tick_s * 5)
            self.refresh()
            await trio.sleep(self.config.tick_s)

    def _announced_strs(self) -> list[str]:
        return [str(a) for a in self._announced]
