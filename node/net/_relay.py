"""Circuit relay v2: the relay role and the client (reservations, inbound circuits, DCUtR on them).

Rules: this module speaks the standard wire protocols (``/libp2p/circuit/relay/0.2.0/hop`` and
``/stop``, ``/libp2p/dcutr``; varint-prefixed protobufs from ``libp2p.relay.circuit_v2.pb``), so
other libp2p implementations can use our relays and we theirs. Every read a remote party can make
us wait on has a deadline, every message a size cap, every reservation and circuit a count.

Why not py-libp2p 0.8.1's ``circuit_v2``: its hop handler (``protocol.py``) keeps active circuits in
a dict keyed by the *source* peer, so a second circuit from one peer overwrites the first and the
first's cleanup tears down the second; it checks the circuit duration only when a chunk arrives
(an idle circuit outlives its limit for ever); when a limit is hit it writes a HopMessage STATUS
*into the relayed byte stream* (the two ends see garbage inside their Noise session); it sleeps
0.5 s inside handlers on every refusal; and the byte limit is shared by both directions while the
spec says "per direction". Its transport/listener wrap a circuit in a ``RawConnection`` but never
count it against the host's bounds, and its DCUtR needs its own NAT service. The parts here are
compact replacements that reuse py-libp2p's Noise/Yamux upgrade for the relayed byte stream.

The relay (``serve_relay``): a RESERVE over a direct connection gets a reservation for
``reservation_ttl_s`` (one per peer; renewing replaces it), within ``reservations`` in all and
``reservations_per_ip`` per remote IP (an IPv4 address, an IPv6 /64: one subscriber's allocation);
a reservation ends early when its holder disconnects. A CONNECT to a peer holding a reservation
opens the STOP stream to it and splices the two streams, within ``circuits`` in all,
``circuits_per_target`` to one target (a provider receives many consumers), ``circuits_per_pair``
from one source to one target and ``circuits_per_ip`` from one source IP (IPv6 /64) over all
targets; a circuit is reset after ``circuit_duration_s``, after ``circuit_idle_s`` without a byte
either way, or once ``circuit_bytes`` went one way. So throwaway identities cannot park idle
circuits on a provider: each costs a source IP slot and dies within a minute of silence. Refusals carry the
spec's status (RESERVATION_REFUSED, RESOURCE_LIMIT_EXCEEDED, NO_RESERVATION, PERMISSION_DENIED,
CONNECTION_FAILED, MALFORMED_MESSAGE, UNEXPECTED_MESSAGE); a hop request over a relayed connection
is refused (PERMISSION_DENIED). With a DHT the relay provides ``RELAY_DHT_KEY`` every
``reprovide_s``.

The client (``RelayClient``): keeps reservations on up to ``MAX_RELAYS`` relays while
``need_relay()`` holds, renews them before they expire, replaces a relay that went away; accepts
STOP streams only from relays it holds a reservation on, turns each into a connection (Noise +
Yamux, the peer's identity checked by Noise) counted like a direct inbound connection (the count
taken before the handshake, so parallel STOP streams cannot pass the cap); it closes such a
connection once no application stream was open on it for ``RELAYED_IDLE_S``. It keeps only the
reservation's relay addresses at the IP it reached the relay at (a relay cannot make us publish
a third party's IP), and forgets its reservations when it stops needing a relay. On a relayed
connection it runs DCUtR (``_dcutr``: connection reversal to a direct connection, with its
own dial bounds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import math
from typing import Any, Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, PeerId, Reservation, Status, StopMessage

from .._clock import SYSTEM_WALL_CLOCK  # reservation expiries are unix times on the wire
from ._circuit import (
    MESSAGE_TIMEOUT_S,
    carries_app_stream,
    close_quietly,
    connection_kind,
    direct_addrs,
    ip_of,
    is_circuit,
    is_relayed_conn,
    live_conns,
    read_message,
    reset_quietly,
    write_message,
)
from ._dcutr import DCUTR_PROTOCOL, DCUtR
from ._dial import DialFailed, describe, dialer
from ._libp2p_fixes import handshake_gate

__all__ = [
    "HOP_PROTOCOL", "STOP_PROTOCOL", "DCUTR_PROTOCOL", "RELAY_DHT_KEY", "MAX_RELAYS", "RelayLimits",
    "Relay", "serve_relay", "RelayClient", "RelayRefused", "dial_circuit", "connection_kind", "is_circuit",
]

_logger = logging.getLogger(__name__)

HOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/hop")
STOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/stop")
#: the DHT provider-record key relays announce (a sha256 multihash in hex, like the market's model keys)
RELAY_DHT_KEY = "1220" + hashlib.sha256(b"inferswarm/relay/v1").hexdigest()
MAX_RELAYS = 2
CHUNK = 16 * 1024
_STATUS_NAMES = {v: k for k, v in Status.items()}


class RelayRefused(DialFailed):
    """A relay (or the target behind it) refused; ``status`` is the spec's status name."""

    def __init__(self, status: str, what: str) -> None:
        super().__init__(f"{what}: relay answered {status}")
        self.status = status


