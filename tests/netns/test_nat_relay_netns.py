"""A provider behind a NAT router, and the public side that can only reach it through a relay.

    wan 10.60.0.0/24:  relay (--relay), agent (--escrow), consumer, router's public side
    home 192.168.77.0/24: provider (default route via the router), router's LAN side (.1)

The second variant puts the consumer behind a NAT of its own (office 192.168.88.0/24, router
``nat2``): a public consumer is usually dialled *by* the NATed provider (the DHT, the auto-connector),
and its call then rides that outbound connection; with two NATs the relay (or a punched hole) is
the only way.

The router MASQUERADEs the LAN's traffic and drops every connection opened from the public side
(public hosts do have a route to 192.168.77.0/24 through it, so what stops them is the NAT's
filter, not a missing route). ``test_the_nat_is_real`` proves that with plain sockets;
``test_provider_behind_nat_serves_through_a_relay`` runs the market across it.
"""

from __future__ import annotations

import re
import socket

import pytest

from tests.netns.harness import NODE_PORT, in_netns, poll_until, tcp_connect_outcome

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PROBE_PORT = 5001


def _nat(topo, consumer_behind_nat: bool = False):
    """The topology of the module docstring; with ``consumer_behind_nat`` the consumer sits on a LAN
    of its own (192.168.88.0/24) behind a second NAT router, so neither end can dial the other."""
    wan = topo.switch("wan", "10.60.0.0/24")
    home = topo.switch("home", "192.168.77.0/24")
    router = topo.router("nat", wan, home)
    public = ["relay", "agent"] + ([] if consumer_behind_nat else ["consumer"])
    hosts = {name: topo.host(name, wan) for name in public}
    for h in hosts.values():
        topo.route(h.ns, str(home.subnet), router.public_ip)
    if consumer_behind_nat:
        office = topo.switch("office", "192.168.88.0/24")
        router2 = topo.router("nat2", wan, office)
        topo.route(router2.ns, str(home.subnet), router.public_ip)
        hosts["consumer"] = topo.host("consumer", office, gateway=office.gateway())
    hosts["provider"] = topo.host("provider", home, gateway=home.gateway())
    return router, hosts


def _listener(ns: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(8)
        s.settimeout(5)
        return s

    return in_netns(ns, make)


def assert_nat_is_real(router, hosts) -> None:
    """Inbound to the LAN is dropped (a connect times out although something listens); outbound
    works and arrives from the router's public address."""
    provider, consumer, relay = hosts["provider"], hosts["consumer"], hosts["relay"]
    with _listener(provider.ns, PROBE_PORT):
        assert tcp_connect_outcome(router.ns, provider.ip, PROBE_PORT) == "connected"  # it does listen
        assert tcp_connect_outcome(consumer.ns, provider.ip, PROBE_PORT, timeout=2) == "timeout"
    assert tcp_connect_outcome(consumer.ns, router.public_ip, NODE_PORT, timeout=2) == "timeout"
    with _listener(relay.ns, PROBE_PORT) as server:
        def dial_out() -> None:
            with socket.create_connection((relay.ip, PROBE_PORT), timeout=5):
                pass

        in_netns(provider.ns, dial_out)
        conn, (peer_ip, _) = server.accept()
        conn.close()
    assert peer_ip == router.public_ip, f"the LAN's traffic is not masqueraded: it came from {peer_ip}"


@pytest.mark.parametrize("consumer_behind_nat", [False, True], ids=["public-consumer", "consumer-behind-nat"])
def test_the_nat_is_real(topology, consumer_behind_nat):
    router, hosts = _nat(topology, consumer_behind_nat)
    assert_nat_is_real(router, hosts)


def _tcp_peers(topo, ns: str) -> set[str]:
    """The remote addresses of the established TCP connections in ``ns`` (``ss``)."""
    out = topo.exec(ns, "ss", "-Htn", "state", "established").stdout
    return {m.group(1) for m in re.finditer(r"\s(\d+\.\d+\.\d+\.\d+):\d+\s*$", out, re.M)}


@pytest.mark.parametrize("consumer_behind_nat", [False, True], ids=["public-consumer", "consumer-behind-nat"])
def test_provider_behind_nat_serves_through_a_relay(topology, record_property, consumer_behind_nat):
    router, hosts = _nat(topology, consumer_behind_nat)
    assert_nat_is_real(router, hosts)
    agent = topology.daemon(hosts["agent"], "--escrow")
    relay = topology.daemon(hosts["relay"], "--relay", "--bootstrap", agent.dial_addr)
    consumer = topology.daemon(hosts["consumer"], "--bootstrap", relay.dial_addr, "--bootstrap", agent.dial_addr)
    provider = topology.daemon(hosts["provider"], "--bootstrap", relay.dial_addr, "--accept-escrow", agent.peer_id)

    provider.cli("offer", "add", "--model", "tiny", "--backend", "builtin", "--input-price", "0.50",
                 "--output-price", "1.50", "--max-context", "2048")
    rows = poll_until(lambda: consumer.cli_json("providers", "--model", "tiny"), 60,
                      "the consumer to find the NATed provider's listing")
    assert [r["peer_id"] for r in rows] == [provider.peer_id]
    # the first listing may go out before AutoNAT has judged the provider private (a probe every 15 s
    # while unknown); once it has, the provider reserves on the relay and republishes
    seen: list[list[str]] = []

    def relayed_listing():
        rows = consumer.cli_json("providers", "--model", "tiny")
        seen.append(rows[0]["addrs"] if rows else [])
        return rows if rows and any("/p2p-circuit" in a for a in rows[0]["addrs"]) else None

    try:
        rows = poll_until(relayed_listing, 90, "the NATed provider's listing to name a relay address")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the listing's addresses: {seen[-1] if seen else None}") from None

    agent.cli("escrow", "mint", "--to", consumer.peer_id, "--amount", "2")
    doc = consumer.cli_json("run", "--model", "tiny", "--provider", provider.peer_id, "--escrow", agent.peer_id,
                            "--max-tokens", "16", "Hello", timeout=120)
    assert doc["provider"] == provider.peer_id and doc["cost"]["amount"] > 0, doc
    poll_until(lambda: provider.cli_json("wallet", "balance", "--escrow", agent.peer_id)["available"]
               == doc["cost"]["amount"], 60, "the receipt of the relayed call to settle")

    peers = _tcp_peers(topology, consumer.host.ns)
    direct = router.public_ip in peers  # the only way to the provider without the relay: a punched hole
    assert hosts["provider"].ip not in peers  # the NAT never let the consumer reach the LAN itself
    verdict = "direct (a connection from the NAT's public address: punched, or dialled out by the provider)" if direct else "relayed only (no direct connection)"
    record_property("nat_connection", verdict)
    print(f"consumer -> NATed provider after the call: {verdict}; consumer's TCP peers: {sorted(peers)}")
