"""Failover with real daemons: the cheapest provider is killed; `node run` still succeeds on the
next one, pays only it, and the dead provider's trust drops."""

from __future__ import annotations

import json

from tests.e2e.daemons import Daemon, poll


def test_cheapest_provider_dies_and_the_next_one_serves(daemons):
    tmp_path, started = daemons
    agent = Daemon(tmp_path / "agent", "--escrow")
    started.append(agent)
    aid = agent.info["peer_id"]
    cheap = Daemon(tmp_path / "cheap", "--bootstrap", agent.addr, "--accept-escrow", aid)
    started.append(cheap)
    dear = Daemon(tmp_path / "dear", "--bootstrap", agent.addr, "--accept-escrow", aid)
    started.append(dear)
    consumer = Daemon(tmp_path / "consumer", "--bootstrap", agent.addr)
    started.append(consumer)
    for d, price in ((cheap, "0.10"), (dear, "0.90")):
        d.cli("offer", "add", "--model", "tiny", "--backend", "builtin", "--input-price", price, "--output-price", price)
    agent.cli("escrow", "mint", "--to", consumer.info["peer_id"], "--amount", "5")
    poll(lambda: len(json.loads(consumer.cli("providers", "--model", "tiny", "--json").stdout)) == 2, 20, "two listings")

    cheap.kill()  # its listing is still in every view until it expires
    doc = json.loads(consumer.cli("run", "--model", "tiny", "--escrow", aid, "--max-tokens", "16", "--json",
                                  "Hello").stdout)
    assert doc["provider"] == dear.info["peer_id"]
    assert [a["provider"] for a in doc["attempts"]] == [cheap.info["peer_id"], dear.info["peer_id"]]
    assert doc["attempts"][0]["error"] and doc["attempts"][1]["error"] is None

    # paid when the standing session closes (standing_idle_s after the call) or when claimed
    poll(lambda: json.loads(dear.cli("wallet", "balance", "--escrow", aid, "--json").stdout)["available"]
         == doc["cost"]["amount"] > 0, 30, "the provider's payment")
    channels = json.loads(consumer.cli("wallet", "balance", "--escrow", aid, "--json").stdout)["channels"]
    to_cheap = [c for c in channels if c["provider"] == cheap.info["peer_id"]]
    assert to_cheap == []  # the dead provider was dialled first: no money was ever locked for it

    rows = {r["peer_id"]: r for r in json.loads(consumer.cli("providers", "--model", "tiny", "--json").stdout)}
    assert rows[cheap.info["peer_id"]]["trust"] < 100 < rows[dear.info["peer_id"]]["trust"]
