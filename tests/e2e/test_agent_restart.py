"""Issue #12, finding 4, with real daemons: the escrow agent is killed with SIGKILL and comes back
on a new port (its bootstrap address, the only one its peers were given, is now dead). It rejoins
the peers it remembered, tells them where it listens now, and a consumer rents and pays through
it again within a bound, with nothing done by hand."""

from __future__ import annotations

import json
import time

from tests.e2e.daemons import Daemon, poll, start_market

BOUND_S = 30.0


def run(consumer: Daemon, aid: str) -> dict:
    return json.loads(consumer.cli("run", "--model", "tiny", "--escrow", aid, "--max-tokens", "8", "--json",
                                   "Hello").stdout)


def available(daemon: Daemon, aid: str) -> int:
    return json.loads(daemon.cli("wallet", "balance", "--escrow", aid, "--json").stdout)["available"]


def remembered(agent: Daemon) -> set[str]:
    try:
        return set(json.loads((agent.home / "peers.json").read_text()))
    except (FileNotFoundError, ValueError):
        return set()


def test_an_agent_restarted_on_a_new_port_is_reached_again_within_the_bound(daemons):
    tmp_path, started = daemons
    agent, provider, consumer, aid = start_market(tmp_path, started)
    first = run(consumer, aid)
    assert first["cost"]["amount"] > 0
    paid = poll(lambda: available(provider, aid) or None, BOUND_S, "the first call to be paid")
    assert paid == first["cost"]["amount"]
    peers = {provider.info["peer_id"], consumer.info["peer_id"]}
    poll(lambda: peers <= remembered(agent), 10, "the agent to remember its peers")
    old_addr = agent.addr

    agent.kill()
    agent.start()  # --listen tcp/0: a new port nobody was told
    assert agent.addr != old_addr
    back = time.monotonic()

    second = run(consumer, aid)  # a new channel: opened at the agent, then claimed there by the provider
    assert second["provider"] == provider.info["peer_id"]
    poll(lambda: available(provider, aid) == paid + second["cost"]["amount"] or None, BOUND_S,
         "the second call to be paid")
    assert time.monotonic() - back < BOUND_S
