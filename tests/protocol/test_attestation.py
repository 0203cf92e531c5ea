"""Attestations: a genuine one checks and says what was settled; forged, mismatched or unbacked ones do not."""

from __future__ import annotations

import dataclasses

import pytest

import protocol
from tests.support import AGENT, CONSUMER, MALLORY, PROVIDER, attestation, identity


def _resigned(a: protocol.Attestation, signer=CONSUMER, **change) -> protocol.Attestation:
    return protocol.sign(dataclasses.replace(a, **change), "sig", signer)


def test_a_settled_attestation_checks_after_a_trip_over_the_wire():
    a = attestation(paid=700_000)
    data = protocol.encode(a, max_size=protocol.MAX_ATTESTATION_BYTES)
    back = protocol.decode(data, max_size=protocol.MAX_ATTESTATION_BYTES, expect=(protocol.Attestation,))
    assert protocol.check_attestation(back) == protocol.Backing(agent=AGENT.peer_id, settled=700_000)
    assert back.last_receipt_hash == protocol.receipt_hash(a.last_receipt)


def test_settled_value_is_what_the_agent_says_was_claimed_not_what_the_attester_says_it_paid():
    assert protocol.check_attestation(attestation(paid=900_000, claimed=100_000)).settled == 100_000


def test_an_attestation_without_a_settlement_proves_no_value():
    assert protocol.check_attestation(attestation(settled=False)) == protocol.Backing()


def test_quality_runs_from_all_failed_to_all_completed():
    assert protocol.attestation_quality(attestation(calls=10, failures=0)) == 1.0
    assert protocol.attestation_quality(attestation(calls=10, failures=5)) == 0.0
    assert protocol.attestation_quality(attestation(calls=10, failures=10)) == -1.0


def test_forged_or_tampered_attestations_are_refused():
    a = attestation()
    with pytest.raises(protocol.BadSignature):  # changed after signing
        protocol.check_attestation(dataclasses.replace(a, failures=0, calls=99))
    with pytest.raises(protocol.BadSignature):  # signed by another than the attester it names
        protocol.check_attestation(protocol.sign(a, "sig", MALLORY))
    with pytest.raises(protocol.BadSignature):  # the provider never signed this receipt
        protocol.check_attestation(_resigned(a, last_receipt=dataclasses.replace(a.last_receipt, cumulative=9 << 30)))
    with pytest.raises(protocol.BadSignature):  # not counter-signed
        protocol.check_attestation(_resigned(a, last_receipt=dataclasses.replace(a.last_receipt, consumer_sig=b"")))
    forged = dataclasses.replace(a.settlement, channels=(dataclasses.replace(a.settlement.channels[0],
                                                                             claimed=5 << 30),))
    with pytest.raises(protocol.BadSignature):  # the agent never said that much was claimed
        protocol.check_attestation(_resigned(a, settlement=forged))


@pytest.mark.parametrize("build, match", [
    (lambda: _resigned(attestation(), value_paid=2_000_000), "more than"),  # paid above the receipt
    (lambda: _resigned(attestation(), failures=11), "failures"),
    (lambda: _resigned(attestation(), model="big"), "is for"),
    (lambda: _resigned(attestation(), provider=MALLORY.peer_id), "not between"),
    # a settlement of another pair's channel, genuinely signed by its agent
    (lambda: _resigned(attestation(), settlement=attestation(identity("x"), PROVIDER).settlement), "another channel"),
], ids=["overpaid", "failures", "model", "provider", "borrowed-settlement"])
def test_an_attestation_its_proofs_do_not_back_is_refused(build, match):
    with pytest.raises(protocol.TermsMismatch, match=match):
        protocol.check_attestation(build())


def test_a_provider_cannot_attest_to_itself():
    with pytest.raises(protocol.TermsMismatch, match="itself"):
        protocol.check_attestation(attestation(PROVIDER, PROVIDER))
