"""Gateway overhead and failover time.

1. Overhead: the same request through the consumer's OpenAI-compatible API (HTTP -> routing ->
   escrow channel -> P2P session -> provider -> openai: backend -> `transformers serve`) and
   straight to that `transformers serve`; per-call latency p50/p95 of each and the ratios.
   Every gateway call is a complete paid call: channel opened, receipt counter-signed, settled.
2. Failover: `node run`-style calls when the cheapest provider is dead (its listing still in the
   consumer's view) against calls when it is the live one; the extra time is the failover cost.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import trio  # noqa: E402

from bench._goals import goal  # noqa: E402
from node._home import Home, init_home  # noqa: E402
from node._node import open_node, resolve_config  # noqa: E402
from node.consumer._routing import Preferences  # noqa: E402
from node.daemon import serve_node_api  # noqa: E402
from tests.node.upstream import transformers_serve  # noqa: E402

N = int(os.environ.get("BENCH_N", "12"))
BODY = {"messages": [{"role": "user", "content": "Route me to the cheapest provider, please."}], "max_tokens": 24,
        "temperature": 0.0}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def start(stack: AsyncExitStack, path: Path, **kw: Any) -> Any:
    ks = init_home(path, "bench")
    config = resolve_config(Home(path), ("/ip4/127.0.0.1/tcp/0",), kw.pop("bootstrap", ()), "127.0.0.1:0",
                            kw.pop("accept", ()))
    node = await stack.enter_async_context(open_node(Home(path), ks.identity, config, api_key=ks.api_key, **kw))
    with trio.fail_after(30):
        while config.bootstrap and not node.host.get_connected_peers():
            await trio.sleep(0.02)
    return node


async def timed_posts(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[float]:
    out = []
    for _ in range(N):
        t = time.perf_counter()
        r = await client.post(url, json=body)
        r.raise_for_status()
        out.append(time.perf_counter() - t)
    return out


async def main(base_url: str, model: str, tmp: Path) -> None:
    async with AsyncExitStack() as stack:
        agent = await start(stack, tmp / "agent", escrow=True)
        boot = tuple(str(a) for a in agent.host.get_addrs())
        aid = agent.identity.peer_id
        dear = await start(stack, tmp / "dear", bootstrap=boot, accept=(aid,))
        await dear.add_offer({"model": model, "backend": f"openai:{base_url}", "input_price": 900, "output_price": 900})
        consumer = await start(stack, tmp / "consumer", bootstrap=boot)
        await agent.escrow.mint(None, consumer.identity.peer_id, 10**9)
        async with trio.open_nursery() as nursery:
            info = await nursery.start(lambda task_status: serve_node_api(
                consumer, "127.0.0.1:0", "unused", openai_keyless=True, task_status=task_status))
            with trio.fail_after(60):
                while not await consumer.providers(model, "cheapest"):
                    await trio.sleep(0.1)
            async with httpx.AsyncClient(timeout=120) as client:
                direct = await timed_posts(client, f"{base_url}/chat/completions", {"model": model, **BODY})
                gateway = await timed_posts(client, f"{info['api_url']}/v1/chat/completions",
                                            {"model": model, "escrow": aid, **BODY})

            # failover: a cheaper provider appears, then dies with its listing still in the view
            cheap_scope = trio.CancelScope()

            async def cheap_node(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with cheap_scope:
                    async with AsyncExitStack() as s:
                        cheap = await start(s, tmp / "cheap", bootstrap=boot, accept=(aid,))
                        await cheap.add_offer({"model": model, "backend": f"openai:{base_url}", "input_price": 100,
                                               "output_price": 100})
                        task_status.started(cheap.identity.peer_id)
                        await trio.sleep_forever()

            cheap_id = await nursery.start(cheap_node)
            with trio.fail_after(60):
                while len(await consumer.providers(model, "cheapest")) < 2:
                    await trio.sleep(0.1)
            messages = BODY["messages"]
            normal, failover = [], []
            for _ in range(N):
                t = time.perf_counter()
                doc = await consumer.renter.run(model, messages, max_tokens=24, temperature_milli=0, escrow=aid,
                                                prefs=Preferences(sort="cheapest"))
                normal.append(time.perf_counter() - t)
                assert doc.provider == cheap_id
            cheap_scope.cancel()
            await trio.sleep(0.5)  # let the dead node's connections drop
            for _ in range(N):
                t = time.perf_counter()
                doc = await consumer.renter.run(model, messages, max_tokens=24, temperature_milli=0, escrow=aid,
                                                prefs=Preferences(sort="cheapest", trust_floor=-1.0))
                failover.append(time.perf_counter() - t)
                assert doc.provider == dear.identity.peer_id and doc.attempts[0].provider == cheap_id
            nursery.cancel_scope.cancel()
    d50, g50 = statistics.median(direct), statistics.median(gateway)
    print(f"direct upstream   p50 {d50 * 1000:7.1f} ms  p95 {pct(direct, 95) * 1000:7.1f} ms")
    print(f"gateway (HTTP->P2P->backend, paid and settled) p50 {g50 * 1000:7.1f} ms  p95 {pct(gateway, 95) * 1000:7.1f} ms")
    print(f"gateway overhead ratio: p50 {g50 / d50:.2f}  p95 {pct(gateway, 95) / pct(direct, 95):.2f}")
    goal("one-shot gateway call vs direct (p50)", g50 / d50, 1.1, at_most=True)
    n50, f50 = statistics.median(normal), statistics.median(failover)
    print(f"run, cheapest alive   p50 {n50 * 1000:7.1f} ms")
    print(f"run, cheapest dead    p50 {f50 * 1000:7.1f} ms  (failover adds {max(0.0, f50 - n50) * 1000:.1f} ms, "
          f"ratio {f50 / n50:.2f})")


if __name__ == "__main__":
    with transformers_serve() as (url, served_model), tempfile.TemporaryDirectory() as tmpdir:
        trio.run(main, url, served_model, Path(tmpdir))
