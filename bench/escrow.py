"""Escrow throughput with full durability (SQLite WAL, synchronous=FULL, one transaction each).

Prints durable claims/s and channel opens/s through the agent's rules (signature checks,
idempotency record, double entry), and the ratio of claims/s to a bare SQLite insert loop
with the same durability settings on the same disk, measured in the same run.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import protocol  # noqa: E402
from tests.support import identity  # noqa: E402
from tests.wallet.escrow_support import AGENT, new_agent, receipt, signed  # noqa: E402

N = 300


def bare_inserts(path: Path, n: int) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, request BLOB, amount INTEGER)")
    t = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t(request, amount) VALUES (?, ?)", (i.to_bytes(16, "big"), i))
        db.execute("COMMIT")
    rate = n / (time.perf_counter() - t)
    db.close()
    return rate


def main() -> None:
    consumer, provider = identity("bench-consumer"), identity("bench-provider")
    now = int(time.time())
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as tmp:
        tmp = Path(tmp)
        agent = new_agent(tmp)
        agent.handle(signed(protocol.EscrowMint, AGENT, now, to=consumer.peer_id, amount=10**12), now)
        opens = [signed(protocol.EscrowOpen, consumer, now, provider=provider.peer_id, cap=10**6, expires_at=now + 3600)
                 for _ in range(N)]
        t = time.perf_counter()
        channels = [agent.handle(o, now).channels[0].channel for o in opens]
        open_rate = N / (time.perf_counter() - t)
        claims = [signed(protocol.EscrowClaim, provider, now,
                         receipt=receipt(channels[i % len(channels)], consumer, provider, 1000 + i,
                                         session=i.to_bytes(16, "big")))
                  for i in range(N)]
        t = time.perf_counter()
        for c in claims:
            assert agent.handle(c, now).ok
        claim_rate = N / (time.perf_counter() - t)
        agent.check()
        agent.ledger.close()
        bare = bare_inserts(tmp / "bare.db", N)
    print(f"durable claims      {claim_rate:8.0f}/s")
    print(f"durable opens       {open_rate:8.0f}/s")
    print(f"bare sqlite insert  {bare:8.0f}/s (WAL, synchronous=FULL, one transaction each)")
    print(f"claims / bare ratio {claim_rate / bare:8.3f}")


if __name__ == "__main__":
    main()
