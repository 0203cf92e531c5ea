"""AutoNAT: reachable claims are judged public, unanswered ones private; the server dials only the
requester's observed IP, on a new connection, and a flood from one peer is bounded."""

from __future__ import annotations

import ipaddress
import socket

import multiaddr
import pytest
import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.utils.varint import encode_varint_prefixed

from node.net._addrs import AddressBook, AddressConfig, interface_ips
from node.net._autonat import AUTONAT_PROTOCOL, AutoNATLimits, Judge, ask_dial_back, autonat_server
from node.net._host import open_host, parse_peer_addr, peer_addrs
from tests.node.helpers import LOOPBACK, wait_until
from tests.support import identity

FAST = AddressConfig(probe_unknown_s=0.2, probe_known_s=600, tick_s=0.05, server_cooldown_s=0.0)


def dead_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _connect(a, b) -> None:
    await a.connect(parse_peer_addr(peer_addrs(b)[0]))


async def test_a_host_whose_claim_dials_back_is_public():
    async with open_host(identity("an-server"), LOOPBACK) as server, \
            open_host(identity("an-client"), LOOPBACK) as client, trio.open_nursery() as nursery:
        autonat_server(server)
        book = AddressBook(client, config=FAST)
        await nursery.start(book.run)
        await _connect(client, server)
        await wait_until(lambda: book.reachability == "public", what="judged public")
        status = book.status()
        assert status["how"] == "direct" and status["reachable"] and not book.need_relay()
        assert status["confirmed"] == [str(client.get_transport_addrs()[0])]
        nursery.cancel_scope.cancel()


async def test_a_host_whose_claims_do_not_answer_is_private_though_connected():
    """It listens nowhere and announces a port nobody listens on; it is connected to the server all
    along, so a dial-back over that connection (py-libp2p's) would say OK."""
    async with open_host(identity("an-server2"), LOOPBACK) as server, \
            open_host(identity("an-natted"), []) as natted, trio.open_nursery() as nursery:
        autonat_server(server)
        book = AddressBook(natted, announce=(f"/ip4/127.0.0.1/tcp/{dead_port()}",), config=FAST)
        await nursery.start(book.run)
        await _connect(natted, server)
        await wait_until(lambda: book.reachability == "private", what="judged private")
        assert book.need_relay() and book.status()["how"] == "none"
        assert book.probes.get("dial_error", 0) >= 1 and not book.status()["confirmed"]
        nursery.cancel_scope.cancel()


async def test_py_libp2p_autonat_answers_ok_for_an_address_nobody_listens_on():
    """Why _autonat exists: py-libp2p 0.8.1's server 'dials back' over the existing connection."""
    async with open_host(identity("an-upstream"), LOOPBACK) as server, open_host(identity("an-liar"), []) as client:
        AutoNATService(server)
        await _connect(client, server)
        dead = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{dead_port()}")
        outcome = await ask_dial_back(client, server.get_id(), [dead], timeout_s=10)
        assert outcome.status == "ok"  # wrong: nothing listens there


async def test_server_refuses_an_address_off_the_requesters_observed_ip():
    async with open_host(identity("an-server3"), LOOPBACK) as server, \
            open_host(identity("an-amplifier"), LOOPBACK) as client:
        srv = autonat_server(server)
        victim = (await trio.open_tcp_listeners(0, host="127.0.0.2"))[0]  # another IP than the requester's
        port = victim.socket.getsockname()[1]
        try:
            await _connect(client, server)
            target = multiaddr.Multiaddr(f"/ip4/127.0.0.2/tcp/{port}")
            outcome = await ask_dial_back(client, server.get_id(), [target], timeout_s=10)
            assert outcome.status == "refused", outcome
            assert srv.dials == 0
            with trio.move_on_after(0.3) as cancel:
                await victim.accept()
            assert cancel.cancelled_caught, "the victim was dialled"
        finally:
            await victim.aclose()


async def test_a_flood_from_one_peer_is_bounded():
    limits = AutoNATLimits(per_peer_per_minute=3)
    async with open_host(identity("an-server4"), LOOPBACK) as server, \
            open_host(identity("an-flooder"), LOOPBACK) as client:
        srv = autonat_server(server, limits)
        await _connect(client, server)
        claim = [client.get_transport_addrs()[0]]
        outcomes = []

        async def ask() -> None:
            outcomes.append((await ask_dial_back(client, server.get_id(), claim, timeout_s=10)).status)

        for _ in range(4):  # one after another
            await ask()
        async with trio.open_nursery() as nursery:  # and all at once
            for _ in range(12):
                nursery.start_soon(ask)
        assert outcomes.count("ok") == 3, outcomes
        # refused by the server, or not let in at all (_host's stream limit: 2 AutoNAT streams a peer)
        assert outcomes.count("refused") + outcomes.count("no_answer") == 13, outcomes
        assert srv.dials == 3


