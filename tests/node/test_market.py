"""Ten market nodes in one process: gossip, DHT-only discovery, updates, expiry, rejections."""

from __future__ import annotations

import dataclasses

import pytest

import protocol
from node.net._market import _ListingValidator, listing_key
from protocol import LISTING_TOPIC
from tests.node.helpers import (
    Clock,
    join,
    listing_template,
    market_swarm,
    until_market,
    wait_until,
    wait_until_async,
)
from tests.support import MALLORY, PRICE, PROVIDER

N = 10


def _price_seen(market, provider, price):
    lst = market.view.listing(provider, market.now())
    return lst is not None and lst.models[0].price == price


async def test_listing_spreads_updates_expires_and_late_joiner_uses_the_dht():
    clock = Clock()
    async with market_swarm(N, clock=clock) as (stack, markets):
        provider = markets[3]
        pid = provider.identity.peer_id
        provider.set_listing(listing_template())
        await until_market(markets, lambda m: m.view.listing(pid, m.now()), what="gossip to all nodes")

        # a node that joins later and never subscribes finds the listing through the DHT alone
        seq_at_join = provider.own_listing.seq
        late = await join(stack, "late", via=markets[7], subscribe=False, clock=clock)
        found = []

        async def lookup_finds():
            found[:] = await late.lookup("tiny")
            return bool(found)

        await wait_until_async(lookup_finds, what="DHT lookup by model")
        assert [lst.provider for lst in found] == [pid]

        # the listing it found is the provider's, at least as new as when the late node joined (a join
        # makes the provider republish, so it may be one seq behind the newest by now)
        held = late.view.listing(pid, late.now())
        assert seq_at_join <= held.seq <= provider.own_listing.seq

        # a price change (seq + 1) replaces the old listing everywhere
        old_seq = provider.own_listing.seq
        new_price = dataclasses.replace(PRICE, output_per_1k=2_000_000)
        provider.set_listing(listing_template(price=new_price))
        await until_market(markets, lambda m: _price_seen(m, pid, new_price), what="price change everywhere")
        assert all(m.view.listing(pid, m.now()).seq > old_seq for m in markets)

        # withdrawn, it is no longer republished; once expired it disappears everywhere
        provider.set_listing(None)
        clock.offset += provider.config.listing_ttl_s + 1
        await until_market(markets, lambda m: len(m.view) == 0, what="expiry everywhere")


def _signed(seq, issued, key=PROVIDER, ttl=300):
    lst = dataclasses.replace(listing_template(), provider=PROVIDER.peer_id, seq=seq, issued_at=issued,
                              expires_at=issued + ttl)
    return protocol.encode(protocol.sign(lst, "sig", key))


async def test_bad_listings_are_rejected_and_counted():
    async with market_swarm(3, prefix="rej") as (stack, markets):
        rogue = await join(stack, "rogue", via=markets[0])
        # the rogue skips its own validation, as an attacker would
        rogue.pubsub.remove_topic_validator(LISTING_TOPIC)
        target = markets[0]
        now = target.now()
        await wait_until(lambda: LISTING_TOPIC in rogue.pubsub.peer_topics
                         and len(rogue.pubsub.peer_topics[LISTING_TOPIC]) > 0, what="rogue mesh")

        good_new, good_old = _signed(10, now), _signed(5, now)
        await rogue.pubsub.publish(LISTING_TOPIC, good_new)
        await until_market(target, lambda m: m.view.listing(PROVIDER.peer_id, m.now()), what="good listing")

        cases = [
            ("bad_signature", _signed(11, now, key=MALLORY)),
            ("stale_seq", good_old),
            ("malformed", b"\x93garbage"),
            ("expired", _signed(12, now - 1000, ttl=10)),
            ("oversize", _signed(13, now) + b"\x00" * protocol.MAX_LISTING_BYTES),  # refused before parsing
        ]
        for reason, data in cases:  # a refusal is no change of the market: its counter is polled
            before = target.view.rejected[reason]
            await rogue.pubsub.publish(LISTING_TOPIC, data)
            await wait_until(lambda: target.view.rejected[reason] > before, what=f"{reason} counted")
        assert target.view.listing(PROVIDER.peer_id, target.now()).seq == 10
        assert len(protocol.decode(good_new).models) == 1


def test_dht_validator_owns_keys_and_prefers_newer_seq():
    import time

    v = _ListingValidator(time.time)
    now = int(time.time())
    v.validate(listing_key(PROVIDER.peer_id), _signed(2, now))
    with pytest.raises(protocol.TermsMismatch):
        v.validate(listing_key(MALLORY.peer_id), _signed(2, now))  # stored under another provider's key
    with pytest.raises(protocol.BadSignature):
        v.validate(listing_key(PROVIDER.peer_id), _signed(2, now, key=MALLORY))
    with pytest.raises(protocol.Expired):
        v.validate(listing_key(PROVIDER.peer_id), _signed(2, now - 1000, ttl=10))
    with pytest.raises(protocol.DecodeError):
        v.validate(listing_key(PROVIDER.peer_id), b"junk")
    assert v.select("k", [_signed(2, now), _signed(7, now), _signed(9, now, key=MALLORY), b"junk"]) == 1
    assert len(listing_key(PROVIDER.peer_id).encode()) <= 50
