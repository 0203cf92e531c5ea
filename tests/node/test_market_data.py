"""Shared market data: the figures ``node market`` and ``node advise`` show equal those recomputed
here from the test's own observations and receipts; a node observes its own trade once an hour;
observations travel on gossip, checked, and a flood of fresh observers is cut at one rate."""

from __future__ import annotations

import collections
import math
import random
import time
from contextlib import AsyncExitStack

import pytest
import trio

import protocol
from node._receipts import ReceiptStore
from node.insight import MarketData, OfferedModel, advise, figures
from node.insight import _service as insight_service
from node.insight._service import open_insight
from tests.node.helpers import gossip_line, wait_mesh, wait_until
from tests.support import PRICE, identity

H = protocol.HOUR_S
T0 = 1_700_000_000 // H * H  # an hour boundary, in the past (the gossip check reads the real clock)


def obs(who: str, hour: int, prices=(), role: str = "consumer", model: str = "tiny", failed: int = 0,
        turned_away: int = 0, served: int = 0) -> protocol.Observation:
    points = tuple(protocol.PricePoint(i, o, n) for i, o, n in prices)
    completed = sum(p.calls for p in points) if role == "consumer" else served
    if role == "provider":
        points = (protocol.PricePoint(PRICE.input_per_1k, PRICE.output_per_1k, served),) if served else ()
    o = protocol.Observation(observer=identity(who).peer_id, role=role, model=model, hour=hour,
                             calls=completed + failed, completed=completed, tokens_in=10 * completed,
                             tokens_out=20 * completed, value=1000 * completed, turned_away=turned_away,
                             prices=points, issued_at=hour + H)
    return protocol.sign(o, "sig", identity(who))


def _nearest_rank(values: list[int], p: int) -> int:  # the test's own percentile
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p * len(ordered) / 100)) - 1]


def _dataset(rng: random.Random) -> list[protocol.Observation]:
    out = []
    for h in range(6):
        for k in range(rng.randint(3, 9)):
            prices = [(rng.randint(1, 9) * 100_000, rng.randint(1, 30) * 100_000, rng.randint(1, 50))
                      for _ in range(rng.randint(1, 3))]
            prices = list({(i, o): (i, o, n) for i, o, n in prices}.values())
            out.append(obs(f"c-{h}-{k}", T0 + h * H, prices, failed=rng.randint(0, 5)))
        out.append(obs(f"p-{h}", T0 + h * H, role="provider", served=rng.randint(0, 40), turned_away=rng.randint(0, 7)))
    return out


