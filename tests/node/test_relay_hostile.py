"""Hostile peers against the relay and its client (review of issue #14, findings 4-7 and 9): throwaway
identities parking idle circuits on a provider, a DCUtR Connect naming a third party's addresses, one
IPv6 /64 taking every reservation, a relay naming a third party's IP as its own, parallel STOP
streams passing the inbound cap, and reservations kept after a relay stopped being needed."""

from __future__ import annotations

import ipaddress
import time
from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, Reservation, Status, StopMessage
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch

from node.net._circuit import read_message as _read
from node.net._circuit import write_message as _write
from node.net._dcutr import DCUTR_PROTOCOL, DCUtR
from node.net._dcutr import dcutr_targets as _dcutr_targets
from node.net._dial import dialer
from node.net._host import HostLimits, open_host, peer_addrs
from node.net._relay import (
    HOP_PROTOCOL,
    STOP_PROTOCOL,
    Relay,
    RelayClient,
    RelayLimits,
    RelayRefused,
    connection_kind,
    dial_circuit,
    serve_relay,
)
from tests.node.helpers import LOOPBACK, wait_until
from tests.node.test_relay import ECHO, relay_rig, roundtrip
from tests.support import identity


def _via(client: RelayClient) -> multiaddr.Multiaddr:
    """The relay part (``…/p2p/RELAY/p2p-circuit``) of the client's loopback circuit address."""
    (addr,) = [a for a in client.circuit_addrs() if "127.0.0.1" in a]
    return multiaddr.Multiaddr(addr.rsplit("/p2p/", 1)[0])


async def test_idle_throwaway_identities_do_not_lock_a_provider_out_of_its_relay():
    """Eight identities from one IP each hold a silent circuit to the provider: an honest consumer
    still gets through (the per-target cap is not the per-pair one); the per-pair and per-IP caps hold."""
    async with relay_rig(RelayLimits(circuits_per_ip=10)) as (relay_host, relay, (client,), consumer, _):
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        provider = client.host.get_id()
        via = _via(client)
        async with AsyncExitStack() as stack:
            sybils = [await stack.enter_async_context(open_host(identity(f"hostile-sybil-{i}"), LOOPBACK))
                      for i in range(9)]
            for sybil in sybils[:8]:
                await dial_circuit(sybil, via, provider, deadline=trio.current_time() + 10)
            assert relay.circuits[provider] == 8
            await dial_circuit(consumer, via, provider, deadline=trio.current_time() + 10)
            stream = await consumer.new_stream(provider, [ECHO])
            assert await roundtrip(stream, b"q" * 1000) == b"q" * 1000
            # one IP (127.0.0.1: all of them) holds at most circuits_per_ip = 10 circuits
            await dial_circuit(sybils[8], via, provider, deadline=trio.current_time() + 10)
            async with open_host(identity("hostile-eleventh"), LOOPBACK) as eleventh:
                with pytest.raises(RelayRefused) as info:
                    await dial_circuit(eleventh, via, provider, deadline=trio.current_time() + 10)
            assert info.value.status == "RESOURCE_LIMIT_EXCEEDED"
    # one source to one target: circuits_per_pair (2), each one a fresh hop stream
    async with relay_rig() as (relay_host, relay, (client,), consumer, _):
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        provider = client.host.get_id()
        relay_addr = multiaddr.Multiaddr(peer_addrs(relay_host)[0])
        await dialer(consumer).dial(relay_host.get_id(), [relay_addr], deadline=trio.current_time() + 10)
        answers = []
        streams = []
        for _ in range(3):
            stream = await consumer.new_stream(relay_host.get_id(), [HOP_PROTOCOL])
            await _write(stream, HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=provider.to_bytes())))
            answers.append((await _read(stream, HopMessage)).status)
            streams.append(stream)  # held open: the circuit lives while its stream does
        assert answers == [Status.OK, Status.OK, Status.RESOURCE_LIMIT_EXCEEDED]


async def test_a_silent_circuit_is_reset_by_the_relay():
    """A circuit that carries no byte either way is reset after circuit_idle_s (not at its 10 min)."""
    async with relay_rig(RelayLimits(circuit_idle_s=0.5)) as (relay_host, relay, (client,), consumer, _):
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        provider = client.host.get_id()
        await dial_circuit(consumer, _via(client), provider, deadline=trio.current_time() + 10)
        assert relay.open_circuits == 1
        await wait_until(lambda: relay.open_circuits == 0, timeout=10, what="the idle circuit reset")
        assert relay.idled == 1 and relay.cut == 0


