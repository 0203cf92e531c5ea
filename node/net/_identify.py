"""Identify tells each peer only addresses it can use, and keeps no unspecified address a peer sends.

Rules (checked against py-libp2p 0.8.1 only: ``apply`` refuses any other version, as
``_libp2p_fixes.apply`` does):

- Our ``/ipfs/id/1.0.0`` answer and our ``/ipfs/id/push/1.0.0`` pushes list ``addrs_for(remote)``
  (``install_identify``; the address book's ``for_peer``), where ``remote`` is the peer's address on
  that connection, and carry the host's one signed peer record (``env_to_send_in_RPC``: the
  published addresses, the record gossip and the DHT carry too; one signed per answer would make
  those look stale to the peer, which drops them). py-libp2p's own
  handler lists ``host.get_addrs()``: the listen addresses as bound, ``/ip4/0.0.0.0/tcp/…`` for a
  wildcard listen, which no peer can dial, and loopback to a peer on another machine.
- What peers tell us (an identify answer or push): unspecified addresses (``0.0.0.0``, ``::``) and
  port 0 are dropped from ``listen_addrs``; a signed peer record listing one is ignored (its
  signature covers the list, it cannot be trimmed), so our peerstore never dials them.
- What peers tell us is looked at only up to ``MAX_PEER_ADDRS`` listen addresses (the rest are
  dropped unparsed: a 1 MiB message holds ~100k addresses, and parsing each froze the event loop
  for ~6 s); a signed peer record listing more than ``MAX_PEER_ADDRS`` is dropped after counting its
  entries (protobuf only, no multiaddr parsed). Our node lists at most 16 + loopback.
- An identify push is read with ``PUSH_READ_LIMIT`` (64 KiB; py-libp2p's handler reads 1 MiB)
  within ``PUSH_READ_TIMEOUT_S`` (``install_identify`` replaces py-libp2p's push handler).
- Each answer we receive hands ``(peer, observed_addr)`` to the observer installed for that host,
  so the address book counts how peers see us.

Bounds: an identify answer is written within ``WRITE_TIMEOUT_S``; its address list is at most what
``addrs_for`` returns (the book caps it at 16 + loopback). A push we receive costs at most
``PUSH_READ_LIMIT`` bytes and ``MAX_PEER_ADDRS`` multiaddr parses (plus py-libp2p's own parse of
the addresses kept: at most ``MAX_PEER_ADDRS``).
"""

from __future__ import annotations

import logging
import weakref
from importlib.metadata import version
from typing import Any, Callable

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.host import basic_host as _basic_host
from libp2p.identity.identify import identify as _identify
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.identify_push import identify_push as _push
from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID
from libp2p.peer.pb.envelope_pb2 import Envelope
from libp2p.peer.pb.peer_record_pb2 import PeerRecord
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils import varint
from libp2p.utils.varint import read_length_prefixed_protobuf

from ._libp2p_fixes import PINNED_LIBP2P

__all__ = ["apply", "install_identify", "is_unspecified", "MAX_PEER_ADDRS", "PUSH_READ_LIMIT", "WRITE_TIMEOUT_S"]

_logger = logging.getLogger(__name__)
WRITE_TIMEOUT_S = 10.0
#: listen addresses of a peer we look at (and keep); a signed record listing more is dropped
MAX_PEER_ADDRS = 64
#: the largest identify push read (64 addresses of ~50 bytes, protocols and a record fit in ~8 KiB)
PUSH_READ_LIMIT = 64 * 1024
PUSH_READ_TIMEOUT_S = 10.0
_applied = False
_original_update = _basic_host.update_peerstore_from_identify
_original_push = _push.push_identify_to_peer

#: host -> (addrs_for, observer); weak so a closed host is forgotten
_installed: "weakref.WeakKeyDictionary[Any, tuple[Callable[[multiaddr.Multiaddr | None], list[multiaddr.Multiaddr]], Callable[[ID, multiaddr.Multiaddr], None] | None]]" = weakref.WeakKeyDictionary()
#: peerstore -> the host it belongs to (the update hook only sees the peerstore)
_by_peerstore: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def is_unspecified(addr: multiaddr.Multiaddr) -> bool:
    """``/ip4/0.0.0.0/…``, ``/ip6/::/…`` or a TCP port 0: an address nobody can dial."""
    try:
        for name in ("ip4", "ip6"):
            if name in {p.name for p in addr.protocols()}:
                if addr.value_for_protocol(name) in ("0.0.0.0", "::", "0:0:0:0:0:0:0:0"):
                    return True
        if "tcp" in {p.name for p in addr.protocols()} and int(addr.value_for_protocol("tcp")) == 0:
            return True
    except Exception:  # multiaddr raises several unrelated types
        return True
    return False


