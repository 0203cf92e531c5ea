"""Network trust: settled value counts, capped per attester; a Sybil swarm of fresh identities cannot
lift a bad provider above an honest one; local experience wins over the network's word."""

from __future__ import annotations

import protocol
from node.reputation import NetworkTrust, NetworkView, blend
from node.reputation._network_trust import ATTESTER_CAP, FRESH_POOL_CAP, HALF_WEIGHT, MATURE_S, START
from tests.support import AGENT, MALLORY, attestation, identity

HONEST, BAD = identity("honest-provider"), identity("bad-provider")
DAY = 86_400


class Clock:
    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _book(tmp_path, clock, agents=(AGENT.peer_id,)) -> NetworkTrust:
    return NetworkTrust(tmp_path / "reputation.db", trusted_agents=lambda: agents, clock=clock, me="me")


def _add(book: NetworkTrust, a: protocol.Attestation) -> bool:
    return book.add(a, protocol.check_attestation(a), protocol.encode(a))


def test_a_provider_nobody_attested_sits_at_the_start(tmp_path):
    book = _book(tmp_path, Clock())
    assert book.view(HONEST.peer_id) == NetworkView(START, 0, 0, 0)


def test_an_attestation_without_settled_value_has_no_weight(tmp_path):
    clock = Clock()
    book = _book(tmp_path, clock)
    for i in range(20):
        _add(book, attestation(identity(f"talker-{i}"), HONEST, settled=False, paid=50_000_000))
    clock.now += MATURE_S
    view = book.view(HONEST.peer_id)
    assert (view.score, view.weight, view.attesters, view.backed) == (START, 0, 20, 0)


def test_a_settlement_by_an_agent_this_node_does_not_trust_has_no_weight(tmp_path):
    clock = Clock()
    book = _book(tmp_path, clock)
    _add(book, attestation(identity("a"), HONEST, agent=MALLORY))  # Mallory runs an agent and signs claims
    clock.now += MATURE_S
    assert book.view(HONEST.peer_id).weight == 0


def test_one_established_attester_counts_at_most_its_cap_and_the_score_is_the_stated_formula(tmp_path):
    clock = Clock()
    book = _book(tmp_path, clock)
    _add(book, attestation(identity("whale"), HONEST, paid=50 * ATTESTER_CAP, calls=10, failures=1))
    clock.now += MATURE_S
    view = book.view(HONEST.peer_id)
    assert view.weight == ATTESTER_CAP
    quality = 1 - 2 * 1 / 10
    assert view.score == START + 100 * quality * ATTESTER_CAP / (ATTESTER_CAP + HALF_WEIGHT)


def test_an_older_attestation_does_not_replace_a_newer_one(tmp_path):
    book = _book(tmp_path, Clock())
    assert _add(book, attestation(identity("a"), HONEST, issued_at=2_000))
    assert not _add(book, attestation(identity("a"), HONEST, issued_at=1_000, failures=10))
    assert not _add(book, attestation(identity("a"), HONEST, issued_at=2_000, failures=10))
    assert _add(book, attestation(identity("a"), HONEST, issued_at=3_000, failures=10))
    assert book.view(HONEST.peer_id).attesters == 1


def test_a_sybil_swarm_of_fifty_fresh_identities_does_not_lift_a_bad_provider_above_an_honest_one(tmp_path):
    clock = Clock()
    book = _book(tmp_path, clock)
    # three consumers with history here: two used the honest provider, one the bad one (half its calls failed)
    for name in ("alice", "bob"):
        _add(book, attestation(identity(name), HONEST, paid=ATTESTER_CAP // 2, calls=20, failures=0,
                               issued_at=100))
    _add(book, attestation(identity("carol"), BAD, paid=ATTESTER_CAP // 2, calls=20, failures=10, issued_at=100))
    clock.now += MATURE_S
    # then fifty fresh identities, each with a real, settled session (self-dealing: the bad provider's
    # owner pays itself through a trusted agent), praise the bad provider; fifty more praise it unbacked
    for i in range(50):
        _add(book, attestation(identity(f"sybil-{i}"), BAD, paid=ATTESTER_CAP, calls=100, failures=0))
        _add(book, attestation(identity(f"talker-{i}"), BAD, settled=False, paid=ATTESTER_CAP, calls=100))
    honest, bad = book.view(HONEST.peer_id), book.view(BAD.peer_id)
    assert bad.backed == 51 and bad.attesters == 101
    # carol's half-failed business counts in full; all fifty Sybils together weigh one small pool
    assert bad.weight == ATTESTER_CAP // 2 + FRESH_POOL_CAP
    assert honest.score > bad.score
    # and routing, for a node with no experience of either, ranks the honest provider first
    assert blend(START, 0, honest, False) > blend(START, 0, bad, False)
    # a week on, the swarm has history: the stated limit (each identity's weight was bought and held)
    clock.now += MATURE_S
    assert book.view(BAD.peer_id).weight > bad.weight


def test_this_nodes_own_attestations_carry_no_network_weight(tmp_path):
    clock = Clock()
    book = NetworkTrust(tmp_path / "r.db", trusted_agents=lambda: (AGENT.peer_id,), clock=clock,
                        me=identity("me").peer_id)
    _add(book, attestation(identity("me"), HONEST))
    clock.now += MATURE_S
    assert book.view(HONEST.peer_id).weight == 0
    assert len(book.own()) == 1


def test_local_experience_outweighs_the_network_and_a_caught_provider_stays_caught():
    praised = NetworkView(score=180.0, weight=5 * ATTESTER_CAP, attesters=5, backed=5)
    assert blend(100.0, 0, praised, False) == 180.0  # nothing of our own: the network's view
    assert blend(100.0, 20, praised, False) == 140.0  # LOCAL_HALF calls: half of it
    assert blend(100.0, 10_000, praised, False) < 100.2
    assert blend(0.0, 3, praised, True) == 0.0  # caught here: praise changes nothing
    assert blend(90.0, 0, NetworkView(), False) == 90.0


def test_held_attestations_survive_a_restart(tmp_path):
    clock = Clock()
    book = _book(tmp_path, clock)
    _add(book, attestation(identity("alice"), HONEST))
    book.close()
    clock.now += MATURE_S
    again = _book(tmp_path, clock)
    assert again.view(HONEST.peer_id).weight == ATTESTER_CAP
    assert again.attestations(HONEST.peer_id)[0].attester == identity("alice").peer_id
