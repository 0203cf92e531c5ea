"""The DHT under attack (issue #11, finding 8): junk records outside our namespace are neither
stored nor served, idle DHT streams cannot lock honest queries out, the stores are bounded, and
Sybil provider records cannot push an honest provider out of ``Market.lookup``."""

from __future__ import annotations

import types

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.kad_dht import _encode_key
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from node.net import _libp2p_fixes
from node.net._libp2p_fixes import (
    DHT_MAX_PROVIDER_ADDRS,
    DHT_MAX_PROVIDER_KEYS,
    DHT_MAX_VALUE_BYTES,
    DHT_MAX_VALUES,
)
from node.net._market import model_key
from tests.node.helpers import listing_template, market_swarm, until_found_by_a_late_node, until_market, wait_until
from tests.node.hostile import KAD, Hostile, add_provider, hostile, put_value, rss_bytes, send_kad

MiB = 1 << 20


def random_peer() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


async def test_junk_records_outside_our_namespace_are_not_stored_and_the_node_keeps_serving():
    async with market_swarm(3, prefix="junk") as (stack, markets):
        rogue = await stack.enter_async_context(hostile())  # in the stack: it outlives join()'s hosts
        victim, provider, witness = markets
        conn = await rogue.connect(victim.host)
        before = rss_bytes()
        for i in range(100):  # 100 x 200 KB junk, under keys without a validator or forged in ours
            key = f"junk-{i}".encode() if i % 2 else f"/isw/{i:040x}".encode()
            stream = await Hostile.open(conn, KAD)
            await send_kad(stream, put_value(key, bytes([i % 251]) * 200_000))
        for i in range(5):  # 1 MB requests: over the request cap, refused unread
            stream = await Hostile.open(conn, KAD)
            await send_kad(stream, put_value(f"big-{i}".encode(), b"B" * MiB))
        stored = victim.dht.value_store.store
        assert not [k for k in stored if k.startswith((b"junk-", b"big-", b"/isw/0"))]
        assert rss_bytes() - before < 32 * MiB
        # the victim still serves the DHT and gossip
        provider.set_listing(listing_template())
        pid = provider.identity.peer_id
        await until_market(witness, lambda m: m.view.listing(pid, m.now()) is not None, what="gossip")
        await until_found_by_a_late_node(stack, victim, pid, "junk-late", what="DHT lookup after junk")


async def test_a_dht_stream_trickling_bytes_inside_every_read_deadline_is_still_cut_off(monkeypatch):
    monkeypatch.setattr(_libp2p_fixes, "KAD_READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(_libp2p_fixes, "KAD_STREAM_LIFETIME_S", 1.0)
    async with market_swarm(1, prefix="kadtrickle") as (stack, markets):
        rogue = await stack.enter_async_context(hostile())
        stream = await Hostile.open(await rogue.connect(markets[0].host), KAD)
        await stream.write(bytes([0xE8, 0x07]))  # a 1,000-byte request announced, then sent slowly
        cut_off = False
        with trio.fail_after(10):
            try:
                while True:  # one byte per 0.2 s: every read finishes well inside its deadline
                    await stream.write(b"x")
                    await trio.sleep(0.2)
            except Exception:  # reset by the victim
                cut_off = True
        assert cut_off


async def test_idle_dht_streams_are_cut_off_and_do_not_lock_out_honest_queries(monkeypatch):
    monkeypatch.setattr(_libp2p_fixes, "KAD_READ_TIMEOUT_S", 0.5)
    async with market_swarm(2, prefix="kadidle") as (stack, markets):
        rogue = await stack.enter_async_context(hostile())  # in the stack: it outlives join()'s hosts
        victim, provider = markets
        idle = []
        for _ in range(9):  # 72 idle DHT streams: more than the 64 served at once, none ever timed out by py-libp2p
            conn = await rogue.connect(victim.host)
            for _ in range(8):
                try:
                    idle.append(await Hostile.open(conn, KAD))
                except Exception:  # refused at open (a cap, or an early one timed out meanwhile): cut off already
                    pass
        provider.set_listing(listing_template())
        pid = provider.identity.peer_id
        await until_found_by_a_late_node(stack, victim, pid, "kadidle-late", what="honest DHT lookup beside idle streams")

        async def reset(stream):
            try:
                return await stream.read(1) == b""
            except Exception:
                return True

        with trio.fail_after(5):
            assert all([await reset(s) for s in idle])


async def test_sybil_provider_records_do_not_push_the_honest_provider_out_of_lookup():
    async with market_swarm(2, prefix="sybilprov") as (stack, markets):
        rogue = await stack.enter_async_context(hostile())  # in the stack: it outlives join()'s hosts
        victim, provider = markets
        key = _encode_key(model_key("tiny"))
        for _ in range(BUCKET_SIZE):  # 20 Sybils announce first, on every DHT node
            for target in (victim, provider):
                conn = await rogue.connect(target.host)
                stream = await Hostile.open(conn, KAD)
                await send_kad(stream, add_provider(key, rogue.ids[id(conn)]))
        await wait_until(lambda: len(victim.dht.provider_store.get_providers(key)) == BUCKET_SIZE,
                         what="Sybil records stored")
        provider.set_listing(listing_template())
        pid = provider.identity.peer_id
        await until_found_by_a_late_node(stack, victim, pid, "sybilprov-late", what="honest provider found beside 20 Sybils")


def test_value_store_is_bounded_in_entries_and_bytes_and_keeps_our_own():
    _libp2p_fixes.apply()
    store = ValueStore(host=None, local_peer_id=random_peer())  # type: ignore[arg-type]
    store.store[b"/isw/ours"] = (Record(key=b"/isw/ours", value=b"o", timeReceived="2000-01-01T00:00:00Z"), 0.0)
    store.local_keys.add(b"/isw/ours")
    for i in range(DHT_MAX_VALUES + 100):
        store.put_record(f"/isw/{i}".encode(), Record(key=b"k", value=b"v" * 100, timeReceived=f"2030-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z"))
    assert len(store.store) <= DHT_MAX_VALUES
    assert b"/isw/ours" in store.store
    for i in range(40):
        store.put_record(f"/isw/big{i}".encode(), Record(key=b"k", value=b"b" * MiB, timeReceived="2031-01-01T00:00:00Z"))
    assert sum(len(r.value) for r, _ in store.store.values()) <= DHT_MAX_VALUE_BYTES + MiB


def test_provider_store_takes_a_newcomer_into_a_full_key_and_bounds_keys_and_addresses():
    _libp2p_fixes.apply()
    store = ProviderStore(types.SimpleNamespace(get_id=random_peer))  # type: ignore[arg-type]
    key = b"model"
    for _ in range(BUCKET_SIZE):
        store.add_provider(key, PeerInfo(random_peer(), []))
    import multiaddr

    honest = random_peer()
    addrs = [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{1000 + i}") for i in range(50)]
    store.add_provider(key, PeerInfo(honest, addrs))
    held = {p.peer_id: p for p in store.get_providers(key)}
    assert honest in held and len(held) == BUCKET_SIZE
    assert len(held[honest].addrs) == DHT_MAX_PROVIDER_ADDRS
    for i in range(DHT_MAX_PROVIDER_KEYS + 50):
        store.add_provider(f"k{i}".encode(), PeerInfo(random_peer(), []))
    assert len(store.providers) <= DHT_MAX_PROVIDER_KEYS
