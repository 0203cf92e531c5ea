"""Hostile peers cannot grow a node without bound (issue #11, findings 6, 7, 9): each test is the
attack, from an in-process hostile peer or raw sockets, against a real host; it asserts the bound
and that an honest peer is still served."""

from __future__ import annotations

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from node.net._host import HostLimits, connection_manager, open_host, parse_peer_addr, peer_addrs
from node.net._libp2p_fixes import MAX_RECV_WINDOW, StreamLimits, handshake_gate, stream_limiter
from tests.node.helpers import LOOPBACK, wait_until
from tests.node.hostile import Hostile, hostile, rss_bytes, sockets_on_port
from tests.support import identity

HOLD = "/inferswarm/test-hold/1.0.0"
MiB = 1 << 20


def holding_handler(served: list[bytes], release: trio.Event):
    """A handler that answers b"hello" with b"ok" and otherwise holds the stream without reading."""

    async def handler(stream):
        data = await stream.read(5)
        if data == b"hello":
            served.append(data)
            await stream.write(b"ok")
            await stream.close()
            return
        await release.wait()

    return handler


async def honest_call(client, server) -> bytes:
    stream = await client.new_stream(server.get_id(), [HOLD])
    await stream.write(b"hello")
    with trio.fail_after(5):
        reply = await stream.read(2)
    await stream.close()
    return reply


def yamux_of(host, peer):
    return host.get_network().get_connections(peer)[0].muxed_conn


# ---- finding 7: writing past the Yamux receive window


async def test_a_peer_writing_past_the_receive_window_is_disconnected_and_buffers_at_most_the_window():
    release = trio.Event()
    async with open_host(identity("win-victim"), LOOPBACK) as victim, open_host(identity("win-rogue"), LOOPBACK) as rogue:
        held = []

        async def never_reads(stream):
            held.append(stream)
            await release.wait()

        victim.set_stream_handler(HOLD, never_reads)
        await rogue.connect(parse_peer_addr(peer_addrs(victim)[0]))
        stream = await rogue.new_stream(victim.get_id(), [HOLD])
        await wait_until(lambda: held, what="victim's handler holds the stream")
        victim_yamux = yamux_of(victim, rogue.get_id())
        sid = held[0].muxed_stream.stream_id
        before = rss_bytes()
        stream.muxed_stream.send_window = 1 << 40  # the rogue ignores the window the victim grants
        peak = 0
        try:
            for _ in range(64):  # 32 MiB in 512 KiB writes
                await stream.write(b"x" * (512 * 1024))
                peak = max(peak, len(victim_yamux.stream_buffers.get(sid, b"")))
        except Exception:  # the victim closed the connection: the right answer
            pass
        await wait_until(lambda: rogue.get_id() not in victim.get_connected_peers(), what="rogue disconnected")
        assert peak <= MAX_RECV_WINDOW  # what it granted (autotuned), never more
        assert rss_bytes() - before < 16 * MiB
        release.set()


async def test_autotuned_windows_stop_at_the_cap():
    got = trio.Event()
    async with open_host(identity("tune-a"), LOOPBACK) as server, open_host(identity("tune-b"), LOOPBACK) as client:
        streams = []

        async def reader(stream):
            streams.append(stream)
            n = 0
            while n < 16 * MiB:
                n += len(await stream.read(1 << 16))
            got.set()

        server.set_stream_handler(HOLD, reader)
        await client.connect(parse_peer_addr(peer_addrs(server)[0]))
        stream = await client.new_stream(server.get_id(), [HOLD])
        for _ in range(16):
            await stream.write(b"y" * MiB)
        with trio.fail_after(20):
            await got.wait()
        assert streams[0].muxed_stream.target_recv_window <= MAX_RECV_WINDOW


# ---- finding 6: stream floods


