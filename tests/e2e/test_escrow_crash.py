"""Crash safety with a real process: an escrow daemon receiving a stream of claims is killed
with SIGKILL at a random moment and restarted on the same home. Every claim it acknowledged
is there, none is applied twice when everything is retried, and the invariant holds."""

from __future__ import annotations

import random
import time

import trio

import protocol
import wallet
from node.escrow._client import EscrowClient, EscrowUnreachable
from node.net._host import open_host
from tests.e2e.daemons import Daemon
from tests.support import identity
from tests.wallet.escrow_support import receipt, signed

CONSUMER, PROVIDER = identity("crash-consumer"), identity("crash-provider")
CLAIMS = 400
EACH = 1_000


async def test_sigkill_during_a_stream_of_claims(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    daemon = await trio.to_thread.run_sync(lambda: Daemon(tmp_path / "agent", "--escrow"))
    try:
        await trio.to_thread.run_sync(lambda: daemon.cli("escrow", "mint", "--to", CONSUMER.peer_id, "--amount", "1"))
        async with open_host(PROVIDER, ["/ip4/127.0.0.1/tcp/0"]) as host:
            client = EscrowClient(host)  # every answer is checked for the agent's signature

            async def call(request):
                return await client.call(daemon.info["addrs"][0], request, timeout=10)

            now = int(time.time())
            opened = await call(signed(protocol.EscrowOpen, CONSUMER, now, provider=PROVIDER.peer_id,
                                       cap=CLAIMS * EACH, expires_at=now + 3600))
            assert opened.ok, opened.error
            channel = opened.channels[0].channel
            claims = [signed(protocol.EscrowClaim, PROVIDER, now,
                             receipt=receipt(channel, CONSUMER, PROVIDER, EACH, session=i.to_bytes(16, "big")))
                      for i in range(CLAIMS)]
            acked: dict[bytes, int] = {}

            async def stream_claims():
                for claim in claims:
                    response = await call(claim)
                    assert response.ok, response.error
                    acked[claim.request_id] = response.paid

            async def killer():
                # a random moment: after a random number of acknowledged claims, plus a random delay
                # of up to a few claims' time, so the kill can land anywhere inside one
                threshold = rng.randrange(10, CLAIMS // 2)
                while len(acked) < threshold:
                    await trio.sleep(0.001)
                await trio.sleep(rng.uniform(0, 0.02))
                await trio.to_thread.run_sync(daemon.kill)

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream_claims)
                    nursery.start_soon(killer)
            except* EscrowUnreachable:
                pass  # the claim in flight when the process died
            assert 0 < len(acked) < CLAIMS, f"seed {seed}: the kill should land mid-stream ({len(acked)} acked)"

            await trio.to_thread.run_sync(daemon.start)
            applied_now = 0
            for claim in claims:  # the provider retries everything it sent or meant to send
                response = await call(claim)
                if claim.request_id in acked:
                    assert (response.error, response.paid) == ("replayed", EACH), f"seed {seed}"
                elif response.ok:
                    applied_now += 1
                else:  # applied before the crash, its answer lost on the way
                    assert response.error == "replayed", f"seed {seed}: {response.error}"
            state = await call(signed(protocol.EscrowQuery, PROVIDER, now, channel_id=channel.channel_id))
            assert state.channels[0].claimed == CLAIMS * EACH, f"seed {seed}: a claim was lost or applied twice"
            assert applied_now <= CLAIMS - len(acked)
    finally:
        await trio.to_thread.run_sync(daemon.stop)
    ledger = wallet.Ledger(tmp_path / "agent" / "escrow.db")
    try:
        checker = wallet.EscrowAgent(ledger, identity("checker"))
        totals = checker.check()
        assert totals["minted"] == 1_000_000 and totals["available"] + totals["locked"] == 1_000_000
        assert checker.balance(PROVIDER.peer_id).available == CLAIMS * EACH
    finally:
        ledger.close()
