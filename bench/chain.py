"""Settlement cost on a chain against the escrow agent's, in one run.

On the in-process EVM (eth-tester on py-evm: what the embedded default settles on) the provider
claims EIP-712 vouchers from several channels and sessions, one per transaction and then
``claim_many`` 64 per transaction; printed: gas per claim each way, claims per transaction, and
vouchers settled per second of wall time (signing and the EVM's own work in this process). The
agent's durable claims/s (one SQLite transaction and fsync each, as bench/escrow.py measures) is the
baseline. A voucher, like a receipt, is cumulative: one claim settles every call of its session
since the last, so calls settled per claim depend on the claim interval, not on the chain.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import protocol  # noqa: E402
from tests.support import identity  # noqa: E402
from tests.wallet.chain_rig import address, chain_rig, key  # noqa: E402
from tests.wallet.escrow_support import AGENT, new_agent, receipt, signed  # noqa: E402

SINGLE, BATCHED, BATCH, CHANNELS = 30, 256, 64, 8


def agent_claims_per_s(n: int) -> float:
    consumer, provider = identity("bench-consumer"), identity("bench-provider")
    now = int(time.time())
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as tmp:
        agent = new_agent(Path(tmp))
        agent.handle(signed(protocol.EscrowMint, AGENT, now, to=consumer.peer_id, amount=10**12), now)
        channels = [agent.handle(signed(protocol.EscrowOpen, consumer, now, provider=provider.peer_id, cap=10**6,
                                        expires_at=now + 3600), now).channels[0].channel for _ in range(CHANNELS)]
        claims = [signed(protocol.EscrowClaim, provider, now,
                         receipt=receipt(channels[i % CHANNELS], consumer, provider, 1000 + i,
                                         session=i.to_bytes(16, "big")))
                  for i in range(n)]
        t = time.perf_counter()
        for c in claims:
            assert agent.handle(c, now).ok
        rate = n / (time.perf_counter() - t)
        agent.ledger.close()
    return rate


def main() -> None:
    rig = chain_rig()
    rig.fund("consumer", tokens=10**12, deposit=10**12)
    rig.fund("provider")
    expiry = rig.chain.now() + 3600
    channels = [rig.chain.open_channel(key("consumer"), address("provider"), 10**9, expiry)[0]
                for _ in range(CHANNELS)]

    def vouchers(first_nonce: int, n: int):
        return [rig.voucher("consumer", channels[i % CHANNELS], first_nonce + i, 1000 + i) for i in range(n)]

    single = vouchers(1, SINGLE)
    t = time.perf_counter()
    single_gas = [rig.chain.claim(key("provider"), [v])[1].gas_used for v in single]
    single_rate = SINGLE / (time.perf_counter() - t)
    batched = vouchers(10_000, BATCHED)
    t = time.perf_counter()
    batch_gas = [rig.chain.claim(key("provider"), batched[i:i + BATCH])[1].gas_used
                 for i in range(0, BATCHED, BATCH)]
    batch_rate = BATCHED / (time.perf_counter() - t)
    paid = sum(1000 + i for i in range(SINGLE)) + sum(1000 + i for i in range(BATCHED))
    assert rig.chain.token_balance(address("provider")) == paid, "the provider was not paid every voucher"
    agent = agent_claims_per_s(SINGLE * 4)
    per_single = sum(single_gas) / len(single_gas)
    per_batched = sum(batch_gas) / BATCHED
    print(f"chain: gas per claim, one a transaction   {per_single:10.0f}")
    print(f"chain: gas per claim, {BATCH} a transaction   {per_batched:10.0f} ({sum(batch_gas) / len(batch_gas):.0f} a "
          f"transaction, {per_batched / per_single:.2f} of one alone)")
    print(f"chain: claims per transaction             {BATCH:10d} (claim_many's limit)")
    print(f"chain: vouchers settled/s, one a tx       {single_rate:10.1f} (in-process EVM)")
    print(f"chain: vouchers settled/s, {BATCH} a tx       {batch_rate:10.1f}")
    print(f"agent: durable claims/s                   {agent:10.1f} (SQLite, one fsync each)")
    print(f"chain ({BATCH} a tx) / agent claims/s ratio   {batch_rate / agent:10.3f}")


if __name__ == "__main__":
    main()
