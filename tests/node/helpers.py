"""Helpers for networked tests: in-process swarms on 127.0.0.1, port 0; waiting on the market's
change event (``until_market``), and deadline polling for what has no event."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import trio

import protocol
from node.net._host import open_host, parse_peer_addr, peer_addrs
from node.net._market import Market, MarketConfig, open_market
from tests.support import AGENT, PRICE, identity

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> float:
    """Poll ``predicate`` until it holds; return the seconds it took. Fails after ``timeout``.
    For what has no event (a mesh forming, connections closing); a market change has one."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_until_async(probe: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> float:
    """``wait_until`` for a probe that must itself do I/O (a DHT lookup)."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not await probe():
            await trio.sleep(0.05)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def until_market(markets: Market | list[Market], predicate: Callable[[Market], object], timeout: float = 20.0,
                       what: str = "condition") -> None:
    """Wait until ``predicate(market)`` holds for every market, waking on each one's change event
    (``Market.wait_changed``), never polling. Fails after ``timeout``."""
    with trio.move_on_after(timeout):
        for market in markets if isinstance(markets, list) else [markets]:
            while True:
                seen = market.view.version
                if predicate(market):
                    break
                await market.wait_changed(seen)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def listing_template(models: tuple[str, ...] = ("tiny",), price: protocol.Price = PRICE) -> protocol.Listing:
    return protocol.Listing(
        provider=AGENT.peer_id,  # replaced by the market with the publisher's id
        addrs=(),
        seq=0,
        issued_at=0,
        expires_at=0,
        provider_type="self_hosted",
        models=tuple(protocol.ModelOffer(name=m, price=price, max_context=2048) for m in models),
        escrow_agents=(AGENT.peer_id,),
        hardware=protocol.Hardware(),
    )


class Clock:
    """A wall clock that tests can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@asynccontextmanager
async def market_swarm(
    n: int, clock: Callable[[], float] = time.time, prefix: str = "node"
) -> AsyncIterator[tuple[AsyncExitStack, list[Market]]]:
    """``n`` market nodes in this process; node i dials node 0 and node i-1."""
    config = MarketConfig(max_peers_per_subnet=0)
    async with AsyncExitStack() as stack:
        markets: list[Market] = []
        for i in range(n):
            ident = identity(f"{prefix}-{i}")
            host = await stack.enter_async_context(open_host(ident, LOOPBACK))
            market = await stack.enter_async_context(open_market(host, ident, config, clock=clock))
            for j in sorted({0, i - 1}) if i else []:
                await host.connect(parse_peer_addr(peer_addrs(markets[j].host)[0]))
            markets.append(market)
        yield stack, markets


async def join(stack: AsyncExitStack, name: str, via: Market, subscribe: bool = True,
               clock: Callable[[], float] = time.time) -> Market:
    """Start one more market node connected to ``via``."""
    ident = identity(name)
    host = await stack.enter_async_context(open_host(ident, LOOPBACK))
    market = await stack.enter_async_context(
        open_market(host, ident, MarketConfig(max_peers_per_subnet=0, subscribe=subscribe), clock=clock)
    )
    await host.connect(parse_peer_addr(peer_addrs(via.host)[0]))
    return market


async def until_found_by_a_late_node(stack: AsyncExitStack, via: Market, provider: str, name: str,
                                     what: str = "DHT lookup", model: str = "tiny") -> Market:
    """Join a fresh node (no gossip) through ``via`` and wait until a DHT lookup of ``model`` finds
    exactly ``provider``: the DHT still serves. Returns the late node."""
    late = await join(stack, name, via=via, subscribe=False)

    async def lookup_finds() -> bool:
        return [lst.provider for lst in await late.lookup(model)] == [provider]

    await wait_until_async(lookup_finds, what=what)
    return late


async def gossip_line(stack: AsyncExitStack, prefix: str, names: tuple[str, ...] = ("a", "b", "c"),
                      **config: object) -> list[Market]:
    """Markets joined in a line a - b - c (``names`` in order, identities ``identity(f"{prefix}-{name}")``),
    held by ``stack``. Subscribe them to a topic, then ``wait_mesh`` for it."""
    markets: list[Market] = []
    for name in names:
        ident = identity(f"{prefix}-{name}")
        host = await stack.enter_async_context(open_host(ident, LOOPBACK))
        market = await stack.enter_async_context(open_market(host, ident, MarketConfig(max_peers_per_subnet=0,
                                                                                       **config)))  # type: ignore[arg-type]
        if markets:
            await host.connect(parse_peer_addr(peer_addrs(markets[-1].host)[0]))
        markets.append(market)
    return markets


async def wait_mesh(markets: list[Market], topic: str) -> None:
    """Wait until each market of a line has the next one in its gossip mesh for ``topic``."""
    await wait_until(lambda: all(b.host.get_id() in a.pubsub.router.mesh.get(topic, set())
                                 for a, b in zip(markets, markets[1:])), what="the line's mesh formed")