async def test_the_provider_closes_a_relayed_connection_without_application_streams():
    """A relayed connection holds a circuit slot and an inbound slot: the provider closes it after
    RELAYED_IDLE_S with no application stream; one carrying a session stream stays."""
    async with relay_rig() as (relay_host, relay, (client,), consumer, _):
        client.RELAYED_IDLE_S = 1.0
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        provider = client.host.get_id()
        via = _via(client)
        await dial_circuit(consumer, via, provider, deadline=trio.current_time() + 10)
        stream = await consumer.new_stream(provider, [ECHO])
        async with open_host(identity("hostile-silent"), LOOPBACK) as silent:
            await dial_circuit(silent, via, provider, deadline=trio.current_time() + 10)
            assert connection_kind(client.host, silent.get_id()) == "relayed"  # accepted, then idle
            await wait_until(lambda: connection_kind(client.host, silent.get_id()) is None, timeout=10,
                             what="the silent relayed connection closed")
            assert connection_kind(client.host, consumer.get_id()) == "relayed"
            assert await roundtrip(stream, b"s" * 100) == b"s" * 100


def test_dcutr_targets_skip_what_a_peer_must_not_make_us_dial():
    raw = [multiaddr.Multiaddr(a).to_bytes() for a in (
        "/ip4/0.0.0.0/tcp/1", "/ip4/169.254.1.1/tcp/1", "/ip4/127.0.0.1/tcp/1", "/ip4/192.168.1.9/tcp/1",
        "/ip4/10.60.0.7/tcp/1", "/ip6/fe80::1/tcp/1", "/ip6/::1/tcp/1", "/ip4/224.0.0.1/tcp/1",
        "/ip4/100.64.0.9/tcp/1", "/ip4/8.8.8.8/tcp/1", "/ip4/8.8.4.4/tcp/1")]
    lan = [ipaddress.ip_network("10.60.0.0/24")]

    def chosen(nets, loopback, limit=8):
        return [str(a) for a in _dcutr_targets(raw, nets, loopback=loopback, limit=limit)]

    # 8 addresses looked at; of those, only the private one in our network (no loopback)
    assert chosen(lan, False) == ["/ip4/10.60.0.7/tcp/1"]
    assert chosen([], True) == ["/ip4/127.0.0.1/tcp/1", "/ip6/::1/tcp/1"]
    # CGNAT is no more ours than a LAN; public addresses pass, at most ``limit`` of them
    assert [str(a) for a in _dcutr_targets(raw[8:], lan, loopback=False, limit=8)] == [
        "/ip4/8.8.8.8/tcp/1", "/ip4/8.8.4.4/tcp/1"]
    public = [multiaddr.Multiaddr(f"/ip4/8.8.{i}.8/tcp/1").to_bytes() for i in range(8)]
    assert len(_dcutr_targets(public, [], loopback=False, limit=4)) == 4


async def test_a_dcutr_connect_makes_the_provider_dial_at_most_four_addresses_once():
    """A's Connect names 8 addresses of a third party: the provider dials at most DCUtR.MAX_ADDRS
    of them, once; a second relayed connection from A within DCUtR.PEER_S buys no more dials."""
    async with relay_rig() as (relay_host, relay, (client,), consumer, nursery):
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        provider = client.host.get_id()
        hits = 0
        connects = 0

        async def count(stream):
            nonlocal hits
            hits += 1
            await stream.aclose()

        listeners = []
        for _ in range(8):
            listeners.extend(await trio.open_tcp_listeners(0, host="127.0.0.2"))
        nursery.start_soon(trio.serve_listeners, count, listeners)
        victim = [multiaddr.Multiaddr(f"/ip4/127.0.0.2/tcp/{sock.socket.getsockname()[1]}").to_bytes()
                  for sock in listeners]

        async def evil_dcutr(stream):
            nonlocal connects
            connects += 1
            await _read(stream, HolePunch)
            await _write(stream, HolePunch(type=HolePunch.CONNECT, ObsAddrs=victim))
            await _read(stream, HolePunch)

        consumer.set_stream_handler(DCUTR_PROTOCOL, evil_dcutr)
        via = _via(client)
        await dial_circuit(consumer, via, provider, deadline=trio.current_time() + 10)
        await wait_until(lambda: hits >= 1, what="the provider's DCUtR dials")
        with trio.move_on_after(2):  # more would come within the dial deadline if there were rounds
            while hits <= DCUtR.MAX_ADDRS:
                await trio.sleep(0.01)
        assert 1 <= hits <= DCUtR.MAX_ADDRS and connects == 1
        for conn in list(consumer.get_network().get_connections(provider)):
            await conn.close()
        await wait_until(lambda: connection_kind(client.host, consumer.get_id()) is None, what="closed")
        before = hits
        await dial_circuit(consumer, via, provider, deadline=trio.current_time() + 10)
        with trio.move_on_after(1.5):
            while connects == 1 and hits == before:
                await trio.sleep(0.01)
        assert connects == 1 and hits == before


