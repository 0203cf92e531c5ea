"""P2P session overhead: the same backend and prompt set, called directly over its own
OpenAI-compatible HTTP server on loopback (`transformers serve` on the builtin model), and
through an Inferswarm session (consumer -> libp2p -> provider -> openai: backend -> that server,
with metering, receipts and counter-signatures). Prints per-call latency p50/p95 and streamed
tokens/s for both, and the ratios P2P / direct."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import trio  # noqa: E402

from bench._goals import goal  # noqa: E402
from node.provider._offers import Offer  # noqa: E402
from node.provider.backends._openai import OpenAIBackend  # noqa: E402
from tests.node.session_rig import session_rig  # noqa: E402
from tests.node.upstream import transformers_serve  # noqa: E402

PROMPTS = [f"Prompt number {i}: tell me about peer-to-peer inference." for i in range(12)]
MAX_TOKENS = 48


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def direct(base_url: str, model: str) -> tuple[list[float], list[float]]:
    latencies, rates = [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        for prompt in PROMPTS:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                    "stream": True, "temperature": 0.0, "top_p": 1.0}
            t = time.perf_counter()
            tokens = 0
            async with client.stream("POST", "/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        usage = json.loads(line[5:]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            dt = time.perf_counter() - t
            latencies.append(dt)
            rates.append(tokens / dt)
    return latencies, rates


async def p2p(base_url: str, model: str) -> tuple[list[float], list[float]]:
    spec = f"openai:{base_url}"
    backend = OpenAIBackend.from_spec(spec, None, model=model)
    offer = Offer(model=model, backend=spec, input_price=1000, output_price=1000, max_context=4096)
    latencies, rates = [], []
    async with session_rig({model: offer}, {model: backend}, tag="bench-session") as rig:
        channel = await rig.open_channel(cap=5_000_000)
        async with rig.session(channel, model=model) as session:
            for prompt in PROMPTS:
                t = time.perf_counter()
                result = await session.call([{"role": "user", "content": prompt}], MAX_TOKENS, temperature_milli=0)
                dt = time.perf_counter() - t
                latencies.append(dt)
                rates.append(result.receipt.tokens_out / dt)
    await backend.aclose()
    return latencies, rates


def main() -> None:
    with transformers_serve() as (base_url, model):
        trio.run(direct, base_url, model)  # warm the server's model once, outside the measurement
        d_lat, d_rate = trio.run(direct, base_url, model)
        p_lat, p_rate = trio.run(p2p, base_url, model)
    for name, lat, rate in (("direct HTTP", d_lat, d_rate), ("P2P session", p_lat, p_rate)):
        print(f"{name:12s} latency p50 {statistics.median(lat) * 1000:7.1f} ms  p95 {pct(lat, 95) * 1000:7.1f} ms"
              f"  streamed {statistics.median(rate):7.1f} tokens/s")
    print(f"ratio P2P/direct: latency p50 {statistics.median(p_lat) / statistics.median(d_lat):.2f}"
          f"  p95 {pct(p_lat, 95) / pct(d_lat, 95):.2f}  tokens/s {statistics.median(p_rate) / statistics.median(d_rate):.2f}")
    goal("session tokens/s vs direct", statistics.median(p_rate) / statistics.median(d_rate), 0.97)
    goal("session p50 latency over direct", (statistics.median(p_lat) - statistics.median(d_lat)) * 1000, 1.0,
         at_most=True, unit=" ms")


if __name__ == "__main__":
    main()
