"""Escrow throughput with full durability (SQLite WAL, synchronous=FULL).

Prints durable claims/s and channel opens/s through the agent's rules (signature checks,
idempotency record, double entry), one transaction each (``handle``) and by group commit (what
``serve_escrow`` does: the party's signature checked by two worker threads, ``apply_many`` over
the requests that queued meanwhile, one fsync a batch), and the ratios to a bare SQLite
single-insert loop with the same durability settings on the same disk, measured in the same run.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import protocol  # noqa: E402
from bench._goals import goal  # noqa: E402
from tests.support import identity  # noqa: E402
from tests.wallet.escrow_support import AGENT, new_agent, receipt, signed  # noqa: E402

N = 300
GROUPED, BATCH = 1200, 64


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
        grouped = [signed(protocol.EscrowClaim, provider, now,
                          receipt=receipt(channels[i % len(channels)], consumer, provider, 1000 + i,
                                          session=(N + i).to_bytes(16, "big")))
                   for i in range(GROUPED)]
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as workers:
            batch: list = []
            for prepared in workers.map(lambda c: agent.prepare(c, now), grouped):
                batch.append(prepared)
                if len(batch) == BATCH:
                    assert all(a.ok for a in agent.apply_many(batch))
                    batch = []
            assert all(a.ok for a in agent.apply_many(batch))
        group_rate = GROUPED / (time.perf_counter() - t)
        agent.check()
        agent.ledger.close()
        bare = bare_inserts(tmp / "bare.db", N)
    print(f"durable claims      {claim_rate:8.0f}/s")
    print(f"durable opens       {open_rate:8.0f}/s")
    print(f"bare sqlite insert  {bare:8.0f}/s (WAL, synchronous=FULL, one transaction each)")
    print(f"claims / bare ratio {claim_rate / bare:8.3f}")
    print(f"group-commit claims {group_rate:8.0f}/s ({BATCH} a commit)")
    goal("escrow claims by group commit vs bare single-insert loop", group_rate / bare, 3.0)


if __name__ == "__main__":
    main()
