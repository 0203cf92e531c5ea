"""A bounded market view (issue #11, finding 11): listings are free to make, so the view caps them
in all, per model and in bytes, and when full an unknown newcomer never evicts a provider with
history (unknown ones take turns); a gossip flood of Sybil listings against a real node shows it."""

from __future__ import annotations

import dataclasses
import time

import trio

import protocol
from node.net._host import open_host, parse_peer_addr, peer_addrs
from node.net._market import MarketConfig, open_market
from node.net._market_view import MarketView
from protocol import LISTING_TOPIC
from tests.node.helpers import LOOPBACK, listing_template, until_market, wait_until
from tests.support import identity


def signed(name: str, models=("tiny",), seq: int = 1, pad: int = 0) -> bytes:
    ident = identity(name)
    now = int(time.time())
    lst = dataclasses.replace(listing_template(models), provider=ident.peer_id, seq=seq, issued_at=now,
                              expires_at=now + 300, addrs=tuple(f"/ip4/127.0.0.1/tcp/{i}/" + "x" * 200 for i in range(pad)))
    return protocol.encode(protocol.sign(lst, "sig", ident), max_size=protocol.MAX_LISTING_BYTES)


def pid(name: str) -> str:
    return identity(name).peer_id


def test_a_full_view_keeps_providers_with_history_and_lets_unknown_newcomers_take_turns():
    trusted = {pid("old-0"), pid("old-1")}
    view = MarketView(max_listings=5, max_per_model=100, keep_score=lambda p: 1.0 if p in trusted else 0.0)
    now = int(time.time())
    for name in ("old-0", "old-1", "new-0", "new-1", "new-2"):
        assert view.offer(signed(name), now) is not None
    for i in range(20):  # a flood of unknown listings: each evicts the longest-held unknown one
        assert view.offer(signed(f"sybil-{i}"), now) is not None
    assert len(view) == 5 and view.evicted == 20
    held = {lst.provider for lst in view.listings(now)}
    assert trusted <= held  # never pushed out by an unknown newcomer
    assert held - trusted == {pid(f"sybil-{i}") for i in (17, 18, 19)}
    # so the flood cannot lock a later honest newcomer out either: it gets in
    assert view.offer(signed("honest-late"), now) is not None
    assert pid("honest-late") in {lst.provider for lst in view.listings(now)}
    # but nobody with a lower score than every held provider does
    only_trusted = MarketView(max_listings=2, max_per_model=100, keep_score=lambda p: 1.0 if p in trusted else 0.0)
    for name in ("old-0", "old-1"):
        only_trusted.offer(signed(name), now)
    assert only_trusted.offer(signed("sybil-x"), now) is None and only_trusted.rejected["full"] == 1
    # a held provider's update always fits
    assert view.offer(signed("old-0", seq=2), now) is not None


def test_per_model_and_byte_caps():
    view = MarketView(max_listings=100, max_per_model=3, max_bytes=10**9)
    now = int(time.time())
    for i in range(6):
        view.offer(signed(f"m-{i}", models=("tiny",)), now)
    assert len(view.rows(now, "tiny")) == 3 and view.evicted == 3  # newcomers take turns within the cap
    assert view.offer(signed("other", models=("big",)), now) is not None  # another model has room
    small = MarketView(max_listings=100, max_per_model=100, max_bytes=20_000)
    for i in range(10):
        small.offer(signed(f"b-{i}", pad=16), now)  # ~3.5 KB each
    assert sum(small._size.values()) <= 20_000 and small.evicted > 0


async def test_gossip_flood_of_sybil_listings_is_capped_and_the_honest_provider_kept():
    config = MarketConfig(max_peers_per_subnet=0, max_listings=6, max_per_model=6)
    async with open_host(identity("flood-victim"), LOOPBACK) as vh, open_host(identity("flood-honest"), LOOPBACK) as hh, \
            open_host(identity("flood-rogue"), LOOPBACK) as rh:
        honest_id = identity("flood-honest").peer_id
        async with open_market(vh, identity("flood-victim"), config, keep_score=lambda p: 1.0 if p == honest_id else 0.0) as victim, \
                open_market(hh, identity("flood-honest"), config) as honest, \
                open_market(rh, identity("flood-rogue"), config) as rogue:
            for h in (hh, rh):
                await h.connect(parse_peer_addr(peer_addrs(vh)[0]))
            honest.set_listing(listing_template())
            await until_market(victim, lambda m: m.view.listing(honest_id, m.now()) is not None, what="honest listing")
            rogue.pubsub.remove_topic_validator(LISTING_TOPIC)  # the rogue relays anything
            await wait_until(lambda: len(rogue.pubsub.peer_topics.get(LISTING_TOPIC, ())) > 0, what="rogue mesh")
            for i in range(12):
                seen = victim.view.accepted + victim.view.rejected["full"]
                await rogue.pubsub.publish(LISTING_TOPIC, signed(f"flood-sybil-{i}"))
                await wait_until(lambda: victim.view.accepted + victim.view.rejected["full"] > seen,
                                 timeout=5, what=f"Sybil listing {i} judged")
                await trio.sleep(0.11)  # pace under gossipsub's 10 msg/s per-peer limit (it drops, silently)
            now = victim.now()
            assert len(victim.view) <= 6 and victim.view.evicted >= 12 - 6
            assert victim.view.listing(honest_id, now) is not None