@dataclasses.dataclass(frozen=True)
class RelayLimits:
    """What a relay gives away at most (the defaults are the daemon's).

    reservations / reservations_per_ip: live reservations in all and per remote IP, an IPv6 /64
        counted as one IP (go-libp2p: 128, 8).
    reservation_ttl_s: a reservation's life (go-libp2p: 1 h); the holder renews it before the end.
    circuits: open circuits in all.
    circuits_per_target: open circuits to one target: a provider serves many consumers through
        its relay, so well above the per-pair cap (go-libp2p counts 16 per peer, either end).
    circuits_per_pair: open circuits from one source to one target (a consumer needs one).
    circuits_per_ip: open circuits from one source IP (IPv6 /64) over all targets: throwaway
        identities from one machine take at most this many of a target's slots.
    circuit_idle_s: a circuit that carried no byte either way this long is reset (an honest
        relayed connection pings, or DCUtR moved it; the target also closes an idle one at 30 s).
    circuit_duration_s / circuit_bytes: a circuit is reset after this long, or once this many bytes
        went in one direction. go-libp2p's 2 min / 128 KiB suits hole punching only; ours carry an
        inference session until DCUtR moves it (prompts and answers are KiB to a few MiB), so 10 min
        and 16 MiB: at 64 circuits at most 2 GiB relayed a direction per 10 minutes.
    reprovide_s: how often the DHT provider record is renewed.
    """

    reservations: int = 128
    reservations_per_ip: int = 8
    reservation_ttl_s: int = 3600
    circuits: int = 64
    circuits_per_target: int = 32
    circuits_per_pair: int = 2
    circuits_per_ip: int = 16
    circuit_idle_s: float = 60.0
    circuit_duration_s: float = 600.0
    circuit_bytes: int = 16 << 20
    reprovide_s: float = 1800.0


def _split_circuit(addr: multiaddr.Multiaddr) -> tuple[multiaddr.Multiaddr, ID]:
    """``…/p2p/RELAY/p2p-circuit[/p2p/PEER]`` as (the relay's address with /p2p/RELAY, RELAY).

    Raises:
        ValueError: not a circuit address naming its relay.
    """
    text = str(addr)
    relay_part = text.split("/p2p-circuit")[0]
    if "/p2p/" not in relay_part:
        raise ValueError(f"a circuit address must name its relay (…/p2p/RELAY/p2p-circuit): {text}")
    relay = ID.from_base58(relay_part.rsplit("/p2p/", 1)[1])
    return multiaddr.Multiaddr(relay_part), relay


def _status_name(code: int) -> str:
    return _STATUS_NAMES.get(code, f"status {code}")


# ---- the relay role


@dataclasses.dataclass
class _Reservation:
    expire: float  # unix time
    ip: str