def _remote_multiaddr(remote: tuple[str, int] | None) -> multiaddr.Multiaddr | None:
    try:
        return _identify._remote_address_to_multiaddr(remote)
    except Exception:
        return None


def _message(host: IHost, addrs: list[multiaddr.Multiaddr], observed: multiaddr.Multiaddr | None) -> bytes:
    """An Identify message listing ``addrs``, with the host's signed peer record.

    The record is the one py-libp2p attaches to every gossip and DHT message (``env_to_send_in_RPC``:
    the host's published addresses, re-signed only when they change), never one signed for this
    answer alone: a receiver refuses a record older than the last it accepted, and it drops the whole
    gossip message or DHT stream carrying it. A fresh record per identify answer made every later
    gossip message and DHT request of ours look stale to its peers: no listing travelled at all."""
    plain = [_identify._strip_p2p_suffix(a) for a in addrs]
    envelope_bytes, _ = env_to_send_in_RPC(host)
    msg = Identify(
        protocol_version=_identify.PROTOCOL_VERSION,
        agent_version=_identify.AGENT_VERSION,
        public_key=host.get_public_key().serialize(),
        listen_addrs=[a.to_bytes() for a in plain],
        observed_addr=observed.to_bytes() if observed is not None else b"",
        protocols=tuple(str(p) for p in host.get_mux().get_protocols() if p is not None),
        signedPeerRecord=envelope_bytes,
    )
    data = msg.SerializeToString()
    return varint.encode_uvarint(len(data)) + data


def install_identify(host: IHost, addrs_for: Callable[[multiaddr.Multiaddr | None], list[multiaddr.Multiaddr]],
                     observer: Callable[[ID, multiaddr.Multiaddr], None] | None = None) -> None:
    """Answer identify on ``host`` with ``addrs_for(remote address)``, push the same way, and hand
    every observed address peers report to ``observer(peer, addr)``.

    Raises:
        RuntimeError: the installed libp2p is not the version this was checked against.
    """
    apply()
    _installed[host] = (addrs_for, observer)
    _by_peerstore[host.get_peerstore()] = host

    async def handle_identify(stream: INetStream) -> None:
        observed = _remote_multiaddr(stream.get_remote_address())
        peer = stream.muxed_conn.peer_id  # type: ignore[attr-defined]
        try:
            # a relayed connection's socket is the relay's: report the circuit as py-libp2p does
            observed = _identify._prefer_circuit_addr(host, peer, observed)
            data = _message(host, addrs_for(observed), observed)
            with trio.fail_after(WRITE_TIMEOUT_S):
                await stream.write(data)
        except Exception as exc:
            _logger.debug("identify answer to %s not delivered: %s", peer, exc)
            with trio.move_on_after(1):
                await stream.reset()
            return
        with trio.move_on_after(1):
            await stream.close()

    host.set_stream_handler(_identify.ID, handle_identify)

    async def handle_push(stream: INetStream) -> None:
        """py-libp2p's push handler with a 64 KiB read (its own reads up to 1 MiB)."""
        peer = stream.muxed_conn.peer_id  # type: ignore[attr-defined]
        try:
            with trio.fail_after(PUSH_READ_TIMEOUT_S):
                data = await read_length_prefixed_protobuf(stream, True, PUSH_READ_LIMIT)
            msg = Identify()
            msg.ParseFromString(data)
            await _update_peerstore_from_identify(host.get_peerstore(), peer, msg)
        except Exception as exc:  # oversize, slow, garbage: the push is ignored
            _logger.debug("identify push from %s ignored: %s", peer, exc)
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass
            return
        with trio.move_on_after(1):
            try:
                await stream.close()
            except Exception:
                pass

    host.set_stream_handler(_push.ID_PUSH, handle_push)


def _remote_of(host: IHost, peer: ID) -> multiaddr.Multiaddr | None:
    for conn in host.get_network().get_connections(peer):
        try:
            return _remote_multiaddr(conn.muxed_conn.get_remote_address())  # type: ignore[attr-defined]
        except Exception:
            continue
    return None


