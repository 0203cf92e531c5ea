"""What `node providers`, `node offer ls`, `node status` print for people: whole peer ids, credits,
local dates with "in 9 min", a table where it fits and a list at 80 columns. The daemon is
replaced by its answers (``DaemonClient.request``): this is the presentation alone."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from cli import _market
from cli._common import local_time

PEER = "12D3KooWQd7dGbLk1hYcu5W8dU5MJRxdrPRFLHxu6kn7b3yZzmnP"


@pytest.fixture
def answers(monkeypatch):
    docs: dict[str, object] = {}

    class FakeClient:
        def __init__(self, home):
            pass

        def request(self, method, path, **kwargs):
            return docs[path]

    monkeypatch.setattr(_market, "DaemonClient", FakeClient)
    return docs


def provider_row(expires_at: float) -> dict:
    return {"peer_id": PEER, "model": "tiny", "input_price": 500_000, "output_price": 1_500_000,
            "max_context": 4096, "trust": None, "latency_ms": 12, "gpus": [], "expires_at": expires_at}


def run(command, *args, columns: int = 80):
    return CliRunner().invoke(command, list(args), env={"COLUMNS": str(columns)}, catch_exceptions=False)


def test_providers_at_80_columns_is_a_list_with_whole_ids_and_local_expiry(answers):
    expires = time.time() + 540
    answers["/api/v1/providers"] = [provider_row(expires)]
    out = run(_market.providers).output
    assert PEER in out.splitlines()  # whole, on its own line, pastable
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert f"listing expires: {local_time(expires)} (in 9 min)" in out
    assert "in/1K:           0.50" in out and "out/1K:          1.50" in out


def test_providers_on_a_wide_terminal_is_a_table(answers):
    answers["/api/v1/providers"] = [provider_row(time.time() + 3600)]
    out = run(_market.providers, columns=200).output
    header = next(line for line in out.splitlines() if "provider" in line)
    assert "model" in header and "listing expires" in header and PEER in out


def test_status_uptime_in_words(answers):
    answers["/api/v1/status"] = {"peer_id": PEER, "api_url": "http://127.0.0.1:1", "addrs": [], "connected_peers": 2,
                                 "listings_known": 1, "offers": 0, "uptime_s": 7500,
                                 "capabilities": {"gpus": [], "cpu_count": 2, "ram_mb": 1000}}
    out = run(_market.status).output
    assert "uptime:          2 h 5 min" in out and PEER in out


def test_offer_ls_in_credits(answers):
    answers["/api/v1/offers"] = [{"model": "tiny", "backend": "builtin", "input_price": 500_000,
                                  "output_price": 1_500_000, "max_context": 4096, "min_charge": 1234,
                                  "rate_limit": 0, "max_concurrent": 4}]
    out = run(_market.offer, "ls").output
    assert "0.50" in out and "1.50" in out and "0.001234" in out and "500000" not in out