class Relay:
    """The relay's state: live reservations and circuits, and counts of what it refused."""

    def __init__(self, host: IHost, limits: RelayLimits) -> None:
        self.host = host
        self.limits = limits
        self.reservations: dict[ID, _Reservation] = {}
        self.circuits: dict[ID, int] = {}  # target -> open circuits to it
        self._pairs: dict[tuple[ID, ID], int] = {}  # (source, target) -> open circuits
        self._ips: dict[str, int] = {}  # source IP key (_ip_key) -> open circuits
        self.open_circuits = 0
        self.refused: dict[str, int] = {}
        self.cut = 0  # circuits reset at their duration or byte limit
        self.idled = 0  # circuits reset after circuit_idle_s of silence

    def _refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1

    def _prune(self) -> None:
        now = SYSTEM_WALL_CLOCK()
        for peer in [p for p, r in self.reservations.items() if r.expire <= now or not live_conns(self.host, p)]:
            del self.reservations[peer]

    def holds(self, peer: ID) -> bool:
        self._prune()
        return peer in self.reservations

    async def handle_hop(self, stream: Any) -> None:
        """One hop stream: one RESERVE or CONNECT (go-libp2p reads one message per stream too)."""
        peer = stream.muxed_conn.peer_id
        try:
            if is_relayed_conn(getattr(stream, "muxed_conn", None)):
                self._refuse("relayed")
                await self._status(stream, Status.PERMISSION_DENIED)
                return
            try:
                msg = await read_message(stream, HopMessage)
            except (ValueError, trio.TooSlowError):
                self._refuse("malformed")
                await self._status(stream, Status.MALFORMED_MESSAGE)
                return
            if msg.type == HopMessage.RESERVE:
                await self._reserve(stream, peer)
            elif msg.type == HopMessage.CONNECT:
                await self._connect(stream, peer, msg)
            else:
                self._refuse("unexpected")
                await self._status(stream, Status.UNEXPECTED_MESSAGE)
        except Exception as exc:  # the peer went away mid-answer
            _logger.debug("hop stream from %s ended: %s", peer, describe(exc))
        finally:
            await close_quietly(stream)

    async def _status(self, stream: Any, status: int, **fields: Any) -> None:
        try:
            await write_message(stream, HopMessage(type=HopMessage.STATUS, status=status, **fields))
        except Exception:  # the peer went away
            pass

    def _limit(self) -> Limit:
        return Limit(duration=int(self.limits.circuit_duration_s), data=int(self.limits.circuit_bytes))

    async def _reserve(self, stream: Any, peer: ID) -> None:
        self._prune()
        ip = _ip_key(_remote_ip(stream))
        if peer not in self.reservations:
            same_ip = sum(1 for r in self.reservations.values() if r.ip == ip)
            if len(self.reservations) >= self.limits.reservations or same_ip >= self.limits.reservations_per_ip:
                self._refuse("reservations")
                await self._status(stream, Status.RESERVATION_REFUSED)
                return
        expire = int(SYSTEM_WALL_CLOCK()) + self.limits.reservation_ttl_s
        self.reservations[peer] = _Reservation(expire, ip)
        addrs = [a.to_bytes() for a in self.host.get_addrs() if not is_circuit(a)]
        await self._status(stream, Status.OK, reservation=Reservation(expire=expire, addrs=addrs),
                           limit=self._limit())

    async def _connect(self, src_stream: Any, src: ID, msg: HopMessage) -> None:
        try:
            dst = ID(msg.peer.id)
            dst.to_base58()
        except Exception:
            self._refuse("malformed")
            await self._status(src_stream, Status.MALFORMED_MESSAGE)
            return
        if not self.holds(dst):
            self._refuse("no_reservation")
            await self._status(src_stream, Status.NO_RESERVATION)
            return
        lim, ip = self.limits, _ip_key(_remote_ip(src_stream))
        counts: list[tuple[dict[Any, int], Any, int]] = [
            (self.circuits, dst, lim.circuits_per_target), (self._pairs, (src, dst), lim.circuits_per_pair),
            (self._ips, ip, lim.circuits_per_ip)]
        if (src == dst or self.open_circuits >= lim.circuits
                or any(table.get(key, 0) >= cap for table, key, cap in counts)):
            self._refuse("circuits")
            await self._status(src_stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        self.open_circuits += 1
        for table, key, _cap in counts:
            table[key] = table.get(key, 0) + 1
        try:
            await self._circuit(src_stream, src, dst)
        finally:
            self.open_circuits -= 1
            for table, key, _cap in counts:
                table[key] -= 1
                if not table[key]:
                    del table[key]

    async def _circuit(self, src_stream: Any, src: ID, dst: ID) -> None:
        dst_stream = None
        try:
            with trio.fail_after(MESSAGE_TIMEOUT_S):
                dst_stream = await self.host.new_stream(dst, [STOP_PROTOCOL])
                await write_message(dst_stream, StopMessage(type=StopMessage.CONNECT, peer=PeerId(id=src.to_bytes()),
                                                     limit=self._limit()))
                reply = await read_message(dst_stream, StopMessage)
            if reply.type != StopMessage.STATUS or reply.status != Status.OK:
                raise ValueError(f"target answered {_status_name(reply.status)}")
        except Exception as exc:
            _logger.debug("circuit %s -> %s failed: %s", src, dst, describe(exc))
            self._refuse("connection_failed")
            if dst_stream is not None:
                await reset_quietly(dst_stream)
            await self._status(src_stream, Status.CONNECTION_FAILED)
            return
        await self._status(src_stream, Status.OK, limit=self._limit())
        why = await _splice(src_stream, dst_stream, self.limits.circuit_duration_s, self.limits.circuit_bytes,
                            self.limits.circuit_idle_s)
        if why == "idle":
            self.idled += 1
        elif why is not None:
            self.cut += 1


def _remote_ip(stream: Any) -> str:
    try:
        remote = stream.muxed_conn.get_remote_address()
        return str(remote[0]) if remote else "?"
    except Exception:
        return "?"


def _ip_key(ip: str) -> str:
    """What per-IP limits count: an IPv4 address, an IPv6 /64 (one subscriber gets a /64 or more;
    counting full IPv6 addresses would let one host take every slot), an IPv4-mapped IPv6 as IPv4."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


async def _splice(a: Any, b: Any, duration_s: float, max_bytes: int, idle_s: float = math.inf) -> str | None:
    """Copy ``a`` <-> ``b`` until both directions ended; reset both at ``duration_s``, after
    ``idle_s`` without a byte either way, or when one direction passed ``max_bytes``.

    Returns:
        Why it cut the circuit ("duration", "idle", "bytes"), or None when both ends finished.
    """
    cut: str | None = None
    last = trio.current_time()

    async def pump(src: Any, dst: Any, scope: trio.CancelScope) -> None:
        nonlocal cut, last
        sent = 0
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                last = trio.current_time()
                if sent + len(data) > max_bytes:
                    await dst.write(data[: max_bytes - sent])
                    cut = "bytes"
                    scope.cancel()
                    return
                sent += len(data)
                with trio.fail_after(MESSAGE_TIMEOUT_S * 3):  # a peer that stops reading holds nothing long
                    await dst.write(data)
        except (trio.TooSlowError, Exception) as exc:  # EOF, reset, a stalled reader: the circuit is over
            if not _is_eof(exc):
                scope.cancel()
                return
        try:
            await dst.close()  # half-close: the other direction carries on
        except Exception:
            scope.cancel()

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal cut
        while (left := last + idle_s - trio.current_time()) > 0:
            await trio.sleep(left)
        cut = cut or "idle"
        scope.cancel()

    with trio.move_on_after(duration_s) as timer:
        async with trio.open_nursery() as outer:
            outer.start_soon(watch, outer.cancel_scope)
            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump, a, b, outer.cancel_scope)
                pumps.start_soon(pump, b, a, outer.cancel_scope)
            outer.cancel_scope.cancel()  # both directions ended: the watch is over
    if timer.cancelled_caught:
        cut = cut or "duration"
    await reset_quietly(a)
    await reset_quietly(b)
    return cut


def _is_eof(exc: BaseException) -> bool:
    return isinstance(exc, EOFError) or "EOF" in type(exc).__name__


async def serve_relay(host: IHost, limits: RelayLimits = RelayLimits(), *, dht: Any = None,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the hop protocol on ``host`` until cancelled (``nursery.start``: started with the ``Relay``).

    With ``dht`` (a running ``KadDHT``) the relay provides ``RELAY_DHT_KEY`` at once and every
    ``limits.reprovide_s``; a failed provide is retried after a minute. Peers holding a reservation
    are kept by the host's connection manager (``keep_peers``).
    """
    from ._host import connection_manager

    relay = Relay(host, limits)
    host.set_stream_handler(HOP_PROTOCOL, relay.handle_hop)
    try:
        connection_manager(host).keep_peers(relay.holds)
    except LookupError:  # a host not opened by open_host
        pass
    task_status.started(relay)
    try:
        while True:
            pause = limits.reprovide_s
            if dht is not None:
                try:
                    with trio.fail_after(60):
                        await dht.provide(RELAY_DHT_KEY)
                except Exception as exc:  # no DHT peers yet
                    _logger.info("relay provider record not stored: %s", describe(exc))
                    pause = min(pause, 60.0)
            await trio.sleep(pause)
    finally:
        try:
            host.remove_stream_handler(HOP_PROTOCOL)
        except Exception:  # host closing
            pass


# ---- the client: dialling through a relay


async def dial_circuit(host: IHost, addr: multiaddr.Multiaddr, peer: ID, *, deadline: float) -> Any:
    """Connect to ``peer`` through the relay ``addr`` names (``…/p2p/RELAY/p2p-circuit``).

    Returns:
        The new (relayed) swarm connection.

    Raises:
        RelayRefused: the relay or the target refused (the spec's status in the message).
        DialFailed: the relay unreachable, or the upgrade failed; names the cause.
    """
    relay_addr, relay = _split_circuit(addr)
    if relay == peer:
        raise DialFailed("a circuit through the peer itself")
    await dialer(host).dial(relay, [relay_addr], deadline=deadline)
    stream = None
    try:
        with trio.fail_after(max(0.01, deadline - trio.current_time())):
            stream = await host.new_stream(relay, [HOP_PROTOCOL])
            await write_message(stream, HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=peer.to_bytes())))
            reply = await read_message(stream, HopMessage)
            if reply.type != HopMessage.STATUS or reply.status != Status.OK:
                raise RelayRefused(_status_name(reply.status), f"circuit to {peer} via {relay}")
            raw = RawConnection(stream, True, ConnectionType.RELAYED, [multiaddr.Multiaddr(f"{addr}")])
            return await host.get_network().upgrade_outbound_raw_conn(raw, peer)
    except RelayRefused:
        if stream is not None:
            await reset_quietly(stream)
        raise
    except BaseException as exc:
        if stream is not None:
            await reset_quietly(stream)
        if isinstance(exc, Exception):
            raise DialFailed(f"circuit to {peer} via {relay}: {describe(exc)}") from exc
        raise