def test_market_figures_equal_those_recomputed_from_the_observations(tmp_path):
    data = _dataset(random.Random(7))
    book = MarketData(tmp_path / "market.db", clock=lambda: T0 + 6 * H + 10)
    for o in data:
        protocol.check_observation(o, T0 + 6 * H + 10)
        assert book.add(o, protocol.encode(o))
    assert not book.add(data[0], protocol.encode(data[0]))  # an observer says an hour once
    got = book.figures("tiny", hours=6)
    assert got.to_json() == figures("tiny", data, T0, T0 + 6 * H).to_json()  # the store changes nothing

    consumers = [o for o in data if o.role == "consumer"]
    # one sample per observer-hour: the price it made most calls at (ties: the cheaper)
    sample = {o.observer: max(o.prices, key=lambda p: (p.calls, -p.output_per_1k, -p.input_per_1k)) for o in consumers}
    outs = [p.output_per_1k for p in sample.values()]
    ins = [p.input_per_1k for p in sample.values()]
    assert got.spread.samples == len(consumers)
    assert got.spread.output == {p: _nearest_rank(outs, p) for p in (10, 25, 50, 75, 90)}
    assert got.spread.input == {p: _nearest_rank(ins, p) for p in (10, 25, 50, 75, 90)}
    assert got.calls == sum(o.calls for o in consumers) and got.completed == sum(o.completed for o in consumers)
    assert got.completion_permille == _nearest_rank([o.completed * 1000 // o.calls for o in consumers], 50)
    providers = [o for o in data if o.role == "provider"]
    assert got.served == sum(o.completed for o in providers) and got.turned_away == sum(o.turned_away for o in providers)
    assert got.observers == len({o.observer for o in data})
    for h, hour in enumerate(got.hours):
        assert hour.hour == T0 + h * H
        here = [sample[o.observer].output_per_1k for o in consumers if o.hour == hour.hour]
        assert hour.median_output == _nearest_rank(here, 50)
    trend = got.trend()
    assert trend["first"] == got.hours[0].median_output and trend["last"] == got.hours[-1].median_output
    assert trend["change"] == trend["last"] - trend["first"]
    assert trend["change_permille"] == (trend["last"] - trend["first"]) * 1000 // trend["first"]


def test_volume_claims_do_not_move_the_median_one_sample_per_observer_hour():
    honest = [obs(f"h{i}", T0, [(100_000, 1_000_000, 3)]) for i in range(5)]
    loud = [obs(f"loud{i}", T0, [(100_000, 9_000_000, 4_000_000)]) for i in range(4)]  # claims millions of calls
    got = figures("tiny", honest + loud, T0, T0 + H)
    assert got.spread.output[50] == 1_000_000


def test_an_observation_of_an_hour_not_over_or_inconsistent_is_refused():
    o = obs("x", T0, [(1, 2, 3)])
    with pytest.raises(protocol.TermsMismatch, match="over"):
        protocol.check_observation(o, T0 + 10)
    bad = protocol.sign(protocol.Observation(**{**{f: getattr(o, f) for f in o.__dataclass_fields__},
                                               "completed": 7}), "sig", identity("x"))
    with pytest.raises(protocol.TermsMismatch):
        protocol.check_observation(bad, T0 + 2 * H)
    with pytest.raises(protocol.BadSignature):
        protocol.check_observation(protocol.sign(o, "sig", identity("y")), T0 + 2 * H)


OFFER = OfferedModel("tiny", 200_000, 1_000_000, max_concurrent=2)


def _market(outs: list[int]) -> list[protocol.Observation]:
    return [obs(f"m{i}", T0, [(100_000, out, 1)]) for i, out in enumerate(outs)]


def test_advice_figures_equal_those_recomputed_and_each_rule_applies():
    outs = [400_000, 600_000, 800_000, 1_200_000, 1_400_000, 2_000_000]
    served = [("tiny", 5_000, 1_000, T0 + 3_600 * 0 + 60 * k) for k in range(3)] + \
             [("tiny", 7_000, 2_000, T0 + 7 * 3_600 + 60 * k) for k in range(5)] + [("big", 90_000, 500, T0 + 30)]
    window = (T0, T0 + 24 * H)
    offers = [OFFER, OfferedModel("big", 1, 2, 1)]
    got = advise(offers, served, {}, _market(outs), *window)
    assert [m.model for m in got.models] == ["big", "tiny"]  # most profitable first
    tiny = got.models[1]
    assert tiny.calls == 8 and tiny.earned == 3 * 5_000 + 5 * 7_000
    assert tiny.utilization_permille == (3 * 1_000 + 5 * 2_000) * 1000 // (24 * H * 1000 * 2)
    assert tiny.position_permille == sum(o < 1_000_000 for o in outs) * 1000 // len(outs)
    hour0 = (T0 // 3600) % 24
    assert tiny.peak_hours == (((hour0 + 7) % 24, 5), (hour0, 3))
    assert tiny.market.output[50] == _nearest_rank(outs, 50) == 800_000
    # idle (utilization under 20%) and over the median: the median
    assert (tiny.suggested_input, tiny.suggested_output) == (100_000, 800_000) and "median" in tiny.reason
    # turned away a tenth of what it served: 10% more, capped at p75
    # four turned away is under MIN_TURNED_AWAY: not yet demand over capacity, so the idle rule applies
    assert advise([OFFER], served[:8], {"tiny": 4}, _market(outs), *window).models[0].suggested_output == 800_000
    busy = advise([OFFER], served[:8], {"tiny": 5}, _market(outs), *window).models[0]
    assert (busy.suggested_input, busy.suggested_output) == (220_000, 1_100_000) and "p75" in busy.reason
    capped = advise([OfferedModel("tiny", 200_000, 1_300_000, 2)], served[:8], {"tiny": 5}, _market(outs),
                    *window).models[0]
    assert (capped.suggested_input, capped.suggested_output) == (200_000 * 1_400_000 // 1_300_000, 1_400_000)
    at_top = advise([OfferedModel("tiny", 200_000, 1_400_000, 2)], served[:8], {"tiny": 5}, _market(outs),
                    *window).models[0]
    assert at_top.suggested_output == 1_400_000 and "add capacity" in at_top.reason
    cheap = advise([OfferedModel("tiny", 100_000, 500_000, 2)], served[:8], {}, _market(outs), *window).models[0]
    assert cheap.suggested_output == 500_000 and "keep" in cheap.reason
    alone = advise([OFFER], served, {}, [], *window).models[0]
    assert alone.market is None and alone.suggested_output == OFFER.output_per_1k and "no market" in alone.reason


def _receipt(consumer, provider, model: str, price: protocol.Price, n: int, cost: int) -> protocol.Receipt:
    r = protocol.Receipt(session_id=bytes([n]) * 16, call_seq=0, model=model, provider=provider.peer_id,
                         consumer=consumer.peer_id, agent=consumer.peer_id, channel_id=b"c" * 16,
                         input_hash=b"i" * 32, output_hash=b"o" * 32, tokens_in=10 + n, tokens_out=20 + n,
                         finish_reason="stop", price=price, cost=cost, cumulative=cost, prev_hash=protocol.ZERO_HASH,
                         issued_at=T0 + n)
    return protocol.sign(protocol.sign(r, "provider_sig", provider), "consumer_sig", consumer)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_node_observes_its_own_hour_from_its_receipts_once(tmp_path):
    me, other = identity("observer-me"), identity("observer-other")
    clock = Clock(T0 + 100)
    receipts = ReceiptStore(tmp_path / "receipts.db", clock)
    cheap, dear = PRICE, protocol.Price(input_per_1k=900_000, output_per_1k=2_000_000, min_charge=0)
    for n, price in enumerate([cheap, cheap, dear]):
        await receipts.put(_receipt(me, other, "tiny", price, n, 1_000 + n), "consumer")
    for n in range(4):
        await receipts.put(_receipt(other, me, "tiny", cheap, 10 + n, 500), "provider", latency_ms=250)
    away: collections.Counter[str] = collections.Counter()
    async with open_insight(me, tmp_path, receipts=receipts, market=None, wall_clock=clock,
                            turned_away=lambda: away, offers=lambda: [OFFER]) as insight:
        insight.failed("tiny", 2)
        away["tiny"] += 3
        insight.tick()
        clock.now = T0 + H + 5
        await insight.observe(T0)  # the node's own hourly loop may observe it first: either way, once
        consumer, provider = sorted((o for o in insight.data.observations("tiny", T0, T0 + H)
                                     if o.observer == me.peer_id and o.hour == T0), key=lambda o: o.role)
        assert (consumer.role, consumer.calls, consumer.completed, consumer.value) == ("consumer", 5, 3, 3_003)
        assert consumer.prices == (protocol.PricePoint(cheap.input_per_1k, cheap.output_per_1k, 2),
                                   protocol.PricePoint(900_000, 2_000_000, 1))
        assert (consumer.tokens_in, consumer.tokens_out) == (10 + 11 + 12, 20 + 21 + 22)
        assert (provider.role, provider.completed, provider.value, provider.turned_away) == ("provider", 4, 2_000, 3)
        for o in (consumer, provider):
            protocol.check_observation(o, int(clock.now))
        assert await insight.observe(T0) == []  # an hour is observed once
        doc = await insight.advise(24)
        (tiny,) = doc.models
        assert tiny.calls == 4 and tiny.earned == 2_000 and tiny.turned_away == 3
        assert tiny.utilization_permille == 4 * 250 * 1000 // (24 * H * 1000 * OFFER.max_concurrent)
    receipts.close()


async def _drain(subscription) -> None:
    async for _ in subscription:
        pass


async def test_observations_travel_checked_and_a_fresh_flood_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(insight_service, "FRESH_BURST", 3)
    known = identity("obs-known")
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        markets = await gossip_line(stack, "obs")
        nodes = {}
        nursery.start_soon(_drain, await markets[0].pubsub.subscribe(protocol.OBSERVATION_TOPIC))  # a floods raw
        for name, market in zip("bc", markets[1:]):
            (tmp_path / name).mkdir()
            receipts = ReceiptStore(tmp_path / name / "receipts.db")
            stack.callback(receipts.close)
            nodes[name] = await stack.enter_async_context(open_insight(
                market.identity, tmp_path / name, receipts=receipts, market=market, wall_clock=lambda: T0 + 5 * H,
                turned_away=collections.Counter, offers=list, has_history=lambda peer: peer == known.peer_id))
        ma = markets[0]
        topic = protocol.OBSERVATION_TOPIC
        await wait_mesh(markets, topic)

        async def send(o) -> None:
            await ma.pubsub.publish(topic, protocol.encode(o))

        for i in range(6):  # six fresh observers, one shared bucket of three
            await send(obs(f"obs-fresh-{i}", T0, [(1, 50_000_000, 1)]))
        await send(obs("obs-known", int(time.time()) // H * H + H, [(1, 2, 1)]))  # within its rate; the hour is not over
        await send(obs("obs-known", T0, [(1, 700_000, 2)]))  # has history: its own bucket
        b, c = nodes["b"], nodes["c"]
        held = lambda n: len(n.data.observations("tiny", 0, T0 + 10 * H))  # noqa: E731
        await wait_until(lambda: held(b) == 4 and held(c) == 4, what="b and c hold what passed")
        assert b.topic.refused == 4, (b.topic.refused, b.topic.accepted)  # three over the shared rate, one of an hour not over
        assert [o.observer for o in b.data.observations("tiny", 0, T0 + H)].count(known.peer_id) == 1


async def test_the_api_serves_the_figures_the_observations_make(tmp_path):
    import httpx

    from node import open_swarm
    from node.daemon import serve_node_api

    now = int(time.time()) // H * H
    data = [obs(f"api-{i}", now - H * (1 + i % 3), [(100_000 * (i + 1), 300_000 * (i + 1), 2)]) for i in range(7)]
    async with open_swarm(tmp_path / "n", passphrase="pw") as swarm, trio.open_nursery() as nursery:
        for o in data:
            swarm.service.insight.data.add(o, protocol.encode(o))
        await nursery.start(lambda task_status: serve_node_api(swarm.service, "127.0.0.1:0", "t" * 32,
                                                               task_status=task_status))
        async with httpx.AsyncClient(base_url=swarm.service.api_url, headers={"authorization": "Bearer " + "t" * 32},
                                     timeout=30) as api:
            r = await api.get("/api/v1/market/prices", params={"model": "tiny", "hours": 6})
            assert r.status_code == 200, r.text
            until = int(time.time()) // H * H
            assert r.json() == figures("tiny", data, until - 6 * H, until).to_json()
            assert r.json()["spread"]["output"]["p50"] == 1_200_000
            missing = await api.get("/api/v1/market/prices")
            assert missing.status_code == 400 and "model" in missing.json()["error"]["message"]
            await swarm.offer("tiny", input_price=100_000, output_price=9_000_000)
            advice = (await api.get("/api/v1/advise", params={"hours": 24})).json()
            (tiny,) = advice["models"]
            assert tiny["market"]["samples"] == 7 and tiny["position_permille"] == 1000
            assert tiny["suggested_output"] == 1_200_000 and "median" in tiny["reason"]
        nursery.cancel_scope.cancel()
