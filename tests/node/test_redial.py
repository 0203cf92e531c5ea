"""Reaching a restarted peer (issue #12, finding 4): back on its port it is dialled at once, not
after py-libp2p's 60 s negative cache; on a new port it is found through the DHT, or it finds
us through its peer cache; a node keeps its port across restarts; every dial failure names its
cause. Bounds are the dial's own deadline plus a measured time, never a sleep."""

from __future__ import annotations

import json
import socket
import time
from contextlib import AsyncExitStack

import nacl.pwhash
import pytest
import trio
from libp2p.peer.id import ID

from node import Home, init_home
from node._config import load_config
from node.net._dial import DialFailed, describe, dial, dialer
from node.net._host import open_host, parse_peer_addr, peer_addrs
from node.net._libp2p_fixes import NEGATIVE_CACHE_TTL_S
from node.net._market import MarketConfig, open_market
from tests.node.helpers import LOOPBACK, wait_until
from tests.support import identity

FAST_KDF = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN, "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}


def known_addrs(host, peer) -> list[str]:
    """The peerstore's addresses of ``peer``, without their /p2p/ part."""
    try:
        return [str(a).split("/p2p/")[0] for a in host.get_peerstore().addrs(peer)]
    except Exception:  # PeerStoreError: not (yet) known
        return []


def port_of(host) -> int:
    return int(parse_peer_addr(peer_addrs(host)[0]).addrs[0].value_for_protocol("tcp"))


async def test_a_peer_back_on_its_port_is_dialled_at_once_despite_libp2p_s_negative_cache():
    b_id = identity("redial-b")
    async with open_host(identity("redial-a"), LOOPBACK) as a:
        async with open_host(b_id, LOOPBACK) as b:
            info = parse_peer_addr(peer_addrs(b)[0])
            port = port_of(b)
            await a.connect(info)
        await wait_until(lambda: info.peer_id not in a.get_connected_peers(), 10, "b's connection to end")
        with pytest.raises(Exception):  # down: libp2p's own dial fails, and caches the failure for 60 s
            await a.connect(info)
        # libp2p now refuses to dial b for NEGATIVE_CACHE_TTL_S (py-libp2p: 60 s, fix 10)
        expiry = a.get_network()._negative_peer_cache._cache[str(info.peer_id)]
        assert expiry - time.monotonic() <= NEGATIVE_CACHE_TTL_S
        async with open_host(b_id, [f"/ip4/127.0.0.1/tcp/{port}"]):
            with pytest.raises(Exception, match="negative cache"):  # the trap: b is up, libp2p will not dial
                await a.connect(info)
            start = trio.current_time()
            await dial(a, info.peer_id, timeout_s=2.0)
            assert trio.current_time() - start < 0.5
            assert info.peer_id in a.get_connected_peers()


async def test_a_dial_in_progress_when_the_peer_comes_back_connects_within_a_round():
    b_id = identity("redial-b2")
    async with open_host(identity("redial-a2"), LOOPBACK) as a:
        async with open_host(b_id, LOOPBACK) as b:
            info = parse_peer_addr(peer_addrs(b)[0])
            port = port_of(b)
            await a.connect(info)
        await wait_until(lambda: info.peer_id not in a.get_connected_peers(), 10, "b's connection to end")
        connected_at: list[float] = []

        async def dialling() -> None:
            await dial(a, info.peer_id, timeout_s=10.0)
            connected_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dialling)
            await wait_until(lambda: str(info.peer_id) in dialer(a).last_failure, 5, "a refused dial")
            assert "Refused" in dialer(a).last_failure[str(info.peer_id)]  # the cause, named
            async with open_host(b_id, [f"/ip4/127.0.0.1/tcp/{port}"]):
                back = trio.current_time()
                await wait_until(lambda: bool(connected_at), 5, "the dial to connect")
        assert connected_at[0] - back < 1.5  # the longest pause between rounds is 1 s


async def test_a_peer_restarted_on_a_new_port_is_found_through_the_dht():
    config = MarketConfig(max_peers_per_subnet=0)
    b_id = identity("redial-dht-b")
    async with AsyncExitStack() as stack:
        hub_id = identity("redial-dht-hub")
        hub = await stack.enter_async_context(open_host(hub_id, LOOPBACK))
        await stack.enter_async_context(open_market(hub, hub_id, config))
        a_id = identity("redial-dht-a")
        a = await stack.enter_async_context(open_host(a_id, LOOPBACK))
        await stack.enter_async_context(open_market(a, a_id, config))
        await a.connect(parse_peer_addr(peer_addrs(hub)[0]))
        async with open_host(b_id, LOOPBACK) as b, open_market(b, b_id, config):
            old = parse_peer_addr(peer_addrs(b)[0])
            await a.connect(old)
        await wait_until(lambda: old.peer_id not in a.get_connected_peers(), 10, "b's connection to end")
        async with open_host(b_id, LOOPBACK) as b2, open_market(b2, b_id, config):
            new = parse_peer_addr(peer_addrs(b2)[0])
            assert new.addrs[0] != old.addrs[0]
            await b2.connect(parse_peer_addr(peer_addrs(hub)[0]))  # b's bootstrap: the hub learns its address
            await wait_until(lambda: str(new.addrs[0]) in known_addrs(hub, b2.get_id()), 10,
                             "identify to tell the hub b's new address")
            assert str(new.addrs[0]) not in known_addrs(a, old.peer_id)
            start = trio.current_time()
            await dial(a, old.peer_id, timeout_s=5.0)  # only the old address is known: refused
            took = trio.current_time() - start
            assert old.peer_id in a.get_connected_peers()
            assert took < 3.0, took
            # the address that worked comes first, for libp2p's own dials
            assert known_addrs(a, old.peer_id)[0] == str(new.addrs[0])


