"""Two hosts on one bridge (10.7.0.0/24), each node on the config's default listen address
(``/ip4/0.0.0.0/tcp/0``): what a node publishes — its ``status`` addresses, and the addresses in
the signed listing another node holds — are addresses another host can dial: never the wildcard
0.0.0.0 nor loopback, and its LAN address among them. The consumer joins using nothing but what
the provider publishes, and a paid call crosses the bridge and settles."""

from __future__ import annotations

import re

import pytest

from tests.netns.harness import poll_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_UNDIALLABLE = {"0.0.0.0", "127.0.0.1"}


def _ips(addrs: list[str]) -> list[str]:
    return [m.group(1) for a in addrs for m in [re.search(r"/ip4/([^/]+)/", a)] if m]


def _assert_honest(addrs: list[str], own_ip: str, what: str) -> None:
    ips = _ips(addrs)
    assert not _UNDIALLABLE & set(ips), f"{what} publishes an address no other host can dial: {addrs}"
    assert own_ip in ips, f"{what} does not publish its LAN address {own_ip}: {addrs}"


def test_published_addresses_are_dialable_across_a_bridge(topology):
    lan = topology.switch("lan", "10.7.0.0/24")
    a, b = topology.host("a", lan), topology.host("b", lan)
    provider = topology.daemon(a, name="provider", listen=None, start=False)
    provider.extra = ("--escrow", "--accept-escrow", provider.peer_id)  # its own agent sells and settles
    provider.start()
    agent = provider.peer_id

    published = provider.cli_json("status")["addrs"]
    _assert_honest(published, a.ip, "the provider's status")
    bootstrap = [x for addr in published for x in ("--bootstrap", addr)]
    consumer = topology.daemon(b, *bootstrap, name="consumer", listen=None)
    _assert_honest(consumer.cli_json("status")["addrs"], b.ip, "the consumer's status")
    poll_until(lambda: consumer.api("GET", "/api/v1/status")["connected_peers"] >= 1, 30,
               "the consumer to join through the provider's published address")

    provider.cli("offer", "add", "--model", "tiny", "--backend", "builtin", "--input-price", "0.50",
                 "--output-price", "1.50", "--max-context", "2048")
    rows = poll_until(lambda: consumer.cli_json("providers", "--model", "tiny"), 60, "the listing across the bridge")
    assert [r["peer_id"] for r in rows] == [provider.peer_id]
    _assert_honest(rows[0]["addrs"], a.ip, "the listing the consumer holds")

    provider.cli("escrow", "mint", "--to", consumer.peer_id, "--amount", "2")
    doc = consumer.cli_json("run", "--model", "tiny", "--escrow", agent, "--max-tokens", "16", "Hello", timeout=120)
    assert doc["provider"] == provider.peer_id and doc["cost"]["amount"] > 0, doc
    poll_until(lambda: provider.cli_json("wallet", "balance", "--escrow", agent)["available"] == doc["cost"]["amount"],
               60, "the provider to be paid the call's cost")
