"""AutoNAT v1 (``/libp2p/autonat/1.0.0``): ask peers to dial us back; answer their requests, bounded.

Rules: the server dials only addresses on the IP it observes the requester at (the spec's
amplification guard, RFC 3489 12.1.1), never answers over a relayed connection, dials each
address on a *new* connection of its own (never the one the request came on), and refuses what
passes its limits (``AutoNATLimits``). The wire format is the spec's protobuf ``Message``
(py-libp2p's generated ``autonat_pb2``), varint-length-prefixed, one request and one response a stream.

Why not py-libp2p 0.8.1's ``libp2p.host.autonat.AutoNATService`` (checked against its source):
its dial-back is ``host.connect(PeerInfo(peer, [addr]))``, which returns at once when a connection
to the peer exists, and the requester is always connected (the request came on that connection):
every request is answered OK without a dial, so every node would judge itself public, NAT or not.
It also dials whatever peer id the request names (not the requester's), has no rate limit, no
deadline on reading the request or on a dial, accepts 64 KiB requests, and its client advertises
``host.get_addrs()`` (``/ip4/0.0.0.0/...``). Its observed-IP filter and relay refusal are right and
kept here. So this module speaks the same protocol with its own client and server.

A dial-back here is TCP + the Noise handshake to the claimed address, authenticating the claimed
peer id, then closed: the listener there belongs to the requester. The muxer step is skipped on
purpose: the requester's swarm never registers the connection (with one connection per peer it
might otherwise trim the connection the request came on); it logs a failed inbound upgrade at debug.

The client's verdicts follow go-libp2p's ambient AutoNAT (``Judge``): the spec's "more than three
servers agree" cannot be met in a market of a handful of nodes. The address book feeds the judge
an "ok" only for an address OK'd by servers in two different networks (or one on our loopback or
LAN subnet): one hostile server's OK is no vote (``_addrs``, module docstring).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import logging
from collections import deque
from typing import Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from ._circuit import close_quietly, ip_of

__all__ = [
    "AUTONAT_PROTOCOL",
    "AutoNATLimits",
    "AutoNATServer",
    "DialOutcome",
    "Judge",
    "Reachability",
    "ask_dial_back",
    "autonat_server",
    "dialable_claims",
]

_logger = logging.getLogger(__name__)

AUTONAT_PROTOCOL = TProtocol("/libp2p/autonat/1.0.0")
#: go-libp2p's maxMsgSize: a request with 16 addresses is ~700 bytes
MAX_MESSAGE = 4096


@dataclasses.dataclass(frozen=True)
class AutoNATLimits:
    """What one AutoNAT server does for others at most (go-libp2p's defaults where it has them).

    per_peer_per_minute: requests from one peer that lead to dials, in any 60 s (go: 3).
    per_ip_per_minute: requests from one IPv4 address or IPv6 /64 that lead to dials, in any 60 s
        (throwaway peer ids from one machine share it).
    total_per_minute: requests leading to dials from everyone, in any 60 s (go: 30).
    concurrent: requests being dialled at once (one per peer at most).
    addrs_per_request: addresses dialled for one request (after the observed-IP filter).
    dial_timeout_s: one dial-back (TCP connect + Noise handshake) must finish within this.
    read_timeout_s: the request must arrive within this.
    max_request: the largest request read (bytes); a larger length prefix resets the stream.
    """

    per_peer_per_minute: int = 3
    per_ip_per_minute: int = 10
    total_per_minute: int = 30
    concurrent: int = 4
    addrs_per_request: int = 4
    dial_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    max_request: int = MAX_MESSAGE


def _ip_group(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What the per-IP limit counts: an IPv4 address, an IPv6 /64 (one subscriber's prefix)."""
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


def dialable_claims(raw_addrs: Sequence[bytes], observed_ip: str | None, requester: ID,
                    limit: int) -> list[multiaddr.Multiaddr]:
    """The claimed addresses a server may dial: ``/ip4|ip6/<ip>/tcp/<port>`` (optionally
    ``/p2p/<requester>``) whose IP is the requester's observed IP, port non-zero; deduplicated,
    at most ``limit``. Anything else (other IPs, relay, DNS, another peer id) is dropped."""
    seen_ip = ip_of(observed_ip) if observed_ip else None
    if seen_ip is None or seen_ip.is_unspecified:
        return []
    out: list[multiaddr.Multiaddr] = []
    seen: set[str] = set()
    for raw in raw_addrs[:64]:
        try:
            addr = multiaddr.Multiaddr(bytes(raw))
            names = [p.name for p in addr.protocols()]
            if names[-1:] == ["p2p"]:
                if addr.value_for_protocol("p2p") != str(requester):
                    continue
                addr = addr.decapsulate_code(multiaddr.protocols.P_P2P)
                names = names[:-1]
            if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
                continue
            ip = ip_of(addr.value_for_protocol(names[0]))
            port = int(addr.value_for_protocol("tcp"))
        except Exception:  # multiaddr raises several unrelated types
            continue
        if ip != seen_ip or not 0 < port < 65536 or str(addr) in seen:
            continue
        seen.add(str(addr))
        out.append(addr)
        if len(out) >= limit:
            break
    return out


def _response(status: int, text: str = "", addr: bytes | None = None) -> bytes:
    msg = Message()
    msg.type = Message.DIAL_RESPONSE
    msg.dialResponse.status = status  # type: ignore[assignment]
    if text:
        msg.dialResponse.statusText = text[:200]
    if addr is not None:
        msg.dialResponse.addr = addr
    return encode_varint_prefixed(msg.SerializeToString())


def _is_relayed(stream: INetStream) -> bool:
    """Fails closed: a connection whose transport addresses cannot be read counts as relayed."""
    try:
        addrs = stream.muxed_conn.get_transport_addresses()  # type: ignore[attr-defined]
    except Exception:
        return True
    return addrs is None or any("/p2p-circuit" in str(a) for a in addrs)


class AutoNATServer:
    """Answers dial-back requests (``autonat_server`` installs it on a host).

    Bounds (``AutoNATLimits``): a request is read within ``read_timeout_s`` and is at most
    ``max_request`` bytes; a peer gets at most ``per_peer_per_minute`` dialled requests and one at a
    time, one IPv4 address or IPv6 /64 (any number of peer ids) ``per_ip_per_minute``, everyone together ``total_per_minute`` and ``concurrent`` at once; each request dials at
    most ``addrs_per_request`` addresses, one after another, each within ``dial_timeout_s``. So a
    remote can make us hold at most ``concurrent`` dials of ``addrs_per_request * dial_timeout_s``
    seconds, and make at most ``total_per_minute * addrs_per_request`` outbound dials a minute, every
    one to the IP it connects from. Refused requests are answered ``E_DIAL_REFUSED`` and cost no
    dial; bookkeeping holds at most ``total_per_minute`` timestamps.

    Counters (for tests and status): ``dials`` (dial-backs attempted), ``refused``, ``bad``.
    """

    def __init__(self, host: IHost, limits: AutoNATLimits = AutoNATLimits(),
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.host = host
        self.limits = limits
        self._clock = clock
        self._recent: deque[tuple[float, ID, str]] = deque()  # accepted requests in the last minute: (when, peer, IP group)
        self._busy: set[ID] = set()
        self.dials = 0
        self.refused = 0
        self.bad = 0

    def _admit(self, peer: ID, ip_group: str = "") -> str | None:
        """Take a slot for ``peer`` (connecting from ``ip_group``, ``_ip_group``) now, or say why not."""
        now = self._clock()
        while self._recent and now - self._recent[0][0] >= 60.0:
            self._recent.popleft()
        if peer in self._busy:
            return "one request at a time"
        if len(self._busy) >= self.limits.concurrent:
            return "busy"
        if len(self._recent) >= self.limits.total_per_minute:
            return "rate limited"
        if sum(1 for _, p, _ in self._recent if p == peer) >= self.limits.per_peer_per_minute:
            return "rate limited (this peer)"
        if sum(1 for _, _, g in self._recent if g == ip_group) >= self.limits.per_ip_per_minute:
            return "rate limited (this IP)"
        self._recent.append((now, peer, ip_group))
        self._busy.add(peer)
        return None

    async def handle(self, stream: INetStream) -> None:
        """One request, one response; the stream is closed (or reset, on a malformed request)."""
        try:
            answer = await self._answer(stream)
        except Exception as exc:  # malformed, oversize, too slow: no answer owed
            self.bad += 1
            _logger.debug("bad AutoNAT request: %s", exc)
            with trio.move_on_after(1):
                await stream.reset()
            return
        try:
            with trio.move_on_after(self.limits.read_timeout_s):
                await stream.write(answer)
        except Exception as exc:
            _logger.debug("AutoNAT answer not delivered: %s", exc)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def _answer(self, stream: INetStream) -> bytes:
        peer: ID = stream.muxed_conn.peer_id  # type: ignore[attr-defined]
        if _is_relayed(stream):
            self.refused += 1
            return _response(Message.E_DIAL_REFUSED, "dial requests over relayed connections are refused")
        with trio.fail_after(self.limits.read_timeout_s):
            raw = await read_varint_prefixed_bytes_limited(stream, self.limits.max_request)
        msg = Message()
        msg.ParseFromString(raw)
        if msg.type != Message.DIAL or not msg.HasField("dial") or not msg.dial.HasField("peer"):
            return _response(Message.E_BAD_REQUEST, "expected a DIAL message")
        if msg.dial.peer.id != peer.to_bytes():
            return _response(Message.E_BAD_REQUEST, "the peer id is not the requester's")
        remote = stream.get_remote_address()
        claims = dialable_claims(list(msg.dial.peer.addrs), remote[0] if remote else None, peer,
                                 self.limits.addrs_per_request)
        if not claims:
            self.refused += 1
            return _response(Message.E_DIAL_REFUSED, "no claimed address is on the IP you connect from")
        seen = ip_of(remote[0]) if remote else None
        why = self._admit(peer, _ip_group(seen) if seen is not None else "")
        if why is not None:
            self.refused += 1
            return _response(Message.E_DIAL_REFUSED, why)
        try:
            for addr in claims:
                if await self._dial_back(peer, addr):
                    return _response(Message.OK, addr=addr.to_bytes())
            return _response(Message.E_DIAL_ERROR, "no claimed address answered")
        finally:
            self._busy.discard(peer)

    async def _dial_back(self, peer: ID, addr: multiaddr.Multiaddr) -> bool:
        """A new connection to ``addr`` authenticated as ``peer`` (TCP + Noise), then closed."""
        self.dials += 1
        swarm = self.host.get_network()
        transport = swarm.transport_manager.transport_for_dialing(addr)  # type: ignore[attr-defined]
        if transport is None:
            return False
        raw = None
        ok = False
        with trio.move_on_after(self.limits.dial_timeout_s):
            try:
                raw = await transport.dial(addr)
                secured = await swarm.upgrader.upgrade_security(raw, True, peer)  # type: ignore[attr-defined]
                ok = True
                await secured.close()
            except Exception as exc:
                _logger.debug("AutoNAT dial-back to %s failed: %s", addr, exc)
        if raw is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await raw.close()
                except Exception:  # already closed by the handshake or the secured close
                    pass
        return ok


def autonat_server(host: IHost, limits: AutoNATLimits = AutoNATLimits()) -> AutoNATServer:
    """Answer AutoNAT requests on ``host`` from now on (registers the stream handler)."""
    server = AutoNATServer(host, limits)
    host.set_stream_handler(AUTONAT_PROTOCOL, server.handle)
    return server


# ---- the client

#: servers we asked to dial us back -> until when (monotonic): their security-only dial-back makes our
#: swarm log "fail to upgrade mux" at error level; that line is expected then, and dropped
_expected_dialbacks: dict[str, float] = {}


class _DialBackLogFilter(logging.Filter):
    """Drops py-libp2p's "fail to upgrade mux for peer X" while X is a server we asked (bounded: 256)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "fail to upgrade mux for peer %s" or not record.args:
            return True
        until = _expected_dialbacks.get(str(record.args[0]))  # type: ignore[index]
        try:
            return until is None or until < trio.current_time()
        except RuntimeError:  # logged outside trio: not a dial-back of ours
            return True


logging.getLogger("libp2p.network.swarm").addFilter(_DialBackLogFilter())


@dataclasses.dataclass(frozen=True)
class DialOutcome:
    """One server's answer. status: "ok" (it reached ``addr``), "dial_error" (it dialled, nothing
    answered), "refused" (it would not dial: rate, no address on our IP), "bad_request",
    "internal_error", or "no_answer" (no stream, a malformed or late reply)."""

    status: str
    addr: multiaddr.Multiaddr | None = None
    text: str = ""


_STATUS = {Message.OK: "ok", Message.E_DIAL_ERROR: "dial_error", Message.E_DIAL_REFUSED: "refused",
           Message.E_BAD_REQUEST: "bad_request", Message.E_INTERNAL_ERROR: "internal_error"}


async def ask_dial_back(host: IHost, server: ID, addrs: Sequence[multiaddr.Multiaddr],
                        timeout_s: float = 30.0) -> DialOutcome:
    """Ask ``server`` to dial us back at ``addrs`` (at most 16 sent, without ``/p2p``).

    Never raises for the network or the server's behaviour: those are ``no_answer``. The reply is
    read within ``timeout_s`` and is at most ``MAX_MESSAGE`` bytes.
    """
    request = Message()
    request.type = Message.DIAL
    request.dial.peer.id = host.get_id().to_bytes()
    for addr in list(addrs)[:16]:
        request.dial.peer.addrs.append(addr.decapsulate_code(multiaddr.protocols.P_P2P).to_bytes())
    stream = None
    now = trio.current_time()
    for key in [k for k, t in _expected_dialbacks.items() if t < now][:64]:
        del _expected_dialbacks[key]
    if len(_expected_dialbacks) < 256:
        _expected_dialbacks[str(server)] = now + timeout_s + 5.0
    try:
        with trio.fail_after(timeout_s):
            stream = await host.new_stream(server, [AUTONAT_PROTOCOL])
            await stream.write(encode_varint_prefixed(request.SerializeToString()))
            raw = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE)
        reply = Message()
        reply.ParseFromString(raw)
        if reply.type != Message.DIAL_RESPONSE or not reply.HasField("dialResponse"):
            return DialOutcome("no_answer", text="not a DIAL_RESPONSE")
        status = _STATUS.get(reply.dialResponse.status, "internal_error")
        addr = None
        if status == "ok" and reply.dialResponse.HasField("addr"):
            try:
                addr = multiaddr.Multiaddr(bytes(reply.dialResponse.addr))
            except Exception:  # multiaddr raises several unrelated types
                addr = None
        return DialOutcome(status, addr, reply.dialResponse.statusText[:200])
    except Exception as exc:  # no stream, reset, timeout, garbage: this server told us nothing
        return DialOutcome("no_answer", text=str(exc)[:200] or type(exc).__name__)
    finally:
        if stream is not None:
            await close_quietly(stream, 1.0, shield=True)


class Reachability(enum.Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


class Judge:
    """Reachability from the servers' answers (pure), go-libp2p's ambient AutoNAT rule.

    "ok" is a vote for public, "dial_error" for private, anything else for unknown. A vote for
    public flips to public at once (someone reached us on a new connection); a vote for private
    when not private first spends ``confidence``, then flips; a vote agreeing with the status raises
    confidence up to ``MAX_CONFIDENCE``; an unknown vote lowers it, and at zero the status becomes
    unknown. So one failed dial-back turns an unknown node private, and a public node needs
    ``confidence + 1`` failures in a row to turn private.
    """

    MAX_CONFIDENCE = 3

    def __init__(self) -> None:
        self.status = Reachability.UNKNOWN
        self.confidence = 0

    def record(self, outcome: str) -> bool:
        """Take one answer (a ``DialOutcome.status``); return whether the status changed."""
        before = self.status
        if outcome == "ok":
            if self.status is not Reachability.PUBLIC:
                self.status, self.confidence = Reachability.PUBLIC, 0
            else:
                self.confidence = min(self.MAX_CONFIDENCE, self.confidence + 1)
        elif outcome == "dial_error":
            if self.status is not Reachability.PRIVATE:
                if self.confidence > 0:
                    self.confidence -= 1
                else:
                    self.status = Reachability.PRIVATE
            else:
                self.confidence = min(self.MAX_CONFIDENCE, self.confidence + 1)
        elif self.confidence > 0:
            self.confidence -= 1
        else:
            self.status = Reachability.UNKNOWN
        return self.status is not before
