"""The address book publishes only dialable addresses: never unspecified, loopback only when
nothing else can reach us, announced ones first; identify tells loopback only to loopback peers."""

from __future__ import annotations

import ipaddress

import multiaddr
import pytest
import trio

from node.net._addrs import AddressBook, interface_ips
from node.net._host import open_host
from tests.node.helpers import LOOPBACK
from tests.support import identity

WILDCARD = ["/ip4/0.0.0.0/tcp/0"]
REMOTE = multiaddr.Multiaddr("/ip4/203.0.113.7/tcp/4001")  # a peer on another machine (TEST-NET-3)
LOOPBACK_PEER = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001")


def _ip(addr: str | multiaddr.Multiaddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    m = multiaddr.Multiaddr(str(addr))
    name = "ip4" if "ip4" in {p.name for p in m.protocols()} else "ip6"
    return ipaddress.ip_address(m.value_for_protocol(name))


def _non_loopback_ipv4() -> list[ipaddress.IPv4Address]:
    return [ip for ip in interface_ips() if ip.version == 4 and not ip.is_loopback]


async def test_wildcard_listen_publishes_interface_addresses_not_wildcard_nor_loopback():
    interfaces = _non_loopback_ipv4()
    if not interfaces:
        pytest.skip("this machine has no non-loopback IPv4 interface")
    async with open_host(identity("addrs-wild"), WILDCARD) as host:
        book = AddressBook(host)
        published = book.published()
        port = host.get_transport_addrs()[0].value_for_protocol("tcp")
        assert published, "nothing published"
        assert all(not _ip(a).is_unspecified for a in published), published
        assert all(not _ip(a).is_loopback for a in published), published
        assert all(a.endswith(f"/p2p/{host.get_id()}") for a in published)
        assert f"/ip4/{interfaces[0]}/tcp/{port}/p2p/{host.get_id()}" in published
        # the host's own address list (DHT records, peer_addrs) says the same
        assert [str(a) for a in host.get_addrs()] == published


async def test_loopback_only_listen_publishes_loopback():
    async with open_host(identity("addrs-loop"), LOOPBACK) as host:
        book = AddressBook(host)
        published = book.published()
        assert len(published) == 1 and _ip(published[0]).is_loopback, published


async def test_for_peer_tells_loopback_only_to_loopback_peers():
    async with open_host(identity("addrs-peer"), WILDCARD) as host:
        book = AddressBook(host)
        remote = book.for_peer(REMOTE)
        unknown = book.for_peer(None)
        local = book.for_peer(LOOPBACK_PEER)
        for told in (remote, unknown):
            assert all(not _ip(a).is_loopback and not _ip(a).is_unspecified for a in told), told
        assert any(_ip(a).is_loopback for a in local), local
        assert all(not _ip(a).is_unspecified for a in local), local


async def test_loopback_only_host_tells_a_remote_peer_nothing_unusable():
    async with open_host(identity("addrs-peer-loop"), LOOPBACK) as host:
        book = AddressBook(host)
        assert book.for_peer(REMOTE) == []
        assert [str(a) for a in book.for_peer(LOOPBACK_PEER)] == [str(a) for a in host.get_transport_addrs()]


async def test_announced_address_is_published_first():
    async with open_host(identity("addrs-announce"), WILDCARD) as host:
        book = AddressBook(host, announce=("/ip4/203.0.113.5/tcp/4001", "/dns4/node.example.org/tcp/4001"))
        published = book.published()
        assert published[0] == f"/ip4/203.0.113.5/tcp/4001/p2p/{host.get_id()}"
        assert published[1] == f"/dns4/node.example.org/tcp/4001/p2p/{host.get_id()}"
        assert book.status()["announced"] == ["/ip4/203.0.113.5/tcp/4001", "/dns4/node.example.org/tcp/4001"]


@pytest.mark.parametrize("bad", ["not-an-addr", "/ip4/0.0.0.0/tcp/4001", "/ip4/203.0.113.5/tcp/0",
                                 "/ip4/203.0.113.5/udp/4001", "/ip4/203.0.113.5/tcp/4001/p2p/"
                                 "12D3KooWGSrXQQXYp31AUbZ64eJMb3hGywN4dmzpaZW3rWW22EfF"])
async def test_malformed_announce_raises_naming_it(bad):
    async with open_host(identity("addrs-bad"), LOOPBACK) as host:
        with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[").replace(".", r"\.")):
            AddressBook(host, announce=(bad,))


async def test_relay_addresses_published_only_when_a_relay_is_needed():
    async with open_host(identity("addrs-relay"), LOOPBACK) as host:
        relay = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWGSrXQQXYp31AUbZ64eJMb3hGywN4dmzpaZW3rWW22EfF/p2p-circuit"
        book = AddressBook(host, relay_addrs=lambda: [relay])
        assert not any("/p2p-circuit" in a for a in book.published())
        book._judge.record("dial_error")  # one failed dial-back: private
        assert book.reachability == "private" and book.need_relay()
        assert f"{relay}/p2p/{host.get_id()}" in book.published()
        status = book.status()
        assert status["how"] == "relay" and status["reachable"] and status["reachability"] == "private"


async def test_observed_address_is_trusted_only_from_enough_distinct_observers(monkeypatch):
    async with open_host(identity("addrs-observed"), WILDCARD) as host:
        book = AddressBook(host)
        port = host.get_transport_addrs()[0].value_for_protocol("tcp")
        seen = multiaddr.Multiaddr("/ip4/198.51.100.9/tcp/55555")
        groups = iter(["203.0.113.1", "203.0.113.1", "203.0.113.2", "203.0.113.3"])

        class Conn:
            class muxed_conn:  # noqa: N801
                @staticmethod
                def get_transport_addresses():
                    return []

                @staticmethod
                def get_remote_address():
                    return (next(groups), 1234)

        monkeypatch.setattr(host.get_network(), "get_connections", lambda peer=None: [Conn()])
        expected = f"/ip4/198.51.100.9/tcp/{port}/p2p/{host.get_id()}"
        for _ in range(3):  # two distinct observers only
            book.observe(host.get_id(), seen)
            assert expected not in book.published()
        book.observe(host.get_id(), seen)  # the third
        assert expected in book.published()
        assert book.status()["observed"] == [{"ip": "198.51.100.9", "peers": 3}]
        # AutoNAT says private: the observed address is our NAT's, not published unless a dial-back reached it
        book._judge.record("dial_error")
        assert book.reachability == "private" and expected not in book.published()
        book._judge = type(book._judge)()
        # a loopback or unspecified observation is never counted
        book.observe(host.get_id(), multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/1"))
        assert len(book.status()["observed"]) == 1


async def test_a_change_of_published_runs_the_hook_and_wakes_waiters():
    async with open_host(identity("addrs-change"), LOOPBACK) as host:
        relay = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWGSrXQQXYp31AUbZ64eJMb3hGywN4dmzpaZW3rWW22EfF/p2p-circuit"
        book = AddressBook(host, relay_addrs=lambda: [relay])
        seen: list[list[str]] = []
        book.on_change(seen.append)
        assert book.refresh() and len(seen) == 1  # the first computation
        assert not book.refresh() and len(seen) == 1  # nothing changed
        got: list[list[str]] = []

        changed = book.wait_changed()  # taken before the change

        async def waiter() -> None:
            got.append(await changed)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            book._judge.record("dial_error")  # private: the relay address joins
            assert book.refresh()
        assert got == [book.published()] == [seen[-1]]
        assert any("/p2p-circuit" in a for a in got[0])