async def test_oversize_or_foreign_requests_cost_no_dial():
    async with open_host(identity("an-server5"), LOOPBACK) as server, open_host(identity("an-rude"), LOOPBACK) as client:
        srv = autonat_server(server)
        await _connect(client, server)
        # a length prefix past the bound: reset without a reply
        stream = await client.new_stream(server.get_id(), [AUTONAT_PROTOCOL])
        await stream.write(encode_varint_prefixed(b"x" * 10_000))
        with pytest.raises(Exception):
            with trio.fail_after(5):
                data = await stream.read(1)
                if not data:
                    raise EOFError
        # a DIAL for another peer id: bad request
        request = Message(type=Message.DIAL)
        request.dial.peer.id = server.get_id().to_bytes()
        request.dial.peer.addrs.append(server.get_transport_addrs()[0].to_bytes())
        stream = await client.new_stream(server.get_id(), [AUTONAT_PROTOCOL])
        await stream.write(encode_varint_prefixed(request.SerializeToString()))
        from libp2p.utils.varint import read_varint_prefixed_bytes_limited

        with trio.fail_after(5):
            reply = Message()
            reply.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 4096))
        assert reply.dialResponse.status == Message.E_BAD_REQUEST
        assert srv.dials == 0 and srv.bad == 1


def test_judge_follows_the_ambient_rule():
    judge = Judge()
    assert judge.status.value == "unknown"
    assert judge.record("refused") is False and judge.status.value == "unknown"
    assert judge.record("ok") and judge.status.value == "public"
    judge.record("ok")
    judge.record("ok")  # confidence 2
    assert not judge.record("dial_error") and not judge.record("dial_error")  # spends confidence
    assert judge.record("dial_error") and judge.status.value == "private"
    assert judge.record("ok") and judge.status.value == "public"  # someone reached us: public at once


async def test_a_wildcard_host_confirmed_over_loopback_still_publishes_no_loopback():
    if not [ip for ip in interface_ips() if not ip.is_loopback]:
        pytest.skip("this machine has no non-loopback interface (loopback is then published: nothing else reaches it)")
    async with open_host(identity("an-server6"), LOOPBACK) as server, \
            open_host(identity("an-wild"), ["/ip4/0.0.0.0/tcp/0"]) as client, trio.open_nursery() as nursery:
        autonat_server(server)
        book = AddressBook(client, config=FAST)
        await nursery.start(book.run)
        await _connect(client, server)
        await wait_until(lambda: book.reachability == "public", what="judged public")
        port = client.get_transport_addrs()[0].value_for_protocol("tcp")
        assert book.status()["confirmed"] == [f"/ip4/127.0.0.1/tcp/{port}"]  # the server saw us on loopback
        assert not any(a.startswith(("/ip4/127.", "/ip4/0.0.0.0")) for a in book.published()), book.published()
        nursery.cancel_scope.cancel()


def test_throwaway_peer_ids_from_one_ip_share_its_limit():
    """The per-peer limit alone lets one machine dial-flood with fresh ids: one IPv4 or IPv6 /64 gets
    ``per_ip_per_minute`` dialled requests a minute, whatever ids it uses."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    from node.net._autonat import AutoNATServer, _ip_group

    now = [0.0]
    server = AutoNATServer(object(), AutoNATLimits(concurrent=100, per_ip_per_minute=10), clock=lambda: now[0])
    ids = [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(13)]
    group = _ip_group(ipaddress.ip_address("2001:db8:1:2::99"))
    assert group == _ip_group(ipaddress.ip_address("2001:db8:1:2:ffff::1"))  # one /64
    assert [server._admit(p, group) for p in ids[:10]] == [None] * 10
    assert server._admit(ids[10], group) == "rate limited (this IP)"
    assert server._admit(ids[11], _ip_group(ipaddress.ip_address("2001:db8:1:3::1"))) is None
    now[0] = 61.0  # a minute later the IP may ask again
    assert server._admit(ids[12], group) is None
