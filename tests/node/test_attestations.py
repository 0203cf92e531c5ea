"""Attestations between real nodes, and on gossip: a settled session is attested with the agent's
proof and counts where that agent is trusted; a flood of fresh identities is cut at one shared rate
while an attester with history still gets through, and the rest is refused wherever it arrives."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

import protocol
from node import open_swarm
from node.net import MarketConfig, open_host, open_market, parse_peer_addr, peer_addrs
from node.reputation import _service
from node.reputation._network_trust import MATURE_S
from node.reputation._service import open_reputation
from tests.node.helpers import LOOPBACK, gossip_line, wait_mesh, wait_until
from tests.support import AGENT, attestation, identity


async def _poll(predicate, what: str, timeout: float = 60.0):
    with trio.fail_after(timeout):
        while not (value := predicate()):
            await trio.sleep(0.05)
    return value


async def test_a_settled_session_is_attested_with_the_agents_proof_and_weighs_where_the_agent_is_trusted(tmp_path):
    async with open_swarm(tmp_path / "agent", passphrase="pw", escrow=True) as agent:
        a = agent.peer_id
        async with open_swarm(tmp_path / "provider", passphrase="pw", bootstrap=agent.addrs,
                              accept_escrow=(a,)) as provider, \
                open_swarm(tmp_path / "consumer", passphrase="pw", bootstrap=agent.addrs) as consumer:
            await provider.offer("tiny", input_price=100_000, output_price=200_000)
            await consumer.wait_for("tiny")
            await agent.mint(consumer.peer_id, 5_000_000)
            await consumer.service.renter.run("tiny", [{"role": "user", "content": "hi"}], max_tokens=4,
                                              temperature_milli=0, escrow=a)
            consumer.service.renter.standing.retire_all()  # a session is attested once it ends
            mine = consumer.service.reputation
            await _poll(lambda: mine.attested == 1, "the consumer attested its session")
            (own,) = mine.book.attestations(provider.peer_id)
            backing = protocol.check_attestation(own)
            assert own.attester == consumer.peer_id and own.calls == 1 and own.failures == 0
            assert backing.agent == a and backing.settled == own.value_paid > 0
            # the provider (which accepts that agent) and the agent itself take it in over gossip
            for node in (provider, agent):
                book = node.service.reputation.book
                await _poll(lambda: book.attestations(provider.peer_id), f"{node.peer_id} took the attestation in")
                assert book.view(provider.peer_id).weight == backing.settled  # a newcomer: the fresh pool
            assert provider.service.trust.get(provider.peer_id).network_weight == backing.settled
            # this node's own attestation is its local trust already: no network weight at home
            assert consumer.service.trust.get(provider.peer_id).network_score is None


async def _drain(subscription) -> None:
    async for _ in subscription:
        pass


async def test_a_flood_of_fresh_attesters_is_cut_at_one_rate_and_known_attesters_still_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(_service, "FRESH_BURST", 3)
    monkeypatch.setattr(_service, "KNOWN_BURST", 2)
    bad, honest = identity("attested-bad"), identity("attested-honest")
    alice = identity("alice-with-history")
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        markets = await gossip_line(stack, "attest")
        clock = [2_000_000.0]
        reps = {}
        nursery.start_soon(_drain, await markets[0].pubsub.subscribe(protocol.ATTESTATION_TOPIC))  # a floods raw
        for name, market in zip("bc", markets[1:]):
            (tmp_path / name).mkdir()
            rep = await stack.enter_async_context(open_reputation(
                market.identity, tmp_path / name, market=market, escrow=None, trusted_agents=lambda: [AGENT.peer_id],
                wall_clock=lambda: clock[0]))
            earlier = attestation(alice, honest, issued_at=100)  # alice has history on both (a week on)
            rep.book.add(earlier, protocol.check_attestation(earlier), protocol.encode(earlier))
            reps[name] = rep
        clock[0] += MATURE_S
        ma = markets[0]
        topic = protocol.ATTESTATION_TOPIC
        await wait_mesh(markets, topic)

        async def send(a: protocol.Attestation) -> None:
            await ma.pubsub.publish(topic, protocol.encode(a))

        # four fresh identities praise the bad provider; forgeries (one tampered, two naming alice) and a
        # replay of alice's held attestation spend no one's tokens; then alice reports (nine in all:
        # py-libp2p itself drops more than 10 messages a second from one peer)
        for i in range(4):
            await send(attestation(identity(f"attest-sybil-{i}"), bad, calls=100))
        forged = attestation(identity("attest-forger"), bad)
        await send(protocol.Attestation(**{**_fields(forged), "calls": 1000}))
        real = attestation(alice, honest, issued_at=200, calls=50)
        for n in range(2):  # alice's name, not her signature: her bucket (burst 2 here) stays full
            await send(protocol.Attestation(**{**_fields(real), "failures": n + 1}))
        await send(attestation(alice, honest, issued_at=100))  # a replay of what b and c hold
        await send(real)
        rb, rc = reps["b"], reps["c"]
        held = 3 + 1  # three Sybils within the shared rate, and alice's newer word in place of her older
        await wait_until(lambda: len(rc.book.attestations()) == held and rc.topic.accepted == 4,
                         what="c holds what b let through")
        # one over the shared rate, three forged, one replayed
        assert len(rb.book.attestations()) == held and rb.topic.refused == 5
        # c holds no more than b let through (a may also reach c directly: c's own checks refuse the same)
        for rep in (rb, rc):
            assert rep.book.attestations(honest.peer_id)[0].calls == 50  # alice's new word arrived
            assert rep.book.view(bad.peer_id).backed == 3


async def test_an_attestation_put_in_the_dht_is_found_by_a_node_that_missed_the_gossip(tmp_path):
    provider, writer = identity("dht-attested"), identity("attest-writer")
    async with AsyncExitStack() as stack:
        reps = []
        for name, subscribe in (("w", True), ("r", False)):  # the reader never hears the gossip
            ident = writer if name == "w" else identity("attest-reader")
            host = await stack.enter_async_context(open_host(ident, LOOPBACK))
            market = await stack.enter_async_context(open_market(
                host, ident, MarketConfig(max_peers_per_subnet=0, subscribe=subscribe)))
            if reps:
                await host.connect(parse_peer_addr(peer_addrs(reps[0].market.host)[0]))
            (tmp_path / name).mkdir()
            reps.append(await stack.enter_async_context(open_reputation(
                ident, tmp_path / name, market=market, escrow=None, trusted_agents=lambda: [AGENT.peer_id],
                wall_clock=lambda: 2_000_000.0)))
        w, r = reps
        await wait_until(lambda: w.market.dht.routing_table.size() > 0 and r.market.dht.routing_table.size() > 0,
                         what="the two DHTs know each other")
        own = attestation(writer, provider, paid=300_000)
        await w._publish(own, protocol.encode(own))
        assert await r.fetch(provider.peer_id) == 1
        (held,) = r.book.attestations(provider.peer_id)
        assert held == own and r.book.view(provider.peer_id).weight == 300_000
        # the DHT's validator refuses a record under another pair's key, and a forged one
        validator = _service._AttestationValidator()
        other = attestation(identity("attest-other"), provider)
        with pytest.raises(protocol.TermsMismatch):
            validator.validate(_service.attestation_key(writer.peer_id, provider.peer_id), protocol.encode(other))
        with pytest.raises(protocol.BadSignature):
            validator.validate(_service.attestation_key(writer.peer_id, provider.peer_id),
                               protocol.encode(protocol.Attestation(**{**_fields(own), "calls": 999})))
        newer = attestation(writer, provider, issued_at=5_000)
        assert validator.select("k", [protocol.encode(own), protocol.encode(newer), b"junk"]) == 1


def _fields(a: protocol.Attestation) -> dict:
    return {f: getattr(a, f) for f in a.__dataclass_fields__}
