"""Circuit relay v2: a provider with only a relayed address is reachable; the relay's limits hold
and it keeps serving; garbage on the hop protocol does not hurt it."""

from __future__ import annotations

import functools
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Status

from node.net._circuit import read_message as _read
from node.net._circuit import write_message as _write
from node.net._dial import DialFailed, dialer
from node.net._host import connection_manager, open_host, parse_peer_addr, peer_addrs
from node.net._relay import HOP_PROTOCOL, RelayClient, RelayLimits, RelayRefused, serve_relay
from tests.node.helpers import LOOPBACK, wait_until
from tests.support import identity

ECHO = "/test/echo/1.0.0"


async def echo(stream):
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    await stream.close()


@asynccontextmanager
async def relay_rig(limits: RelayLimits = RelayLimits(), providers: int = 1):
    """R serving the relay role, providers each reserving on R, and a consumer A knowing neither."""
    async with AsyncExitStack() as stack:
        relay_host = await stack.enter_async_context(open_host(identity("relay-R"), LOOPBACK))
        hosts = [await stack.enter_async_context(open_host(identity(f"relay-P{i}"), LOOPBACK)) for i in range(providers)]
        consumer = await stack.enter_async_context(open_host(identity("relay-A"), LOOPBACK))
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(serve_relay, relay_host, limits)
            clients = []
            for host in hosts:
                host.set_stream_handler(ECHO, echo)
                client = RelayClient(host)
                client.add_relay(peer_addrs(relay_host)[0])
                client.need = True  # a test may stop one wanting a relay
                await nursery.start(client.run, lambda c=client: c.need)
                clients.append(client)
            try:
                yield relay_host, relay, clients, consumer, nursery
            finally:
                nursery.cancel_scope.cancel()


async def roundtrip(stream, payload: bytes) -> bytes:
    await stream.write(payload)
    got = b""
    while len(got) < len(payload):
        got += await stream.read(65536)
    return got


async def test_consumer_reaches_provider_through_the_relay_only():
    async with relay_rig() as (relay_host, relay, (client,), consumer, _):
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        provider = client.host.get_id()
        (circuit,) = [a for a in client.circuit_addrs() if "127.0.0.1" in a]
        assert circuit.endswith(f"/p2p-circuit/p2p/{provider}") and f"/p2p/{relay_host.get_id()}/" in circuit
        await dialer(consumer).dial(provider, [multiaddr.Multiaddr(circuit)], deadline=trio.current_time() + 10)
        assert client.connection_kind(consumer.get_id()) == "relayed"
        stream = await consumer.new_stream(provider, [ECHO])
        payload = bytes(range(256)) * 64  # 16 KiB each way
        assert await roundtrip(stream, payload) == payload
        # the relayed connection carries a session-like stream: the connection manager keeps it,
        # however long past its grace and idle time
        (conn,) = consumer.get_network().get_connections(provider)
        first, rest, _ = connection_manager(consumer).candidates(trio.current_time())
        first, rest, _ = connection_manager(consumer).candidates(trio.current_time() + 3600)
        assert conn not in first + rest
        await stream.close()
        assert relay.open_circuits == 1


async def test_relay_refuses_over_reservation_and_circuit_limits_and_keeps_serving():
    limits = RelayLimits(reservations=2, circuits=1)
    async with relay_rig(limits, providers=3) as (relay_host, relay, clients, consumer, nursery):
        await wait_until(lambda: sum(bool(c.circuit_addrs()) for c in clients) == 2, what="two reservations")
        await wait_until(lambda: relay.refused.get("reservations", 0) >= 1, what="the third refused")
        refused = next(c for c in clients if not c.held)
        with pytest.raises(RelayRefused) as info:
            await refused.reserve(relay_host.get_id(), [multiaddr.Multiaddr(peer_addrs(relay_host)[0])])
        assert info.value.status == "RESERVATION_REFUSED"
        a, b = [c for c in clients if c.held]
        via = f"{peer_addrs(relay_host)[0]}/p2p-circuit"
        await dialer(consumer).dial(a.host.get_id(), [multiaddr.Multiaddr(via)], deadline=trio.current_time() + 10)
        with pytest.raises(DialFailed, match="RESOURCE_LIMIT_EXCEEDED"):  # one circuit in all
            await dialer(consumer).dial(b.host.get_id(), [multiaddr.Multiaddr(via)], deadline=trio.current_time() + 1)
        # a fresh honest peer once a holder left: its reservation and circuit work
        a.need = False  # (else it would take its slot back)
        await wait_until(lambda: not a.circuit_addrs(), what="a no longer reserving")
        for conn in list(a.host.get_network().get_connections()):
            await conn.close()
        await wait_until(lambda: relay.open_circuits == 0, what="the circuit released")
        async with open_host(identity("relay-fresh"), LOOPBACK) as fresh:
            fresh.set_stream_handler(ECHO, echo)
            fc = RelayClient(fresh)
            await fc.reserve(relay_host.get_id(), [multiaddr.Multiaddr(peer_addrs(relay_host)[0])])
            await nursery.start(fc.run, lambda: True)
            await dialer(consumer).dial(fresh.get_id(), [multiaddr.Multiaddr(fc.circuit_addrs()[0])],
                                        deadline=trio.current_time() + 10)
            stream = await consumer.new_stream(fresh.get_id(), [ECHO])
            assert await roundtrip(stream, b"x" * 5000) == b"x" * 5000