class _Net:
    def get_connections(self, peer=None):
        return [object()]


class _Host:
    def get_network(self):
        return _Net()

    def get_addrs(self):
        return []


class _Stream:
    def __init__(self, ip: str) -> None:
        self.written: list[bytes] = []

        class Muxed:
            @staticmethod
            def get_remote_address():
                return (ip, 4001)

        self.muxed_conn = Muxed

    async def write(self, data: bytes) -> None:
        self.written.append(data)


async def test_one_ipv6_slash64_takes_at_most_its_share_of_reservations():
    relay = Relay(_Host(), RelayLimits())  # type: ignore[arg-type]
    base = ipaddress.IPv6Address("2001:db8:1:2::")
    for i in range(20):
        await relay._reserve(_Stream(str(base + i + 1)), ID.from_pubkey(create_new_key_pair().public_key))
    assert len(relay.reservations) == RelayLimits().reservations_per_ip
    # another /64, and IPv4 addresses, each get their own
    await relay._reserve(_Stream("2001:db8:1:3::1"), ID.from_pubkey(create_new_key_pair().public_key))
    for i in range(3):
        await relay._reserve(_Stream(f"192.0.2.{i + 1}"), ID.from_pubkey(create_new_key_pair().public_key))
    assert len(relay.reservations) == RelayLimits().reservations_per_ip + 4


async def test_a_relay_cannot_make_us_publish_a_third_party_ip_as_our_circuit_address():
    """The reservation's addresses count only at the IP we reached the relay at."""
    async with open_host(identity("hostile-evil-relay"), LOOPBACK) as evil, \
            open_host(identity("hostile-prov"), LOOPBACK) as prov:
        real = multiaddr.Multiaddr(peer_addrs(evil)[0].rsplit("/p2p/", 1)[0])
        victim = multiaddr.Multiaddr("/ip4/198.51.100.77/tcp/80")

        async def hop(stream):
            await _read(stream, HopMessage)
            await _write(stream, HopMessage(type=HopMessage.STATUS, status=Status.OK, reservation=Reservation(
                expire=int(time.time()) + 3600, addrs=[victim.to_bytes(), real.to_bytes()])))
            await stream.close()

        evil.set_stream_handler(HOP_PROTOCOL, hop)
        client = RelayClient(prov)
        client._active = True
        await client.reserve(evil.get_id(), [multiaddr.Multiaddr(peer_addrs(evil)[0])])
        published = client.circuit_addrs()
        assert published and not any("198.51.100.77" in a for a in published), published
        assert all(a.startswith(f"{real}/p2p/{evil.get_id()}/p2p-circuit/") for a in published), published


async def test_parallel_stop_streams_do_not_pass_the_inbound_cap():
    """The inbound count is taken when we answer OK, not after the handshake: STOP streams whose
    handshake never comes still hold their slot (until the handshake deadline)."""
    limits = HostLimits(max_connections=12, min_connections=8, high_watermark=12, trim_to=10)  # 4 inbound
    async with open_host(identity("hostile-relay"), LOOPBACK) as relay_host, \
            open_host(identity("hostile-target"), LOOPBACK, limits=limits) as target:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_relay, relay_host, RelayLimits())
            client = RelayClient(target)
            await client.reserve(relay_host.get_id(), [multiaddr.Multiaddr(peer_addrs(relay_host)[0])])
            await nursery.start(client.run, lambda: True)
            statuses = []
            for i in range(6):
                stream = await relay_host.new_stream(target.get_id(), [STOP_PROTOCOL])
                src = ID.from_pubkey(create_new_key_pair().public_key)
                await _write(stream, StopMessage(type=StopMessage.CONNECT, peer=PeerId(id=src.to_bytes())))
                statuses.append((await _read(stream, StopMessage)).status)  # then silence: no Noise
            assert statuses.count(Status.OK) == 4 and statuses[4:] == [Status.RESOURCE_LIMIT_EXCEEDED] * 2
            nursery.cancel_scope.cancel()


async def test_reservations_are_forgotten_when_a_relay_is_no_longer_needed():
    async with relay_rig() as (relay_host, relay, (client,), consumer, _):
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        client.need = False
        await wait_until(lambda: not client.held, what="the reservation forgotten")
        client.need = True
        await wait_until(lambda: client.circuit_addrs(), what="a reservation again")
