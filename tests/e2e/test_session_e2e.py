"""Three real daemons — an escrow agent, a provider serving `builtin`, a consumer — and `node run`."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

import protocol
from tests.e2e.daemons import ROOT, node_env, start_market


def test_node_run_pays_exactly_the_receipt_and_refunds_the_rest(daemons):
    tmp_path, started = daemons
    agent, provider, consumer, aid = start_market(tmp_path, started)
    cid, pid = consumer.info["peer_id"], provider.info["peer_id"]

    doc = json.loads(consumer.cli("run", "--model", "tiny", "--max-tokens", "32", "--escrow", aid, "--budget", "0.5",
                                  "--json", "Hello there").stdout)
    assert {"id", "provider", "model", "choices", "usage", "cost", "latency_ms"} <= set(doc)
    assert doc["provider"] == pid and doc["model"] == "tiny"
    choice = doc["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = doc["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 32
    cost = doc["cost"]["amount"]
    price = protocol.Price(input_per_1k=500_000, output_per_1k=1_500_000)
    assert cost == protocol.call_cost(price, usage["prompt_tokens"], usage["completion_tokens"])

    (stored,) = json.loads(consumer.cli("receipts", "--json").stdout)["receipts"]
    receipt = protocol.decode(bytes.fromhex(stored["encoded"]), expect=(protocol.Receipt,))
    assert protocol.receipt_hash(receipt).hex() == doc["cost"]["receipt_id"]
    protocol.verify(receipt, "provider_sig", protocol.public_key_from_peer_id(pid))
    protocol.verify(receipt, "consumer_sig", protocol.public_key_from_peer_id(cid))
    assert receipt.output_hash == protocol.output_hash(choice["message"]["content"])

    consumer_wallet = json.loads(consumer.cli("wallet", "balance", "--escrow", aid, "--json").stdout)
    provider_wallet = json.loads(provider.cli("wallet", "balance", "--escrow", aid, "--json").stdout)
    assert provider_wallet["available"] == cost
    assert (consumer_wallet["available"], consumer_wallet["locked"]) == (2_000_000 - cost, 0)
    assert consumer_wallet["channels"][0]["status"] == "closed"

    # the provider's books: earnings equal its receipts, all claimed after the cooperative close
    books = json.loads(provider.cli("earnings", "--period", "1h", "--by", "client", "--json").stdout)
    assert books == {"period": "1h", "total": cost, "claimed": cost, "pending": 0, "forfeited": 0, "by": {cid: cost}}
    node_stats = json.loads(provider.cli("stats", "--json").stdout)
    assert node_stats["node"]["requests"] == 1 and node_stats["node"]["earnings"] == cost
    assert node_stats["node"]["tokens_served"] == usage["total_tokens"] and node_stats["node"]["avg_latency_ms"] >= 0
    assert node_stats["network"]["models"]["tiny"]["min_input_price"] == 500_000
    metrics = httpx.get(provider.info["api_url"] + "/metrics")  # no token: scrapers read it as is
    assert metrics.status_code == 200
    assert 'inferswarm_calls_served_total{model="tiny"} 1.0' in metrics.text
    assert f'inferswarm_earnings_microcredits_total{{model="tiny"}} {float(cost)}' in metrics.text
    assert (tmp_path / "provider" / "api.token").read_text().strip() not in metrics.text

    streamed = consumer.cli("run", "--model", "tiny", "--max-tokens", "16", "--escrow", aid, "--stream", "Hi")
    assert "credits" in streamed.stderr and streamed.stdout.strip() != ""

    # node chat: one channel for the whole conversation, one receipt per turn
    chat = subprocess.run([sys.executable, "-m", "cli.main", "chat", "--home", str(consumer.home), "--model", "tiny",
                           "--escrow", aid, "--max-tokens", "8", "--budget", "0.2"], input="Hello\nAnd again\n",
                          capture_output=True, text=True, cwd=ROOT, env=node_env(), timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert "session closed: 2 turns" in chat.stderr
    rows = json.loads(consumer.cli("receipts", "--json").stdout)["receipts"]  # newest first
    chat_session = rows[0]["session_id"]
    turns = [r for r in reversed(rows) if r["session_id"] == chat_session]
    assert [r["call_seq"] for r in turns] == [0, 1] and turns[1]["prev_hash"] == turns[0]["receipt_id"]
    for d in started:
        assert d.stop() == 0
