"""Storage faults of a real escrow agent (issue 12, finding 7): a damaged ledger page found at
start stops money operations with one clear line to the client and one in the agent's log (no
traceback, no crash); `node escrow check` says so with the node stopped (and refuses while it
runs) and restores the latest backup, keeping the damaged file aside, with every balance back.
"""

from __future__ import annotations

import json

from tests.e2e.daemons import Daemon
from tests.wallet.test_ledger_integrity import damage_table_page
from wallet import list_ledger_backups


def _log_since(daemon: Daemon, offset: int) -> str:
    return (daemon.home / "daemon.log").read_text()[offset:]


def test_a_damaged_ledger_page_refuses_money_clearly_and_escrow_check_restores_every_balance(daemons):
    tmp_path, started = daemons
    agent = Daemon(tmp_path / "agent", "--escrow")
    started.append(agent)
    consumer = Daemon(tmp_path / "consumer", "--bootstrap", agent.addr)
    started.append(consumer)
    aid, cid = agent.info["peer_id"], consumer.info["peer_id"]
    agent.cli("escrow", "mint", "--to", cid, "--amount", "5")

    busy = agent.cli("escrow", "check", check=False)
    assert busy.returncode == 1 and "stop it first" in busy.stderr
    assert agent.stop() == 0  # a clean shutdown leaves a backup holding the mint
    ledger = agent.home / "escrow.db"
    assert list_ledger_backups(ledger)
    damage_table_page(ledger, "accounts")

    offset = len((agent.home / "daemon.log").read_text())
    agent.start()  # starts: its agent refuses money operations
    refused = consumer.cli("escrow", "open", "--escrow", agent.addr, "--provider", aid, "--amount", "1",
                           "--expires", "1h", check=False)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "ledger_damaged" in refused.stderr and "node escrow check" in refused.stderr
    mint = agent.cli("escrow", "mint", "--to", cid, "--amount", "1", check=False)
    assert mint.returncode == 1 and "ledger_damaged" in mint.stderr
    assert agent.stop() == 0
    log = _log_since(agent, offset)
    assert log.count("escrow ledger damaged") == 1 and "Traceback" not in log, log

    check = agent.cli("escrow", "check", check=False)
    assert check.returncode == 1 and "DAMAGED" in check.stdout and "--restore latest" in check.stderr
    restored = agent.cli("escrow", "check", "--restore", "latest")
    assert "integrity:     ok" in restored.stdout and "kept as" in restored.stderr
    assert [p.name for p in agent.home.glob("escrow.db.damaged-*")]  # never deleted
    doc = json.loads(agent.cli("escrow", "check", "--json").stdout)
    assert doc["ok"] and doc["totals"] == {"minted": 5_000_000, "withdrawn": 0, "available": 5_000_000, "locked": 0}

    agent.start()
    balance = json.loads(consumer.cli("wallet", "balance", "--escrow", agent.addr, "--json").stdout)
    assert (balance["available"], balance["locked"]) == (5_000_000, 0)
    consumer.cli("escrow", "open", "--escrow", agent.addr, "--provider", aid, "--amount", "1", "--expires", "1h")
