"""Three real daemons on 127.0.0.1: an offer added on one is listed by another within 10 s."""

from __future__ import annotations

import json

import httpx

from tests.e2e.daemons import Daemon, poll


def test_three_daemons_offer_and_providers(daemons):
    tmp_path, started = daemons
    first = Daemon(tmp_path / "a")
    started.append(first)
    second = Daemon(tmp_path / "b", "--bootstrap", first.addr)
    started.append(second)
    third = Daemon(tmp_path / "c", "--bootstrap", first.addr)
    started.append(third)
    poll(lambda: json.loads(third.cli("status", "--json").stdout)["connected_peers"] >= 1, 20, "third connected")
    # the control API refuses callers without the home's token
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(third.info["api_url"] + "/api/v1/status", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"

    second.cli("offer", "add", "--model", "tiny", "--backend", "builtin", "--input-price", "0.50",
               "--output-price", "1.50", "--max-context", "2048")

    def listed():
        rows = json.loads(third.cli("providers", "--model", "tiny", "--json").stdout)
        return rows if rows else None

    rows = poll(listed, 10, "the offer to reach the third daemon")
    bench = rows[0].pop("benchmark_tokens_per_s")  # the provider's own benchmark, republished when done
    assert bench is None or bench > 0
    commitment = rows[0].pop("commitment")  # the builtin model's weights, hashed when the offer loaded
    assert commitment["kind"] == "weights" and len(commitment["id"]) == 64 and commitment["reproducible"]
    assert rows == [
        {
            "peer_id": second.info["peer_id"],
            "model": "tiny",
            "input_price": 500_000,
            "output_price": 1_500_000,
            "max_context": 2048,
            "min_charge": 0,
            "rate_limit": 0,
            "max_concurrent": 4,
            "trust": 100.0,  # a provider this node has no experience with yet
            "local_trust": 100.0,
            "network_trust": None,  # nobody has attested it
            "network_weight": 0,
            "caught": 0,
            "latency_ms": None,
            "tokens_per_s": None,
            "escrows": [],
            "gpus": [],
            "addrs": second.info["addrs"],
            "expires_at": rows[0]["expires_at"],
        }
    ]
    # persisted in the second's config, and removable
    assert "tiny" in (tmp_path / "b" / "config.toml").read_text()
    assert json.loads(second.cli("offer", "ls", "--json").stdout)[0]["model"] == "tiny"
    second.cli("offer", "add", "--model", "big", "--backend", "builtin", "--input-price", "0.3", "--output-price",
               "0.9", "--tier", "premium:0.9:2.7:2:3", "--batch", "100:20")
    big = [o for o in json.loads(second.cli("offer", "ls", "--json").stdout) if o["model"] == "big"][0]
    assert big["tiers"] == [{"name": "premium", "input_price": 900_000, "output_price": 2_700_000,
                             "max_concurrent": 2, "priority": 3}]
    assert (big["batch_min_calls"], big["batch_discount_permille"]) == (100, 200)
    bad = second.cli("offer", "add", "--model", "x", "--backend", "builtin", "--input-price", "1", "--output-price",
                     "1", "--tier", "gold:1:1:1", check=False)
    assert bad.returncode == 1 and "tiers" in bad.stderr
    second.cli("offer", "rm", "--model", "big")
    second.cli("offer", "rm", "--model", "tiny")
    assert json.loads(second.cli("offer", "ls", "--json").stdout) == []
    assert second.cli("offer", "rm", "--model", "tiny", check=False).returncode == 1

    for d in started:
        assert d.stop() == 0, (d.home / "daemon.log").read_text()
        assert not (d.home / "daemon.json").exists()


def test_cli_without_a_daemon_says_so(tmp_path):
    from tests.e2e.daemons import node

    node("init", "--home", str(tmp_path))
    out = node("status", "--home", str(tmp_path), check=False)
    assert out.returncode == 1 and "node start" in out.stderr