@pytest.mark.parametrize("cut", ["bytes", "duration"])
async def test_circuit_past_its_byte_or_duration_limit_is_cut(cut):
    limits = RelayLimits(circuit_bytes=64 * 1024) if cut == "bytes" else RelayLimits(circuit_duration_s=1.0)
    async with relay_rig(limits) as (relay_host, relay, (client,), consumer, _):
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        provider = client.host.get_id()
        await dialer(consumer).dial(provider, [multiaddr.Multiaddr(client.circuit_addrs()[0])],
                                    deadline=trio.current_time() + 10)
        stream = await consumer.new_stream(provider, [ECHO])
        assert await roundtrip(stream, b"y" * 1000) == b"y" * 1000
        with pytest.raises(Exception):
            with trio.fail_after(10):
                if cut == "bytes":
                    while True:  # Noise + Yamux framing count too: the 64 KiB pass within ~60 KiB of payload
                        await roundtrip(stream, b"z" * 8192)
                else:
                    await stream.read(10)  # nothing comes: the cut at 1 s resets it (or ends it)
                    raise RuntimeError("stream ended")
        await wait_until(lambda: relay.cut == 1 and relay.open_circuits == 0, what="the circuit cut")
        await wait_until(lambda: client.connection_kind(consumer.get_id()) is None, what="the relayed connection gone")


async def test_garbage_on_the_hop_protocol_does_not_crash_the_relay():
    async with relay_rig() as (relay_host, relay, (client,), consumer, _):
        await consumer.connect(parse_peer_addr(peer_addrs(relay_host)[0]))
        for garbage in (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x05\x08\xff\xff", b"\x03abc",
                        b"\x80\x80\x04" + b"a" * 100):
            stream = await consumer.new_stream(relay_host.get_id(), [HOP_PROTOCOL])
            await stream.write(garbage)
            await stream.close()  # a truncated message ends here, not at the relay's read deadline
            try:
                with trio.fail_after(5):
                    reply = await _read(stream, HopMessage)
                assert reply.status in (Status.MALFORMED_MESSAGE, Status.UNEXPECTED_MESSAGE)
            except ValueError:  # closed without an answer is fine too
                pass
        stream = await consumer.new_stream(relay_host.get_id(), [HOP_PROTOCOL])
        await _write(stream, HopMessage(type=HopMessage.STATUS))  # a message the relay never expects
        assert (await _read(stream, HopMessage)).status == Status.UNEXPECTED_MESSAGE
        # still serves: a circuit to the provider
        await wait_until(lambda: client.circuit_addrs(), what="a reservation")
        await dialer(consumer).dial(client.host.get_id(), [multiaddr.Multiaddr(client.circuit_addrs()[0])],
                                    deadline=trio.current_time() + 10)
        assert relay.refused["malformed"] >= 3


async def test_relays_are_found_by_identify_and_through_the_dht():
    """Nobody configures a relay: P finds R among its connected peers (identify lists the hop
    protocol); Q, connected only to a DHT peer D, finds R's provider record."""
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.tools.anyio_service import background_trio_service

    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(open_host(identity(f"find-{n}"), LOOPBACK)) for n in "RDPQ"]
        r, d, p, q = hosts
        dhts = [KadDHT(h, DHTMode.SERVER, max_peers_per_subnet=100) for h in (r, d, q)]
        for dht in dhts:
            await stack.enter_async_context(background_trio_service(dht))
        await d.connect(parse_peer_addr(peer_addrs(r)[0]))
        await q.connect(parse_peer_addr(peer_addrs(d)[0]))
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_relay, r, RelayLimits(), dht=dhts[0]))
            await p.connect(parse_peer_addr(peer_addrs(r)[0]))
            by_identify = RelayClient(p)
            await nursery.start(by_identify.run, lambda: True)
            by_dht = RelayClient(q, dht=dhts[2])
            by_dht.DHT_QUERY_S = 0.5
            await nursery.start(by_dht.run, lambda: True)
            await wait_until(lambda: by_identify.circuit_addrs(), what="a relay found by identify")
            await wait_until(lambda: by_dht.circuit_addrs(), what="a relay found through the DHT")
            assert all(f"/p2p/{r.get_id()}/p2p-circuit/" in a for a in by_dht.circuit_addrs())
            nursery.cancel_scope.cancel()