async def test_a_node_restarted_on_a_new_port_rejoins_the_peers_it_knew(tmp_path):
    cache = tmp_path / "peers.json"
    agent_id = identity("redial-agent")
    async with open_host(identity("redial-client"), LOOPBACK) as client:
        async with open_host(agent_id, LOOPBACK, peer_cache=cache) as agent:
            await client.connect(parse_peer_addr(peer_addrs(agent)[0]))
            client_id = client.get_id().to_base58()
            await wait_until(lambda: cache.exists() and client_id in json.loads(cache.read_text()), 10,
                             "the agent to remember the client")
            assert oct(cache.stat().st_mode & 0o777) == "0o600"
        await wait_until(lambda: not client.get_connected_peers(), 10, "the agent's connection to end")
        async with open_host(agent_id, LOOPBACK, peer_cache=cache) as agent2:  # a new port: the client cannot know it
            took = await wait_until(lambda: bool(client.get_connected_peers()), 5, "the agent to dial the client")
            assert took < 2.0
            # identify told the client where the agent listens now
            new = peer_addrs(agent2)[0].split("/p2p/")[0]
            await wait_until(lambda: new in known_addrs(client, agent2.get_id()), 5,
                             "the client to learn the agent's new address")


async def test_a_failed_dial_names_its_cause_within_its_deadline():
    with socket.socket() as s:  # a port nobody listens on (bound, never listening: refused)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        async with open_host(identity("redial-c"), LOOPBACK) as a:
            pid = ID.from_base58(identity("redial-ghost").peer_id)
            start = trio.current_time()
            with pytest.raises(DialFailed) as failed:
                await dial(a, pid, [f"/ip4/127.0.0.1/tcp/{port}"], timeout_s=1.0)
            assert trio.current_time() - start < 1.2
            message = str(failed.value)
            assert "ConnectionRefused" in message or "Errno" in message, message
            assert str(port) in message
            with pytest.raises(DialFailed, match="no known address"):
                await dial(a, ID.from_base58(identity("redial-none").peer_id), timeout_s=0.3)
            with pytest.raises(DialFailed, match="bad address"):
                await dial(a, pid, ["not a multiaddr"], timeout_s=0.3)


def test_describe_is_never_empty_and_names_the_root_cause():
    assert describe(trio.TooSlowError()) == "TooSlowError"
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except OSError as exc:
            raise RuntimeError("fail to open connection") from exc
    except RuntimeError as exc:
        text = describe(exc)
    assert text.startswith("RuntimeError: fail to open connection")
    assert "ConnectionRefusedError" in text and "Connect call failed" in text


def test_init_picks_a_port_and_keeps_it(tmp_path):
    init_home(tmp_path / "a", "pw", **FAST_KDF)
    init_home(tmp_path / "b", "pw", **FAST_KDF)
    a = load_config(Home(tmp_path / "a").config).listen
    b = load_config(Home(tmp_path / "b").config).listen
    assert len(a) == 1 and a[0].startswith("/ip4/0.0.0.0/tcp/")
    assert int(a[0].rsplit("/", 1)[1]) > 0
    assert load_config(Home(tmp_path / "a").config).listen == a  # saved: the same on every start
    assert b[0].startswith("/ip4/0.0.0.0/tcp/") and int(b[0].rsplit("/", 1)[1]) > 0  # each home its own pick


async def test_a_taken_port_fails_the_start_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"
        with pytest.raises(OSError) as failed:
            async with open_host(identity("redial-taken"), [addr]):
                pass
        assert addr in str(failed.value) and "\n" not in str(failed.value)
        assert failed.value.__cause__ is None and failed.value.__suppress_context__


async def test_a_port_another_node_holds_is_not_shared():
    # py-libp2p listens with SO_REUSEPORT: without the check, a second node would share the port
    # and the kernel would hand it half of the first node's connections
    async with open_host(identity("redial-first"), LOOPBACK) as first:
        addr = f"/ip4/127.0.0.1/tcp/{port_of(first)}"
        with pytest.raises(OSError, match="cannot listen on"):
            async with open_host(identity("redial-second"), [addr]):
                pass


async def test_concurrent_dials_of_one_peer_share_one_connection():
    b_id = identity("redial-burst-b")
    async with open_host(identity("redial-burst-a"), LOOPBACK) as a, open_host(b_id, LOOPBACK) as b:
        addr = peer_addrs(b)[0]
        done: list[None] = []

        async def one() -> None:
            await dial(a, b.get_id(), [addr], timeout_s=5.0)
            done.append(None)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        assert len(done) == 50
        assert len(a.get_network().get_connections(b.get_id())) == 1
        assert not dialer(a)._locks  # nothing kept once nobody waits