async def test_stream_flood_is_capped_per_peer_and_protocol_and_honest_peers_are_served():
    limits = HostLimits(streams=StreamLimits(total=200, per_peer=24, per_protocol=((HOLD, 8),), linger_s=0.5))
    release, served = trio.Event(), []
    async with open_host(identity("flood-victim"), LOOPBACK, limits=limits) as victim, \
            open_host(identity("flood-honest"), LOOPBACK) as honest, hostile() as rogue:
        victim.set_stream_handler(HOLD, holding_handler(served, release))
        victim.set_stream_handler("/inferswarm/test-other/1.0.0", holding_handler(served, release))
        limiter = stream_limiter(victim)
        conn = await rogue.connect(victim)
        before = rss_bytes()
        opened = []
        for i in range(300):  # each writes 200 KiB of a frame that never completes
            proto = HOLD if i % 2 else "/inferswarm/test-other/1.0.0"
            try:
                s = await Hostile.open(conn, proto)
                opened.append(s)
            except Exception:  # refused: reset at once
                continue
            with trio.move_on_after(0.05):
                try:
                    await s.write(b"z" * (200 * 1024))
                except Exception:
                    pass
        peer = next(iter(limiter.by_peer)) if limiter.by_peer else None
        assert peer is not None and limiter.by_peer[peer] <= 24
        assert limiter.by_protocol[(peer, HOLD)] <= 8
        assert limiter.refused["per_peer"] + limiter.refused[HOLD] > 200
        # buffered: at most 24 streams x one window
        buffered = sum(len(b) for b in yamux_of(victim, peer).stream_buffers.values())
        assert buffered <= 24 * MAX_RECV_WINDOW
        assert rss_bytes() - before < 48 * MiB
        await honest.connect(parse_peer_addr(peer_addrs(victim)[0]))
        assert await honest_call(honest, victim) == b"ok"
        release.set()


async def test_a_stream_left_open_after_its_handler_returned_is_reset():
    limits = HostLimits(streams=StreamLimits(linger_s=0.2))
    async with open_host(identity("linger-victim"), LOOPBACK, limits=limits) as victim, hostile() as rogue:
        async def returns_at_once(stream):
            await stream.write(b"bye")
            await stream.close()  # half-close; the rogue never closes its side

        victim.set_stream_handler(HOLD, returns_at_once)
        conn = await rogue.connect(victim)
        for _ in range(50):
            await Hostile.open(conn, HOLD)
        peer = victim.get_connected_peers()[0]
        await wait_until(lambda: stream_limiter(victim).total == 0, what="every stream released")
        await wait_until(lambda: not yamux_of(victim, peer).streams, what="no zombie streams in the muxer")


# ---- finding 9: connection slots


async def test_half_open_sockets_do_not_lock_out_a_new_peer():
    limits = HostLimits(max_connections=64, min_connections=8, high_watermark=48, trim_to=40, handshake_slots=16)
    async with open_host(identity("half-victim"), LOOPBACK, limits=limits) as victim, \
            open_host(identity("half-honest"), LOOPBACK) as honest, hostile() as rogue:
        port = int(victim.get_addrs()[0].value_for_protocol("tcp"))
        await rogue.half_open(victim, 120)  # more than the 56 inbound slots py-libp2p would give
        gate = handshake_gate(victim.get_network())
        await wait_until(lambda: gate.evicted >= 120 - 16, what="oldest half-open handshakes dropped")
        assert gate.pending <= 16
        assert sockets_on_port(port) <= 16 + 2
        with trio.fail_after(5):
            await honest.connect(parse_peer_addr(peer_addrs(victim)[0]))
        assert honest.get_id() in victim.get_connected_peers()


async def test_one_identity_cannot_hold_more_than_one_connection():
    async with open_host(identity("dup-victim"), LOOPBACK) as victim, hostile() as rogue:
        key_pair = create_new_key_pair()
        for _ in range(20):  # the same identity dials again and again
            await rogue.connect(victim, key_pair)
        peer = rogue.ids[id(rogue.conns[0])]
        await wait_until(lambda: len(victim.get_network().get_connections(peer)) <= 1,
                         what="the extra connections trimmed")
        await wait_until(lambda: sum(not c.is_closed for c in rogue.conns) <= 1, what="closed on the rogue's side")


async def test_at_the_inbound_cap_an_idle_throwaway_connection_makes_room_for_a_newcomer():
    # the watermark is out of reach: only the cap's own eviction can let the newcomer in
    limits = HostLimits(max_connections=24, min_connections=8, high_watermark=24, trim_to=24,
                        idle_s=0.2, grace_s=0.2, check_interval_s=3600)
    async with open_host(identity("cap-victim"), LOOPBACK, limits=limits) as victim, \
            open_host(identity("cap-newcomer"), LOOPBACK) as newcomer, hostile() as rogue:
        victim.set_stream_handler(HOLD, holding_handler([], trio.Event()))
        for _ in range(16):  # the inbound cap (24 - 8), all idle throwaway identities
            await rogue.connect(victim)
        await wait_until(lambda: handshake_gate(victim.get_network()).inbound == 16, what="the cap filled")
        manager = connection_manager(victim)
        await wait_until(lambda: len(manager.candidates(trio.current_time())[0]) == 16, what="past grace and idle")
        await newcomer.connect(parse_peer_addr(peer_addrs(victim)[0]))
        await wait_until(lambda: manager.pruned == 1, what="one idle connection closed for the newcomer")
        assert await honest_call(newcomer, victim) == b"ok"  # admitted, and served
        assert newcomer.get_id() in victim.get_connected_peers()