async def _push_identify_to_peer(host: IHost, peer_id: ID, observed_multiaddr: multiaddr.Multiaddr | None = None,
                                 limit: trio.CapacityLimiter | None = None, use_varint_format: bool = True) -> bool:
    """py-libp2p's ``push_identify_to_peer``, listing ``addrs_for(peer's address)`` on hosts with
    ``install_identify``; unchanged elsewhere."""
    entry = _installed.get(host)
    if entry is None or not use_varint_format:
        return await _original_push(host, peer_id, observed_multiaddr, limit, use_varint_format)
    addrs_for = entry[0]
    if limit is None:
        limit = _push._get_push_capacity()
    async with limit:
        stream = None
        try:
            with trio.fail_after(WRITE_TIMEOUT_S):
                stream = await host.new_stream(peer_id, [_push.ID_PUSH])
                await stream.write(_message(host, addrs_for(_remote_of(host, peer_id)), observed_multiaddr))
                await stream.close()
            return True
        except Exception as exc:
            _logger.debug("identify push to %s failed: %s", peer_id, exc)
            if stream is not None:
                with trio.move_on_after(1):
                    try:
                        await stream.reset()
                    except Exception:
                        pass
            return False


def _record_addr_count(envelope: bytes) -> int | None:
    """How many addresses a signed peer record lists (protobuf only: no multiaddr, no signature
    check); None when it is not an envelope holding a peer record (py-libp2p rejects it itself)."""
    try:
        env = Envelope()
        env.ParseFromString(envelope)
        record = PeerRecord()
        record.ParseFromString(env.payload)
        return len(record.addresses)
    except Exception:  # protobuf's DecodeError and friends
        return None


def _without_unspecified(msg: Identify) -> Identify:
    """``msg`` with its first ``MAX_PEER_ADDRS`` listen addresses less unspecified ones, and less a
    signed record listing one or listing more than ``MAX_PEER_ADDRS``."""
    keep = []
    dropped = max(0, len(msg.listen_addrs) - MAX_PEER_ADDRS)
    for raw in msg.listen_addrs[:MAX_PEER_ADDRS]:
        try:
            addr = multiaddr.Multiaddr(raw)
        except Exception:  # py-libp2p skips unparseable ones itself
            keep.append(raw)
            continue
        if is_unspecified(addr):
            dropped += 1
        else:
            keep.append(raw)
    record_bad = False
    if msg.HasField("signedPeerRecord"):
        count = _record_addr_count(msg.signedPeerRecord)
        if count is not None and count > MAX_PEER_ADDRS:
            record_bad = True
        else:
            try:
                _, record = consume_envelope(msg.signedPeerRecord, "libp2p-peer-record")
                record_bad = any(is_unspecified(a) for a in record.addrs)
            except Exception:  # py-libp2p rejects a bad envelope itself
                record_bad = False
    if not dropped and not record_bad:
        return msg
    clean = Identify()
    clean.CopyFrom(msg)
    del clean.listen_addrs[:]
    clean.listen_addrs.extend(keep)
    if record_bad:
        clean.ClearField("signedPeerRecord")
    return clean


async def _update_peerstore_from_identify(peerstore: Any, peer_id: ID, identify_msg: Identify) -> None:
    """py-libp2p's ``update_peerstore_from_identify`` on a message without unspecified addresses;
    then the observed address goes to the host's observer."""
    await _original_update(peerstore, peer_id, _without_unspecified(identify_msg))
    host = _by_peerstore.get(peerstore)
    entry = _installed.get(host) if host is not None else None
    if entry is None or entry[1] is None or not identify_msg.observed_addr:
        return
    try:
        observed = multiaddr.Multiaddr(identify_msg.observed_addr)
    except Exception:  # a peer's garbage
        return
    try:
        entry[1](peer_id, observed)
    except Exception as exc:  # never let bookkeeping break identify
        _logger.debug("observed-address observer failed: %s", exc)


def apply() -> None:
    """Install the module-level hooks (idempotent): pushes per peer, inbound filtering.

    Raises:
        RuntimeError: the installed libp2p is not the version this was checked against.
    """
    global _applied
    if _applied:
        return
    installed = version("libp2p")
    if installed != PINNED_LIBP2P:
        raise RuntimeError(f"libp2p {installed} installed; node/net/_identify is checked against {PINNED_LIBP2P} only")
    _push.push_identify_to_peer = _push_identify_to_peer  # type: ignore[assignment]
    _basic_host.update_peerstore_from_identify = _update_peerstore_from_identify  # type: ignore[assignment]
    _push.update_peerstore_from_identify = _update_peerstore_from_identify  # type: ignore[assignment]
    _applied = True
