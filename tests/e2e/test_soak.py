"""Soak: bursts of paid calls through real daemons while a random party is killed with SIGKILL
and restarted, for several rounds. After each round the agent's ledger invariant holds; at the
end every counter-signed receipt has been paid to the provider, with no manual command."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from pathlib import Path

import httpx
import trio

from tests.e2e.daemons import Daemon, poll
from tests.e2e.fast_upstream import fast_upstream

ROUNDS = int(os.environ.get("SOAK_ROUNDS", "3"))
CALLS = 24  # concurrent calls per round
MODEL = "soak"
MINT_CREDITS = 50


def ledger_rows(agent: Daemon, sql: str, *args) -> list[tuple]:
    db = sqlite3.connect(f"file:{agent.home / 'escrow.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def balance(agent: Daemon, peer: str) -> int:
    rows = ledger_rows(agent, "SELECT balance FROM accounts WHERE name = ?", f"peer:{peer}")
    return int(rows[0][0]) if rows else 0


def invariant(agent: Daemon) -> None:
    """balances + locked == minted - withdrawn, read from the agent's ledger file."""
    def total(where: str) -> int:
        return int(ledger_rows(agent, f"SELECT COALESCE(SUM(balance), 0) FROM accounts WHERE {where}")[0][0])

    minted, withdrawn = -total("name = 'system:mint'"), total("name = 'system:withdrawn'")
    available, locked = total("name LIKE 'peer:%'"), total("name LIKE 'channel:%' OR name LIKE 'budget:%'")
    assert available + locked == minted - withdrawn, (available, locked, minted, withdrawn)


def signed_total(*homes: Path) -> int:
    """The highest doubly-signed cumulative of every session either side holds, summed."""
    best: dict[bytes, int] = {}
    for home in homes:
        path = home / "receipts.db"
        if not path.exists():
            continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            for session, cumulative in db.execute("SELECT session_id, MAX(cumulative) FROM receipts GROUP BY session_id"):
                best[bytes(session)] = max(best.get(bytes(session), 0), int(cumulative))
        finally:
            db.close()
    return sum(best.values())


async def burst(consumer: Daemon, rng: random.Random) -> int:
    """``CALLS`` chat completions at once through the consumer's API; returns how many succeeded."""
    token = (consumer.home / "api.token").read_text().strip()
    url = f"{consumer.info['api_url']}/v1/chat/completions"
    ok = 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal ok
        await trio.sleep(rng.uniform(0, 0.5))
        try:
            r = await client.post(url, headers={"authorization": f"Bearer {token}"},
                                  json={"model": MODEL, "max_tokens": 16,
                                        "messages": [{"role": "user", "content": "eight words, please"}]})
        except httpx.HTTPError:  # the consumer's daemon was the one killed
            return
        ok += r.status_code == 200

    async with httpx.AsyncClient(timeout=120) as client, trio.open_nursery() as nursery:
        for _ in range(CALLS):
            nursery.start_soon(one, client)
    return ok


async def test_sigkill_a_random_party_during_bursts_and_every_signed_receipt_is_paid(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    started: list[Daemon] = []
    run = trio.to_thread.run_sync
    with fast_upstream() as upstream:
        try:
            agent = await run(lambda: Daemon(tmp_path / "agent", "--escrow"))
            started.append(agent)
            aid = agent.info["peer_id"]
            provider = await run(lambda: Daemon(tmp_path / "provider", "--bootstrap", agent.addr,
                                                "--accept-escrow", aid))
            started.append(provider)
            consumer = await run(lambda: Daemon(tmp_path / "consumer", "--bootstrap", agent.addr))
            started.append(consumer)
            cid, pid = consumer.info["peer_id"], provider.info["peer_id"]
            await run(lambda: agent.cli("escrow", "mint", "--to", cid, "--amount", str(MINT_CREDITS)))
            await run(lambda: provider.cli("offer", "add", "--model", MODEL, "--backend", f"openai:{upstream}",
                                           "--input-price", "0.50", "--output-price", "1.50", "--max-context", "2048"))

            def listed():
                return json.loads(consumer.cli("providers", "--model", MODEL, "--json").stdout)

            await run(lambda: poll(listed, 30, "the listing"))
            served = 0
            for round_ in range(ROUNDS):
                victim = rng.choice([agent, provider, consumer])

                async def kill_and_restart(victim=victim):
                    await trio.sleep(rng.uniform(0.2, 1.5))
                    await run(victim.kill)
                    await run(victim.start)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_and_restart)
                    served += await burst(consumer, rng)
                await run(lambda: poll(listed, 60, f"round {round_}: the listing again (seed {seed})"))
                invariant(agent)
            assert served > 0, f"seed {seed}: no call was served in {ROUNDS} rounds"

            def all_paid():
                return balance(agent, pid) == signed_total(provider.home, consumer.home)

            try:
                await run(lambda: poll(all_paid, 90, "every signed receipt paid"))
            except AssertionError:
                raise AssertionError(f"seed {seed}: the provider was paid {balance(agent, pid)} µc of "
                                     f"{signed_total(provider.home, consumer.home)} counter-signed") from None
            invariant(agent)
            paid = balance(agent, pid)
            assert paid == signed_total(provider.home, consumer.home) > 0
        finally:
            for d in reversed(started):
                await run(d.stop)
