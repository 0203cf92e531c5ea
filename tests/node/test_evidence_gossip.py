"""Evidence on gossip: a holder of the weights confirms a bundle before it catches anyone; a node
without them only holds it; a flood from one verifier is cut at its rate and honest bundles pass."""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack

import trio

import protocol
from node.consumer import TrustBook
from node.net import MarketConfig, open_host, open_market, parse_peer_addr, peer_addrs
from node.verify import CheckedCall, SpotCheckConfig, SpotChecker, Verdict
from node.verify._service import EVIDENCE_BURST, open_verification
from tests.node.helpers import LOOPBACK, wait_until
from tests.node.impostor import SEED_A, SEED_B, Impostor
from tests.node.test_spot_checks import _calls, _started
from tests.support import identity


async def _impostor_call(honest, other) -> CheckedCall:
    seen: list[CheckedCall] = []
    keeper = SpotChecker(identity("gossip-keeper"), SpotCheckConfig(rate_permille=1000))
    keeper.hold(honest)

    async def keep(call: CheckedCall) -> None:
        seen.append(call)

    keeper.check = keep  # type: ignore[method-assign]
    await _calls(Impostor(other, honest), honest, keeper, 1, tag="gossip-imp")
    return seen[0]


async def _drain(subscription) -> None:
    async for _ in subscription:
        pass


def _bundle(call: CheckedCall, who: str, n: int = 0) -> protocol.Evidence:
    signer = SpotChecker(identity(who), SpotCheckConfig())
    evidence = signer.sign_evidence(call, Verdict(False, "exact", "the honest model says otherwise"))
    return protocol.sign(dataclasses.replace(evidence, issued_at=evidence.issued_at + n), "sig", identity(who))


async def test_a_bundle_is_confirmed_by_a_holder_and_only_held_by_others_and_a_flood_is_cut(tmp_path):
    honest, other = await _started(SEED_A), await _started(SEED_B)
    call = await _impostor_call(honest, other)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(honest.aclose)
        stack.push_async_callback(other.aclose)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        markets, nodes = [], {}
        for name in ("a", "b", "c"):  # a line a - b - c; a floods raw, validating nothing
            ident = identity(f"gossip-{name}")
            host = await stack.enter_async_context(open_host(ident, LOOPBACK))
            market = await stack.enter_async_context(open_market(host, ident, MarketConfig(max_peers_per_subnet=0)))
            if markets:
                await host.connect(parse_peer_addr(peer_addrs(markets[-1].host)[0]))
            markets.append(market)
            if name == "a":  # subscribed with no validator: it takes and relays anything
                subscription = await market.pubsub.subscribe(protocol.EVIDENCE_TOPIC)
                nursery.start_soon(_drain, subscription)
                continue
            trust = TrustBook(tmp_path / f"{name}-trust.db")
            stack.callback(trust.close)
            (tmp_path / name).mkdir()
            verification = await stack.enter_async_context(open_verification(
                ident, SpotCheckConfig(), tmp_path / name, trust=trust, wall_clock=lambda: 1_000_000.0,
                market=market, open_backend=None))  # type: ignore[arg-type]
            if name == "b":
                verification.checker.hold(honest)  # b holds the committed weights; c does not
            nodes[name] = (verification, trust)
        ma, mb, mc = markets
        (vb, tb), (vc, tc) = nodes["b"], nodes["c"]
        topic = protocol.EVIDENCE_TOPIC
        await wait_until(lambda: mb.host.get_id() in ma.pubsub.peer_topics.get(topic, set())
                         and mc.host.get_id() in mb.pubsub.peer_topics.get(topic, set())
                         and mb.host.get_id() in ma.pubsub.router.mesh.get(topic, set())
                         and mc.host.get_id() in mb.pubsub.router.mesh.get(topic, set()), what="the line's mesh formed")
        provider = call.provider

        async def flood(evidence) -> None:
            await ma.pubsub.publish(topic, protocol.encode(evidence))

        # a flood: one verifier's bundles, more than its burst, a tampered one, then an honest verifier's
        # (ten in all: py-libp2p itself drops more than 10 messages a second from one peer)
        for n in range(EVIDENCE_BURST + 3):
            await flood(_bundle(call, "gossip-flooder", n))
        await flood(dataclasses.replace(_bundle(call, "gossip-tamperer"), verifier_text="changed"))
        await flood(_bundle(call, "gossip-honest-verifier"))
        held = lambda v: sum(n for n, _ in v.evidence.counts().values())  # noqa: E731
        await wait_until(lambda: held(vc) == EVIDENCE_BURST + 1, what="c holds the bundles within the rate")
        assert held(vb) == EVIDENCE_BURST + 1 and vb.topic.refused == 4  # three over the rate, one tampered
        assert vc.topic.refused == 0  # b relayed none of what it refused
        # b re-ran them on the weights: confirmed, and the impostor is caught there
        await wait_until(lambda: vb.confirmed == EVIDENCE_BURST + 1, what="b confirmed the bundles")
        assert tb.get(provider).caught >= 1 and tb.get(provider).score == 0
        # c cannot re-run: it holds the bundles, and its routing is untouched
        assert vc.confirmed == 0 and tc.get(provider).score == 100 and tc.get(provider).caught == 0
