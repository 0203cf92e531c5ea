"""Issue #12 findings 1, 2 and 8 with real daemons and ``kill -9``: what a provider holds counter-signed
is paid by its agent without any manual command, after the provider crashed with it unclaimed and
after the agent was down when the session ended; ``node earnings`` then says exactly what the agent
paid, and ``node receipts`` pages. A receipts.db that cannot be opened stops ``node start`` with one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from cli._common import DaemonClient
from tests.e2e.daemons import ROOT, node, node_env, poll, start_market

USER = [{"role": "user", "content": "hi"}]


def balance(daemon, aid: str) -> int:
    return json.loads(daemon.cli("wallet", "balance", "--escrow", aid, "--json").stdout)["available"]


def calls(consumer, aid: str, n: int) -> tuple[str, int]:
    """Open a held session on the consumer, make ``n`` paid calls; (session id, cumulative signed)."""
    api = DaemonClient(str(consumer.home))
    sid = api.request("POST", "/api/v1/sessions", json={"model": "tiny", "budget": 500_000, "escrow": aid})["session_id"]
    cumulative = 0
    for _ in range(n):
        doc = api.request("POST", f"/api/v1/sessions/{sid}/calls", json={"messages": USER, "max_tokens": 4})
        cumulative = doc["cost"]["cumulative"]
    assert cumulative > 0
    return sid, cumulative


def earnings(daemon) -> dict:
    return json.loads(daemon.cli("earnings", "--json").stdout)


def test_a_provider_killed_with_unclaimed_receipts_is_paid_after_its_restart(daemons):
    base, started = daemons
    agent, provider, consumer, aid = start_market(base, started)
    _, owed = calls(consumer, aid, 2)  # the periodic claim is 30 s away: nothing is claimed yet
    provider.kill()
    provider.start()  # same home: receipts.db holds the two counter-signed receipts, unpaid
    poll(lambda: balance(provider, aid) == owed, 60, "the restarted provider's claim")
    doc = earnings(provider)
    assert (doc["claimed"], doc["pending"], doc["forfeited"]) == (owed, 0, 0)
    page = json.loads(provider.cli("receipts", "--limit", "1", "--json").stdout)
    assert (page["total"], page["has_more"], len(page["receipts"])) == (2, True, 1)
    assert page["receipts"][0]["cumulative"] == owed and page["receipts"][0]["claimed"]  # newest first, paid
    rest = json.loads(provider.cli("receipts", "--limit", "1", "--offset", "1", "--json").stdout)
    assert rest["has_more"] is False and rest["receipts"][0]["cumulative"] < owed


def test_an_agent_down_when_the_session_ends_is_paid_once_it_is_back(daemons):
    base, started = daemons
    agent, provider, consumer, aid = start_market(base, started)
    sid, owed = calls(consumer, aid, 1)
    agent.kill()
    DaemonClient(str(consumer.home)).request("DELETE", f"/api/v1/sessions/{sid}")  # its close cannot reach the agent
    back = time.monotonic()
    agent.start()  # a new port; nobody runs `node escrow claim`
    poll(lambda: balance(provider, aid) == owed, 90, "the retried claim")
    print(f"paid {time.monotonic() - back:.1f}s after the agent's restart began")
    doc = earnings(provider)
    assert (doc["claimed"], doc["pending"]) == (owed, 0)
    assert "refused for good" not in (provider.home / "daemon.log").read_text()


def test_a_receipt_store_that_cannot_be_opened_stops_the_start_with_one_line(tmp_path):
    home = tmp_path / "home"
    node("init", "--home", str(home))
    (home / "receipts.db").mkdir()
    out = subprocess.run([sys.executable, "-m", "cli.main", "start", "--home", str(home), "--listen",
                          "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True, cwd=ROOT, env=node_env(), timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"Error: cannot open the receipt store {home / 'receipts.db'}: "
                                               "is a directory"]


def test_a_consumer_killed_between_gateway_requests_on_a_standing_session_loses_nothing(daemons):
    """Standing sessions (one-shot calls reuse one session and channel): kill -9 the consumer while
    its session stands between requests; the provider is paid every counter-signed call without
    anyone's help, and after the restart the consumer's credits plus what is still locked (until
    the channel expires) are exactly the mint less what was paid."""
    base, started = daemons
    agent, provider, consumer, aid = start_market(base, started)
    consumer.stop()
    config = consumer.home / "config.toml"
    config.write_text(config.read_text().replace("[node]\n", "[node]\nstanding_idle_s = 120\n", 1))
    consumer.start()
    poll(lambda: json.loads(consumer.cli("providers", "--model", "tiny", "--json").stdout), 20, "the listing")
    token = (consumer.home / "api.token").read_text().strip()
    costs = []
    with httpx.Client(base_url=consumer.info["api_url"], headers={"Authorization": f"Bearer {token}"},
                      timeout=60) as http:
        for i in range(3):
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": f"hi {i}"}],
                                                        "max_tokens": 4, "escrow": aid})
            assert r.status_code == 200, r.text
            costs.append(r.json()["cost"])
    consumer.kill()  # between requests: the standing session and its channel are open
    poll(lambda: balance(provider, aid) == sum(costs), 60, "the provider's claim of every counter-signed call")
    consumer.start()
    doc = json.loads(consumer.cli("wallet", "balance", "--escrow", aid, "--json").stdout)
    assert doc["available"] + doc["locked"] == 2_000_000 - sum(costs)
    assert doc["locked"] > 0  # the standing channel's rest, refunded at its expiry