async def test_idle_throwaway_connections_are_pruned_and_busy_outbound_peers_kept():
    limits = HostLimits(max_connections=64, min_connections=8, high_watermark=24, trim_to=16,
                        idle_s=0.5, grace_s=0.5, check_interval_s=0.1)
    release, served = trio.Event(), []
    async with open_host(identity("idle-victim"), LOOPBACK, limits=limits) as victim, \
            open_host(identity("idle-busy"), LOOPBACK) as busy, \
            open_host(identity("idle-dialled"), LOOPBACK) as dialled, \
            open_host(identity("idle-newcomer"), LOOPBACK) as newcomer, hostile() as rogue:
        victim.set_stream_handler(HOLD, holding_handler(served, release))
        await victim.connect(parse_peer_addr(peer_addrs(dialled)[0]))  # outbound, idle: kept over inbound idle
        await busy.connect(parse_peer_addr(peer_addrs(victim)[0]))
        held = await busy.new_stream(victim.get_id(), [HOLD])
        await held.write(b"hold!")  # busy on an application protocol
        for _ in range(60):  # more than the 56 inbound slots: the last ones are refused
            try:
                await rogue.connect(victim)
            except Exception:
                pass
        manager = connection_manager(victim)
        await wait_until(lambda: len(victim.get_network().get_connections()) <= limits.high_watermark,
                         what="idle connections pruned")
        assert manager.pruned > 0
        assert sum(c.is_closed for c in rogue.conns) >= len(rogue.conns) - limits.high_watermark
        assert busy.get_id() in victim.get_connected_peers()
        assert dialled.get_id() in victim.get_connected_peers()
        await newcomer.connect(parse_peer_addr(peer_addrs(victim)[0]))
        assert await honest_call(newcomer, victim) == b"ok"
        release.set()


# ---- all at once: a node's RSS and sockets stay bounded and honest peers are still served


async def test_combined_flood_keeps_rss_and_sockets_bounded_and_honest_peers_served():
    from tests.node.helpers import listing_template, market_swarm, until_found_by_a_late_node, until_market
    from tests.node.hostile import KAD, fd_count, put_value, send_kad

    release, served = trio.Event(), []
    async with market_swarm(2, prefix="combined") as (stack, markets):
        rogue = await stack.enter_async_context(hostile())
        victim, witness = markets
        victim.host.set_stream_handler(HOLD, holding_handler(served, release))
        port = int(victim.host.get_addrs()[0].value_for_protocol("tcp"))
        rss0, fds0, socks0 = rss_bytes(), fd_count(), sockets_on_port(port)
        streamers = [await rogue.connect(victim.host) for _ in range(4)]
        for conn in streamers:  # 4 x 64 streams (the per-peer cap), each 200 KiB of a frame that never ends
            for _ in range(64):
                try:
                    s = await Hostile.open(conn, HOLD)
                    with trio.move_on_after(0.05):
                        await s.write(b"p" * (200 * 1024))
                except Exception:
                    pass
        dht_rogue = await rogue.connect(victim.host)  # the streamers are at their per-peer cap
        for i in range(100):  # junk DHT records
            s = await Hostile.open(dht_rogue, KAD)
            await send_kad(s, put_value(f"junk-{i}".encode(), b"j" * 200_000))
        for _ in range(40):  # idle throwaway identities
            await rogue.connect(victim.host)
        await rogue.half_open(victim.host, 100)  # half-open sockets
        rss, socks = rss_bytes() - rss0, sockets_on_port(port) - socks0
        print(f"combined flood: RSS +{rss / MiB:.1f} MiB, victim sockets +{socks}, fds +{fd_count() - fds0}")
        assert rss < 96 * MiB  # 256 streams x <=200 KiB buffered (50 MiB) + the attacker's own state
        assert socks <= 5 + 40 + 64 + 2  # connections + at most the handshake pool
        # honest peers: gossip, DHT lookup and a stream call still work
        victim.set_listing(listing_template())
        vid = victim.identity.peer_id
        await until_market(witness, lambda m: m.view.listing(vid, m.now()) is not None, what="gossip under attack")
        await until_found_by_a_late_node(stack, victim, vid, "combined-late", what="DHT lookup under attack")
        assert await honest_call(witness.host, victim.host) == b"ok"
        release.set()
