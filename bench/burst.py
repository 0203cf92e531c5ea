"""A burst of concurrent paid calls through real daemons, and what it leaves behind.

Three ``node start`` processes on 127.0.0.1 (an escrow agent, a provider, a consumer), the
provider selling a model on an ``openai:`` backend that is a small local upstream answering at
once (so the figures are the swarm's, not a model's). ``N`` chat completions (default 1,000;
``BURST_N`` or argv[1]) are posted at once to the consumer's OpenAI-compatible API. Printed:
served and failed by cause, latency p50/p95 of the served ones, and what stays locked at the
agent afterwards (µc and channels): the consumer's money that no call used must come back.

The baseline in the same run: the same number of requests posted at once straight to the
upstream (``direct``), so ``ratio`` says what the swarm costs under the same load.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import trio  # noqa: E402

from tests.e2e.daemons import Daemon, poll  # noqa: E402
from tests.e2e.fast_upstream import fast_upstream  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("BURST_N", "1000"))
MODEL = "burst"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


async def burst(url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[list[float], collections.Counter]:
    """Post ``N`` requests at once: the latencies of the served ones, and failures by cause."""
    served: list[float] = []
    failed: collections.Counter = collections.Counter()
    example: dict[str, str] = {}
    limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one() -> None:
            t = time.perf_counter()
            try:
                r = await client.post(url, json=body, headers=headers)
            except httpx.HTTPError as exc:
                failed[f"transport: {type(exc).__name__}"] += 1
                return
            if r.status_code == 200:
                served.append(time.perf_counter() - t)
                return
            try:
                err = r.json().get("error", {})
                cause, message = err.get("code") or err.get("type") or "?", str(err.get("message", ""))
            except ValueError:
                cause, message = "not JSON", r.text[:200]
            failed[f"{r.status_code} {cause}"] += 1
            example.setdefault(f"{r.status_code} {cause}", message)

        async with trio.open_nursery() as nursery:
            for _ in range(N):
                nursery.start_soon(one)
    for cause, message in example.items():
        print(f"         e.g. {cause}: {message[:300]}")
    return served, failed


def locked_at_agent(agent: Daemon, consumer_id: str) -> tuple[int, int]:
    """(µc locked, channels open) of the consumer at the agent, read from its ledger file."""
    import sqlite3

    db = sqlite3.connect(f"file:{agent.home / 'escrow.db'}?mode=ro", uri=True)
    try:
        (locked,) = db.execute("SELECT COALESCE(SUM(cap - claimed), 0) FROM channels WHERE consumer = ? "
                               "AND status = 'open'", (consumer_id,)).fetchone()
        (n,) = db.execute("SELECT COUNT(*) FROM channels WHERE consumer = ? AND status = 'open'",
                          (consumer_id,)).fetchone()
    finally:
        db.close()
    return int(locked), int(n)


def report(name: str, served: list[float], failed: collections.Counter, wall: float) -> None:
    causes = ", ".join(f"{c}: {n}" for c, n in failed.most_common()) or "none"
    print(f"{name:8s} N={N}: served {len(served)}, failed {sum(failed.values())} ({causes}); "
          f"p50 {pct(served, 50) * 1000:.0f} ms, p95 {pct(served, 95) * 1000:.0f} ms; wall {wall:.1f} s")


def main() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say eight words."}], "max_tokens": 16}
    started: list[Daemon] = []
    with tempfile.TemporaryDirectory(prefix="isw-burst-") as tmp, fast_upstream() as upstream:
        base = Path(tmp)
        try:
            agent = Daemon(base / "agent", "--escrow")
            started.append(agent)
            aid = agent.info["peer_id"]
            provider = Daemon(base / "provider", "--bootstrap", agent.addr, "--accept-escrow", aid)
            started.append(provider)
            consumer = Daemon(base / "consumer", "--bootstrap", agent.addr)
            started.append(consumer)
            cid = consumer.info["peer_id"]
            agent.cli("escrow", "mint", "--to", cid, "--amount", "100000")
            provider.cli("offer", "add", "--model", MODEL, "--backend", f"openai:{upstream}", "--input-price", "0.50",
                         "--output-price", "1.50", "--max-context", "2048")
            poll(lambda: json.loads(consumer.cli("providers", "--model", MODEL, "--json").stdout), 30, "the listing")
            token = (consumer.home / "api.token").read_text().strip()
            headers = {"authorization": f"Bearer {token}"}
            api = consumer.info["api_url"]

            t = time.perf_counter()
            served, failed = trio.run(burst, f"{upstream}/chat/completions", {}, body)
            report("direct", served, failed, time.perf_counter() - t)
            direct_p50 = pct(served, 50)

            t = time.perf_counter()
            served, failed = trio.run(burst, f"{api}/v1/chat/completions", headers, body)
            report("swarm", served, failed, time.perf_counter() - t)
            print(f"ratio    p50 swarm/direct {pct(served, 50) / direct_p50:.1f}x")
            locked, channels = locked_at_agent(agent, cid)
            print(f"locked   right after the burst: {locked} µc in {channels} channels")
            deadline = time.monotonic() + 60
            while locked and time.monotonic() < deadline:
                time.sleep(1)
                locked, channels = locked_at_agent(agent, cid)
            print(f"locked   60 s after the burst: {locked} µc in {channels} channels")
        finally:
            for d in reversed(started):
                d.stop()


if __name__ == "__main__":
    main()
