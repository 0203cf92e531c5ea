"""Identify: a wildcard-listening node tells peers no 0.0.0.0 (py-libp2p 0.8.1 tells its bound
listen addresses), and what peers tell us keeps no unspecified address."""

from __future__ import annotations

import multiaddr
from libp2p.identity.identify.identify import ID as IDENTIFY
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.envelope import consume_envelope
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from node.net._addrs import AddressBook
from node.net._host import open_host
from node.net._identify import is_unspecified
from tests.node.helpers import LOOPBACK, wait_until
from tests.support import identity

WILDCARD = ["/ip4/0.0.0.0/tcp/0"]


async def _identify_of(asker, target) -> tuple[list[multiaddr.Multiaddr], list[multiaddr.Multiaddr]]:
    """(listen_addrs, signed record's addrs) that ``target`` answers ``asker`` on identify."""
    port = target.get_transport_addrs()[0].value_for_protocol("tcp")
    from libp2p.peer.peerinfo import PeerInfo

    await asker.connect(PeerInfo(target.get_id(), [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]))
    stream = await asker.new_stream(target.get_id(), [IDENTIFY])
    try:
        msg = Identify()
        msg.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 64 * 1024))
    finally:
        await stream.close()
    _, record = consume_envelope(msg.signedPeerRecord, "libp2p-peer-record")
    return [multiaddr.Multiaddr(a) for a in msg.listen_addrs], list(record.addrs)


async def test_wildcard_host_sends_no_unspecified_address_in_identify():
    async with open_host(identity("id-wild"), WILDCARD) as host, open_host(identity("id-peer"), LOOPBACK) as peer:
        book = AddressBook(host)
        listen, signed = await _identify_of(peer, host)
        assert listen and not any(is_unspecified(a) for a in listen), listen
        # the signed record is the host's one record (the same gossip and the DHT carry): the published
        # addresses, never one signed per answer (a receiver drops messages carrying an older record)
        assert {str(a).split("/p2p/")[0] for a in signed} == {a.split("/p2p/")[0] for a in book.published()}
        # the peer is on loopback: it is told our loopback address, which it can dial
        assert any(str(a).startswith("/ip4/127.0.0.1/") for a in listen), listen


async def test_without_the_book_py_libp2p_sends_the_wildcard():
    """The trap this module exists for (py-libp2p 0.8.1's own identify handler)."""
    async with open_host(identity("id-plain"), WILDCARD) as host, open_host(identity("id-peer2"), LOOPBACK) as peer:
        listen, _ = await _identify_of(peer, host)
        assert any(is_unspecified(a) for a in listen), listen


async def test_unspecified_addresses_peers_send_are_not_kept():
    async with open_host(identity("id-keeper"), LOOPBACK) as host, \
            open_host(identity("id-sloppy"), WILDCARD) as sloppy:
        AddressBook(host)  # installs the inbound filter
        port = sloppy.get_transport_addrs()[0].value_for_protocol("tcp")
        from libp2p.peer.peerinfo import PeerInfo

        await host.connect(PeerInfo(sloppy.get_id(), [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]))
        await wait_until(lambda: sloppy.get_id() in host._identified_peers, what="identify of the sloppy peer")
        kept = host.get_peerstore().addrs(sloppy.get_id())
        assert not any(is_unspecified(a) for a in kept), kept


async def test_identify_push_lists_the_peers_addresses_not_the_wildcard():
    from libp2p.identity.identify_push.identify_push import ID_PUSH, push_identify_to_peers

    async with open_host(identity("id-pusher"), WILDCARD) as host, open_host(identity("id-pushee"), LOOPBACK) as peer:
        AddressBook(host)
        got: list[Identify] = []

        async def capture(stream) -> None:
            msg = Identify()
            msg.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 64 * 1024))
            got.append(msg)
            await stream.close()

        peer.set_stream_handler(ID_PUSH, capture)
        await _identify_of(peer, host)  # connected over loopback
        await push_identify_to_peers(host)
        await wait_until(lambda: bool(got), what="the push")
        listen = [multiaddr.Multiaddr(a) for a in got[0].listen_addrs]
        assert listen and not any(is_unspecified(a) for a in listen), listen
        assert any(str(a).startswith("/ip4/127.0.0.1/") for a in listen), listen  # the pushee is on loopback
