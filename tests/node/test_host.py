"""The host: stays reachable after hundreds of inbound connections, refuses plaintext."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from node.net._host import open_host, parse_peer_addr, peer_addrs
from tests.node.helpers import LOOPBACK, wait_until
from tests.support import identity

INBOUND = 400
DIALERS = 10


def task_count() -> int:
    n, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


async def test_400_inbound_connections_do_not_leak_slots_or_tasks():
    async with open_host(identity("server"), LOOPBACK) as server, AsyncExitStack() as stack:
        target = parse_peer_addr(peer_addrs(server)[0])
        dialers = [await stack.enter_async_context(open_host(identity(f"dialer-{i}"), LOOPBACK)) for i in range(DIALERS)]
        baseline = task_count()

        async def cycle(dialer, n):
            for _ in range(n):
                await dialer.connect(target)
                await dialer.disconnect(server.get_id())

        async with trio.open_nursery() as nursery:
            for d in dialers:
                nursery.start_soon(cycle, d, INBOUND // DIALERS)
        await wait_until(lambda: len(server.get_network().connections) == 0, what="all inbound connections closed")
        await wait_until(lambda: task_count() <= baseline, what="task count back to its baseline")
        # a new peer can still connect
        newcomer = await stack.enter_async_context(open_host(identity("newcomer"), LOOPBACK))
        await newcomer.connect(target)
        assert server.get_id() in newcomer.get_connected_peers()


async def test_plaintext_dialer_is_refused():
    async with open_host(identity("secure"), LOOPBACK) as server:
        key_pair = create_new_key_pair(identity("plain").seed)
        plain = new_host(key_pair=key_pair, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)})
        async with plain.run(listen_addrs=[]):
            try:
                await plain.connect(parse_peer_addr(peer_addrs(server)[0]))
            except Exception as exc:  # the swarm's dial error: no security protocol in common
                assert "connect" in str(exc).lower() or "negotiat" in str(exc).lower()
            else:
                raise AssertionError("a plaintext-only dialer got a connection")
            finally:
                await plain.close()
        assert plain.get_id() not in server.get_connected_peers()