# ---- the client: reservations, inbound circuits, DCUtR


@dataclasses.dataclass
class _Held:
    relay: ID
    addrs: list[multiaddr.Multiaddr]  # the relay's, each ending in /p2p/RELAY
    expire: float  # unix time
    since: float  # when it was granted (unix time)


class RelayClient:
    """Keeps reservations on relays while needed, accepts relayed connections, upgrades them (DCUtR).

    Bounds: at most ``MAX_RELAYS`` reservations, dropped when a relay is no longer needed;
    candidates tried at most ``MAX_CANDIDATES`` a round, a relay that failed is not retried for
    ``RETRY_S``; relayed inbound connections count against the host's inbound cap (``_libp2p_fixes``
    fix 1, counted from the STOP stream on) and stream caps like direct ones, and are closed after
    ``RELAYED_IDLE_S`` without a stream of a non-background protocol; DCUtR has its own bounds
    (``_dcutr.DCUtR``); a relayed connection is closed once a direct one to the same
    peer exists and no stream of a non-background protocol is open on it.
    """

    CHECK_S = 1.0
    RETRY_S = 30.0
    DHT_QUERY_S = 30.0
    MAX_CANDIDATES = 8
    RELAYED_IDLE_S = 30.0
    RENEW_MARGIN = 0.25  # renew when a quarter of the reservation's life is left

    def __init__(self, host: IHost, *, dht: Any = None,
                 own_addrs: Callable[[], Sequence[str]] | None = None) -> None:
        self.host = host
        self.dht = dht
        self.held: dict[ID, _Held] = {}
        self.explicit: dict[ID, multiaddr.Multiaddr] = {}
        self.failed: dict[ID, float] = {}
        self.dcutr = DCUtR(host, self._dcutr_scope, own_addrs)
        self._dht_found: list[tuple[ID, list[multiaddr.Multiaddr]]] = []
        self._dht_at = -1e9
        self._nursery: trio.Nursery | None = None
        self._active = False
        self._relayed_in: dict[Any, float] = {}  # our inbound relayed muxed conns -> last busy (trio time)

    def add_relay(self, addr: str) -> None:
        """Use the relay at ``addr`` (``/ip4/…/tcp/…/p2p/RELAY``) as a candidate.

        Raises:
            ValueError: not an address naming a peer.
        """
        try:
            maddr = multiaddr.Multiaddr(addr)
            relay = ID.from_base58(str(maddr).rsplit("/p2p/", 1)[1])
        except Exception as exc:
            raise ValueError(f"not a relay address (…/p2p/<peer id>): {addr!r}") from exc
        self.explicit[relay] = maddr

    def circuit_addrs(self) -> list[str]:
        """Our addresses through the relays we hold live reservations on (``…/p2p-circuit/p2p/ME``)."""
        if not self._active:
            return []
        me = self.host.get_id().to_base58()
        now = SYSTEM_WALL_CLOCK()
        out = []
        for held in self.held.values():
            if held.expire > now and live_conns(self.host, held.relay):
                out.extend(f"{a}/p2p-circuit/p2p/{me}" for a in held.addrs)
        return out

    @property
    def upgrades(self) -> int:
        """Direct connections DCUtR made."""
        return self.dcutr.upgrades

    def connection_kind(self, peer: ID) -> str | None:
        """"direct", "relayed" or None (not connected)."""
        return connection_kind(self.host, peer)

    async def run(self, need_relay: Callable[[], bool], *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve STOP and DCUtR, and keep reservations while ``need_relay()`` holds, until cancelled."""
        self.host.set_stream_handler(STOP_PROTOCOL, self._handle_stop)
        self.host.set_stream_handler(DCUTR_PROTOCOL, self.dcutr.handle)
        try:
            from ._host import connection_manager
            connection_manager(self.host).keep_peers(lambda p: p in self.held)
        except LookupError:
            pass
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                while True:
                    self._active = bool(need_relay())
                    if self._active:
                        await self._maintain()
                    else:
                        self.held.clear()  # frees the relays' connections for the connection manager
                    self._close_superseded(nursery)
                    self._close_idle_relayed(nursery)
                    await trio.sleep(self.CHECK_S)
        finally:
            self._nursery = None
            for proto in (STOP_PROTOCOL, DCUTR_PROTOCOL):
                try:
                    self.host.remove_stream_handler(proto)
                except Exception:  # host closing
                    pass

    async def _maintain(self) -> None:
        now = SYSTEM_WALL_CLOCK()
        for relay, held in list(self.held.items()):
            if not live_conns(self.host, relay) or held.expire <= now:
                del self.held[relay]
            elif held.expire - now < self.RENEW_MARGIN * (held.expire - held.since):
                await self._try(relay, held.addrs)
        if len(self.held) >= MAX_RELAYS:
            return
        for relay, addrs in (await self._candidates())[: self.MAX_CANDIDATES]:
            if len(self.held) >= MAX_RELAYS:
                break
            if relay not in self.held and self.failed.get(relay, 0) <= trio.current_time():
                await self._try(relay, addrs)

    async def _try(self, relay: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        try:
            await self.reserve(relay, addrs)
        except DialFailed as exc:
            _logger.info("no reservation on relay %s: %s", relay, exc)
            self.held.pop(relay, None)
            self.failed[relay] = trio.current_time() + self.RETRY_S

    async def _candidates(self) -> list[tuple[ID, list[multiaddr.Multiaddr]]]:
        me = self.host.get_id()
        found: dict[ID, list[multiaddr.Multiaddr]] = {r: [a] for r, a in self.explicit.items()}
        store = self.host.get_peerstore()
        for peer in self.host.get_connected_peers():
            try:
                if HOP_PROTOCOL in (store.get_protocols(peer) or []):
                    found.setdefault(peer, [])
            except Exception:  # unknown to the peerstore
                continue
        if self.dht is not None and trio.current_time() - self._dht_at > self.DHT_QUERY_S:
            self._dht_at = trio.current_time()
            try:
                with trio.move_on_after(10):
                    infos = await self.dht.find_providers(RELAY_DHT_KEY, 20)
                    self._dht_found = [(i.peer_id, direct_addrs(i.addrs, 4)) for i in infos]
            except Exception as exc:  # no DHT peers yet
                _logger.debug("relay lookup failed: %s", describe(exc))
        for relay, addrs in self._dht_found:
            found.setdefault(relay, addrs)
        return [(r, a) for r, a in found.items() if r != me]

    async def reserve(self, relay: ID, addrs: Sequence[multiaddr.Multiaddr] = (), *, timeout_s: float = 10.0) -> None:
        """Reserve (or renew) a slot on ``relay``.

        Raises:
            RelayRefused: the relay refused (its status in the message).
            DialFailed: unreachable, or it does not speak the hop protocol; names the cause.
        """
        deadline = trio.current_time() + timeout_s
        await dialer(self.host).dial(relay, [a for a in addrs if not is_circuit(a)], deadline=deadline)
        stream = None
        try:
            with trio.fail_after(timeout_s):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
                await write_message(stream, HopMessage(type=HopMessage.RESERVE))
                reply = await read_message(stream, HopMessage)
        except Exception as exc:
            if stream is not None:
                await reset_quietly(stream)
            raise DialFailed(f"reservation on {relay}: {describe(exc)}") from exc
        await close_quietly(stream)
        if reply.type != HopMessage.STATUS or reply.status != Status.OK:
            raise RelayRefused(_status_name(reply.status), f"reservation on {relay}")
        suffix = f"/p2p/{relay.to_base58()}"
        # the relay's word on its addresses holds only at the IP we reached it at (or dialled):
        # any other would make us publish a third party's IP under our circuit address
        ips = {ip_of(a) for a in addrs} | {ip_of(_remote_ip(stream))}
        ips.discard(None)
        given = [a for a in direct_addrs(reply.reservation.addrs, 64) if ip_of(a) in ips][:4] or [
            a for a in direct_addrs([str(a) for a in addrs] + [str(a) for a in self.host.get_peerstore().addrs(relay)],
                                     64) if ip_of(a) in ips][:4]
        relay_addrs = [a if str(a).endswith(suffix) else multiaddr.Multiaddr(f"{str(a).split('/p2p/')[0]}{suffix}")
                       for a in given]
        expire = float(reply.reservation.expire) if reply.reservation.expire else SYSTEM_WALL_CLOCK() + 3600
        expire = min(expire, SYSTEM_WALL_CLOCK() + 24 * 3600)  # a relay's claim; we renew well before anyway
        self.held[relay] = _Held(relay, relay_addrs, expire, SYSTEM_WALL_CLOCK())

    async def _handle_stop(self, stream: Any) -> None:
        """A relay hands us a circuit: accept only from a relay we hold a reservation on."""
        relay = stream.muxed_conn.peer_id
        network = self.host.get_network()
        gate = handshake_gate(network)  # type: ignore[arg-type]
        cfg = network.connection_config  # type: ignore[attr-defined]
        counted = False
        muxed = None
        try:
            try:
                msg = await read_message(stream, StopMessage)
                src = ID(msg.peer.id)
                src.to_base58()
            except Exception:
                await write_message(stream, StopMessage(type=StopMessage.STATUS, status=Status.MALFORMED_MESSAGE))
                return
            if relay not in self.held or msg.type != StopMessage.CONNECT:
                await write_message(stream, StopMessage(type=StopMessage.STATUS, status=Status.PERMISSION_DENIED))
                return
            if gate.inbound >= max(1, cfg.max_connections - cfg.min_connections):
                await write_message(stream, StopMessage(type=StopMessage.STATUS, status=Status.RESOURCE_LIMIT_EXCEEDED))
                return
            gate.inbound += 1  # before the handshake: parallel STOP streams each see the others
            counted = True
            try:
                await write_message(stream, StopMessage(type=StopMessage.STATUS, status=Status.OK))
                circuit = multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{src.to_base58()}")
                raw = RawConnection(stream, False, ConnectionType.RELAYED, [circuit])
                muxed = await network.upgrade_inbound_raw_conn(raw, circuit)  # type: ignore[attr-defined]
            except Exception as exc:
                _logger.debug("relayed connection via %s failed: %s", relay, describe(exc))
                await reset_quietly(stream)
                return
            if muxed.peer_id != src:  # Noise proved who it is; the relay's word named someone else
                _logger.info("relayed connection via %s: the relay said %s, Noise proved %s", relay, src, muxed.peer_id)
            self._relayed_in[muxed] = trio.current_time()
            if self._nursery is not None:
                self._nursery.start_soon(self.dcutr.initiate, muxed.peer_id, relay)
            event = getattr(muxed, "event_shutting_down", None)
            await (event if event is not None else muxed.event_closed).wait()
        finally:
            if muxed is not None:
                self._relayed_in.pop(muxed, None)
            if counted:
                gate.inbound -= 1

    def _dcutr_scope(self, relay: ID) -> tuple[list[Any], bool]:
        """The networks a DCUtR dial may go to (ours: interfaces', relays' we reach directly), and
        whether loopback may (only when ``relay`` itself is reached over loopback: one machine)."""
        from ._addrs import interface_ips

        ips = []
        try:
            ips.extend(i for i in interface_ips() if not i.is_loopback)
        except Exception as exc:  # no interface list: relays' networks only
            _logger.debug("no interface list: %s", describe(exc))
        loopback = False
        for held in list(self.held.values()):
            for conn in live_conns(self.host, held.relay):
                if is_relayed_conn(conn):
                    continue
                try:
                    ip = ip_of(str(conn.muxed_conn.get_remote_address()[0]))
                except Exception:  # no address: nothing learned
                    continue
                if ip is not None and ip.is_loopback:
                    loopback = loopback or held.relay == relay
                elif ip is not None:
                    ips.append(ip)
        nets = [ipaddress.ip_network((ip, 24 if ip.version == 4 else 64), strict=False) for ip in ips]
        return nets, loopback

    def _close_idle_relayed(self, nursery: trio.Nursery) -> None:
        """Close our inbound relayed connections that carried no application stream for
        ``RELAYED_IDLE_S`` (each holds a circuit slot on the relay, and one of our inbound slots)."""
        now = trio.current_time()
        for conn in list(self.host.get_network().get_connections()):
            muxed = getattr(conn, "muxed_conn", None)
            if muxed not in self._relayed_in or getattr(conn, "is_closed", False):
                continue
            if carries_app_stream(conn):
                self._relayed_in[muxed] = now
            elif now - self._relayed_in[muxed] >= self.RELAYED_IDLE_S:
                del self._relayed_in[muxed]
                _logger.debug("closing idle relayed connection from %s", muxed.peer_id)
                nursery.start_soon(close_quietly, conn)

    def _close_superseded(self, nursery: trio.Nursery) -> None:
        """Close relayed connections to peers we also reach directly, once nothing but background runs."""
        for conn in list(self.host.get_network().get_connections()):
            if not is_relayed_conn(conn) or getattr(conn, "is_closed", False):
                continue
            peer = conn.muxed_conn.peer_id
            if not any(not is_relayed_conn(c) for c in live_conns(self.host, peer)):
                continue
            if not carries_app_stream(conn):
                nursery.start_soon(close_quietly, conn)
