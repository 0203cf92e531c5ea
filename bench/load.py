"""One provider under load, with an upstream that answers at once (``tests/e2e/fast_upstream.py``
in a process of its own), so what is measured is the swarm's own work.

1. Throughput at 100 concurrent sessions: 10 consumer hosts x 10 sessions, each making CALLS
   paid calls in a row (channel opened, every receipt counter-signed, the channel settled),
   against 100 concurrent HTTP clients calling the same upstream directly, in the same run.
2. 1,000 concurrent sessions: 100 consumer hosts x 10 sessions (a provider takes 16 session
   streams per peer), opened ``OPENING`` at a time and held until all are open, then one paid
   call each, all at once: how many were served, the p95 of that call, and the resident memory
   of this process (agent, provider and the 100 consumer hosts share it: an upper bound on the
   provider's own).
Everything but the upstream shares this process and its two cores: the figures are a floor.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psutil  # noqa: E402
import trio  # noqa: E402

import protocol  # noqa: E402
from bench._goals import goal  # noqa: E402
from node._receipts import ReceiptStore  # noqa: E402
from node.consumer._session_client import open_session  # noqa: E402
from node.escrow._client import EscrowClient  # noqa: E402
from node.escrow._ops import EscrowOps  # noqa: E402
from node.escrow._service import serve_escrow  # noqa: E402
from node.net._host import open_host, parse_peer_addr, peer_addrs  # noqa: E402
from node.provider import ProviderService  # noqa: E402
from node.provider._admission import Admission  # noqa: E402
from node.provider._offers import Offer  # noqa: E402
from node.provider._storefront import Storefront  # noqa: E402
from node.provider.backends._openai import OpenAIBackend  # noqa: E402
from protocol import SESSION_PROTOCOL  # noqa: E402
from tests.node.helpers import LOOPBACK  # noqa: E402
from tests.support import identity  # noqa: E402
from wallet import EscrowAgent, Ledger  # noqa: E402

CALLS = int(os.environ.get("BENCH_CALLS", "5"))
OPENING = 64  # sessions being opened at once (channel + handshake); the calls then run all at once
USER = [{"role": "user", "content": "hi"}]
MAX_TOKENS = 8
PRICE = protocol.Price(input_per_1k=1_000, output_per_1k=1_000)
CAP = 200_000

_UPSTREAM = """
import sys
sys.path.insert(0, {root!r})
from tests.e2e.fast_upstream import fast_upstream
with fast_upstream() as url:
    print(url, flush=True)
    sys.stdin.read()
