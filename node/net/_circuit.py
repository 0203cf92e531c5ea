"""What the relay, DCUtR, AutoNAT and the address book share: IPs and direct addresses, relayed
versus direct connections, and length-prefixed protobuf messages on a stream with bounded reads.

Rules: a remote party's address list is never parsed past the caller's ``limit``; every message
read has a deadline (``MESSAGE_TIMEOUT_S``) and a size cap (``MAX_MESSAGE``, go-libp2p's for circuit
and DCUtR messages); closing or resetting a stream that is already gone is not an error.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from ._dial import describe

__all__ = ["MAX_MESSAGE", "MESSAGE_TIMEOUT_S", "IP", "ip_of", "direct_addrs", "is_circuit", "is_relayed_conn",
           "live_conns", "connection_kind", "carries_app_stream", "write_message", "read_message", "reset_quietly",
           "close_quietly"]

MAX_MESSAGE = 4096  # go-libp2p's cap on a circuit or DCUtR message
MESSAGE_TIMEOUT_S = 10.0  # one message read, one STOP/CONNECT round trip

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_of(value: Any) -> IP | None:
    """The IP of a ``/ip4|ip6/…`` multiaddr or of an IP's text (a zone dropped, an IPv4-mapped IPv6
    address as its IPv4), else None."""
    try:
        if isinstance(value, multiaddr.Multiaddr):
            names = [p.name for p in value.protocols()]
            value = value.value_for_protocol(names[0]) if names and names[0] in ("ip4", "ip6") else ""
        ip = ipaddress.ip_address(str(value).split("%", 1)[0])
    except Exception:  # not an IP address
        return None
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def direct_addrs(addrs: Sequence[Any], limit: int) -> list[multiaddr.Multiaddr]:
    """The TCP-on-IP, non-circuit addresses among ``addrs`` (multiaddrs, their text or bytes), at most
    ``limit``; what does not parse is skipped."""
    out = []
    for raw in addrs:
        try:
            addr = multiaddr.Multiaddr(raw)
        except Exception:  # a peer's garbage: skipped
            continue
        names = {p.name for p in addr.protocols()}
        if "tcp" in names and "p2p-circuit" not in names and names & {"ip4", "ip6"}:
            out.append(addr)
        if len(out) >= limit:
            break
    return out


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


def is_relayed_conn(conn: Any) -> bool:
    try:
        return conn.get_connection_type() == ConnectionType.RELAYED
    except Exception:
        return False


def live_conns(host: IHost, peer: ID) -> list[Any]:
    return [c for c in host.get_network().get_connections(peer) if not getattr(c, "is_closed", False)]


def connection_kind(host: IHost, peer: ID) -> str | None:
    """"direct" if ``host`` has a direct connection to ``peer``, "relayed" if only a relayed one, else None."""
    conns = live_conns(host, peer)
    if not conns:
        return None
    return "relayed" if all(is_relayed_conn(c) for c in conns) else "direct"


def carries_app_stream(conn: Any) -> bool:
    """Whether ``conn`` has a stream open on a protocol that is not background chatter
    (``_host.BACKGROUND_PROTOCOLS``): a session, an escrow request."""
    from ._host import BACKGROUND_PROTOCOLS

    for stream in getattr(conn, "get_streams", lambda: ())():
        protocol = str(stream.get_protocol() or "")
        if protocol and not protocol.startswith(BACKGROUND_PROTOCOLS):
            return True
    return False


async def write_message(stream: Any, msg: Any) -> None:
    """One protobuf message, varint-prefixed, within ``MESSAGE_TIMEOUT_S``."""
    with trio.fail_after(MESSAGE_TIMEOUT_S):
        await stream.write(encode_varint_prefixed(msg.SerializeToString()))


async def read_message(stream: Any, cls: type) -> Any:
    """One message of ``cls`` within ``MESSAGE_TIMEOUT_S`` and ``MAX_MESSAGE`` bytes.

    Raises:
        ValueError: malformed, too large, or the stream ended (the cause chained).
        trio.TooSlowError: not within the deadline.
    """
    with trio.fail_after(MESSAGE_TIMEOUT_S):
        try:
            data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE)
        except trio.TooSlowError:
            raise
        except Exception as exc:
            raise ValueError(f"unreadable message: {describe(exc)}") from exc
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise ValueError(f"malformed {cls.__name__}") from exc
    return msg


async def reset_quietly(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # already gone
        pass


async def close_quietly(thing: Any, timeout_s: float = 5.0, *, shield: bool = False) -> None:
    """Close ``thing`` (a stream, a connection) within ``timeout_s``; with ``shield``, even while
    the caller is being cancelled (a ``finally`` that must not leave the stream open)."""
    with trio.CancelScope(shield=shield), trio.move_on_after(timeout_s):
        try:
            await thing.close()
        except Exception:  # already gone
            pass
