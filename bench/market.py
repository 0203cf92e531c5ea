"""Market propagation on loopback, for 10, 30 and 50 nodes in one process.

Prints, per swarm size:
- gossip: time until every node's view holds a new listing (median and max over rounds);
- DHT: provider lookup latency by model (median, p95) from a node that is not subscribed to
  gossip and so learns only through the DHT;
each also as a ratio to the baseline measured in the same run: one request/response round
trip on a libp2p stream between two of the swarm's nodes.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from node.net._market import model_key  # noqa: E402
from tests.node.helpers import join, listing_template, market_swarm  # noqa: E402
from tests.support import PRICE  # noqa: E402

ROUNDS = 5
LOOKUPS = 20


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def stream_rtt(a, b, n: int = 50) -> float:
    async def echo(stream):
        await stream.write(await stream.read(64))
        await stream.close()

    b.host.set_stream_handler("/bench/echo/1", echo)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s = await a.host.new_stream(b.host.get_id(), ["/bench/echo/1"])
        await s.write(b"x" * 32)
        await s.read(64)
        await s.close()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def run(n: int) -> None:
    async with market_swarm(n, prefix=f"bench{n}") as (stack, markets):
        baseline = await stream_rtt(markets[-1], markets[0])
        provider = markets[n // 2]
        pid = provider.identity.peer_id
        spread = []
        for r in range(ROUNDS):
            price = dataclasses.replace(PRICE, output_per_1k=PRICE.output_per_1k + r + 1)
            await trio.sleep(provider.config.publish_interval_s)  # past the publish pacing: measure the spread only
            t = time.perf_counter()
            provider.set_listing(listing_template(price=price))
            while not all(
                (lst := m.view.listing(pid, m.now())) is not None and lst.models[0].price == price for m in markets
            ):  # polled every 2 ms: the figure is good to that
                await trio.sleep(0.002)
            spread.append(time.perf_counter() - t)
        # the provider lists LOOKUPS models; each lookup asks for one not asked before (a node
        # caches provider records it has found, so a repeated lookup measures nothing)
        models = tuple(f"model-{i}" for i in range(LOOKUPS))
        provider.set_listing(listing_template(models=models))
        while provider.dht_written_seq != provider.own_listing.seq:
            await trio.sleep(0.01)
        late = await join(stack, f"bench{n}-late", via=markets[1], subscribe=False)
        await trio.sleep(1.0)  # let the newcomer's routing table fill, as a real joiner's would
        lookups = []
        for model in models:
            t = time.perf_counter()
            infos = await late.dht.find_providers(model_key(model))
            lookups.append(time.perf_counter() - t)
            assert any(i.peer_id.to_base58() == pid for i in infos), f"lookup of {model} did not find the provider"
        found = await late.lookup(models[0])
        assert [lst.provider for lst in found] == [pid]
        gm, gx = statistics.median(spread), max(spread)
        lm, lp = statistics.median(lookups), pct(lookups, 95)
        print(
            f"{n:3d} nodes | gossip to all: median {gm * 1000:7.1f} ms  max {gx * 1000:7.1f} ms"
            f" ({gm / baseline:6.1f}x / {gx / baseline:6.1f}x rtt)"
            f" | DHT lookup: median {lm * 1000:7.1f} ms  p95 {lp * 1000:7.1f} ms"
            f" ({lm / baseline:6.1f}x / {lp / baseline:6.1f}x rtt)"
            f" | baseline stream rtt {baseline * 1000:.2f} ms",
            flush=True,
        )


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10, 30, 50]
    for n in sizes:
        trio.run(run, n)


if __name__ == "__main__":
    main()