"""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def direct(url: str, clients: int) -> float:
    """Calls/s of ``clients`` concurrent HTTP clients, CALLS streamed calls each."""
    body = {"model": "m", "messages": USER, "max_tokens": MAX_TOKENS, "stream": True}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def one() -> None:
            for _ in range(CALLS):
                async with http.stream("POST", "/chat/completions", json=body) as r:
                    async for _line in r.aiter_lines():
                        pass

        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one)
        return clients * CALLS / (time.perf_counter() - t)


async def swarm(url: str, tmp: Path, hosts: int, per_host: int, calls: int) -> dict[str, Any]:
    """``hosts`` x ``per_host`` concurrent sessions on one provider, ``calls`` calls each."""
    agent_id, provider_id = identity("load-agent"), identity("load-provider")
    spec = f"openai:{url}"
    backend = OpenAIBackend.from_spec(spec, None, model="m")
    offer = Offer(model="m", backend=spec, input_price=PRICE.input_per_1k, output_price=PRICE.output_per_1k,
                  max_context=4096, max_concurrent=hosts * per_host)
    latencies: list[float] = []
    failures: list[str] = []
    async with AsyncExitStack() as stack:
        agent_host = await stack.enter_async_context(open_host(agent_id, LOOPBACK))
        provider_host = await stack.enter_async_context(open_host(provider_id, LOOPBACK))
        ledger = Ledger(tmp / "escrow.db")
        stack.callback(ledger.close)
        agent = EscrowAgent(ledger, agent_id)
        receipts = ReceiptStore(tmp / "provider-receipts.db")
        stack.callback(receipts.close)
        await backend.start()

        async def backend_for(_offer: Offer) -> OpenAIBackend:
            return backend

        storefront = Storefront(provider_id, (offer,), backend_for, Admission(), accept_escrow=(agent_id.peer_id,),
                                wall_clock=time.time)
        service = ProviderService(provider_id, storefront, EscrowClient(provider_host), receipts,
                                  max_waiting=hosts * per_host)
        provider_host.set_stream_handler(SESSION_PROTOCOL, service.handle)
        agent_addr = peer_addrs(agent_host)[0]
        await provider_host.connect(parse_peer_addr(agent_addr))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.push_async_callback(lambda: _cancel(nursery))
        await nursery.start(serve_escrow, agent_host, agent)
        await nursery.start(service.serve_settlement)
        consumers = []
        now = int(time.time())
        for i in range(hosts):
            ident = identity(f"load-consumer-{i}")
            agent.handle(protocol.sign(protocol.EscrowMint(request_id=os.urandom(16), party=agent_id.peer_id,
                                                           to=ident.peer_id, amount=10**9, issued_at=now),
                                       "sig", agent_id), now)
            host = await stack.enter_async_context(open_host(ident, LOOPBACK))
            await host.connect(parse_peer_addr(agent_addr))
            store = ReceiptStore(tmp / f"consumer-{i}.db")
            stack.callback(store.close)
            consumers.append((host, EscrowOps(ident, EscrowClient(host), time.time), store))

        total = hosts * per_host
        opening = trio.CapacityLimiter(OPENING)
        settled = [0]  # sessions opened or failed to open
        all_open = trio.Event()
        call_started = [0.0]

        def opened() -> None:
            settled[0] += 1
            if settled[0] == total:
                call_started[0] = time.perf_counter()
                all_open.set()

        async def session(host: Any, ops: EscrowOps, store: ReceiptStore) -> None:
            try:
                async with AsyncExitStack() as held:
                    async with opening:  # opened at a bounded pace; then they are all live at once
                        channel = await ops.open_grant(agent_addr, provider_id.peer_id, CAP, 3600)
                        handle = await held.enter_async_context(open_session(
                            host, ops.identity, provider=provider_id.peer_id, addrs=tuple(peer_addrs(provider_host)),
                            model="m", price=PRICE, listing_seq=1, channel=channel, spend_limit=CAP, max_context=4096,
                            receipts=store, connect_timeout_s=60, open_timeout_s=120, idle_timeout_s=300))
                    opened()
                    await all_open.wait()
                    t = time.perf_counter()
                    for _ in range(calls):
                        await handle.call(USER, MAX_TOKENS, temperature_milli=0)
                    latencies.append(time.perf_counter() - t)
            except Exception as exc:  # counted, not fatal: "all served" is what is measured
                failures.append(f"{type(exc).__name__}: {exc}")
                if not all_open.is_set() and len(failures) + len(latencies) <= total:
                    opened()

        started = time.perf_counter()
        async with trio.open_nursery() as sessions:
            for host, ops, store in consumers:
                for _ in range(per_host):
                    sessions.start_soon(session, host, ops, store)
        elapsed = time.perf_counter() - (call_started[0] or started)
        rss = psutil.Process().memory_info().rss / 1e6
        agent.check()
    await backend.aclose()
    return {"served": len(latencies), "failed": failures, "elapsed": elapsed, "latencies": latencies, "rss": rss,
            "calls_per_s": len(latencies) * calls / elapsed}


async def _cancel(nursery: trio.Nursery) -> None:
    nursery.cancel_scope.cancel()


def main() -> None:
    upstream = subprocess.Popen([sys.executable, "-c", _UPSTREAM.format(root=str(Path(__file__).resolve().parents[1]))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = upstream.stdout.readline().strip()  # type: ignore[union-attr]
        base = trio.run(direct, url, 100)
        with tempfile.TemporaryDirectory() as tmp:
            hundred = trio.run(swarm, url, Path(tmp), 10, 10, CALLS)
        with tempfile.TemporaryDirectory() as tmp:
            thousand = trio.run(swarm, url, Path(tmp), 100, 10, 1)
    finally:
        upstream.stdin.close()  # type: ignore[union-attr]
        upstream.wait(timeout=30)
    print(f"upstream alone, 100 concurrent clients: {base:7.1f} calls/s")
    print(f"swarm, 100 concurrent sessions:         {hundred['calls_per_s']:7.1f} calls/s "
          f"({hundred['served']} of 100 sessions served)")
    lat = thousand["latencies"] or [float("nan")]
    print(f"swarm, 1,000 concurrent sessions: {thousand['served']} served, {len(thousand['failed'])} failed in "
          f"{thousand['elapsed']:.1f} s of calls; a call's p50 {statistics.median(lat):.2f} s, p95 {pct(lat, 95):.2f} s; "
          f"process RSS {thousand['rss']:.0f} MB (agent + provider + 100 consumer hosts)")
    for why in sorted(set(thousand["failed"]))[:3]:
        print(f"  a failure: {why[:200]}")
    goal("provider throughput vs upstream at 100 sessions", hundred["calls_per_s"] / base, 0.9)
    goal("1,000 concurrent sessions served", thousand["served"], 1000)


if __name__ == "__main__":
    main()
