"""Evidence bundles: a genuine one verifies; any tampering, or a bundle that proves nothing, is refused."""

from __future__ import annotations

import dataclasses

import pytest

import protocol
from tests.support import MALLORY, Pair, identity

A = protocol.ModelCommitment(kind="weights", weights_hash=b"a" * 32, tokenizer_hash=b"t" * 32, files=4)
VERIFIER = identity("evidence-verifier")


def _bundle(temperature_milli: int = 0, **fields) -> protocol.Evidence:
    pair = Pair(commitment=protocol.commitment_id(A))
    pair.open()
    settled = pair.call("what is 2+2?", [("fish", 2), (" soup", 2)], temperature_milli=temperature_milli)
    (requested,) = [e for e in pair.provider_events if isinstance(e, protocol.CallRequested)]
    evidence = protocol.Evidence(verifier=VERIFIER.peer_id, receipt=settled.receipt,
                                 request=protocol.encode(requested.request), commitment=A,
                                 provider_text=settled.text, verifier_text="4", mode="exact", issued_at=100)
    return protocol.sign(dataclasses.replace(evidence, **fields), "sig", VERIFIER)


def _resigned(evidence: protocol.Evidence, **change) -> protocol.Evidence:
    return protocol.sign(dataclasses.replace(evidence, **change), "sig", VERIFIER)


def test_a_genuine_bundle_verifies_after_a_trip_over_the_wire():
    evidence = _bundle()
    back = protocol.decode(protocol.encode(evidence), expect=(protocol.Evidence,))
    assert protocol.check_evidence(back).messages[0].content == "what is 2+2?"


@pytest.mark.parametrize("change, error", [
    (dict(provider_text="fish soup!"), protocol.TermsMismatch),  # not what the receipt bills
    (dict(commitment=dataclasses.replace(A, files=5)), protocol.TermsMismatch),  # another commitment
    (dict(verifier_text="fish soup"), protocol.TermsMismatch),  # the outputs agree: nothing proven
    (dict(mode="topk", topk=5, agreement_permille=950, threshold_permille=900), protocol.TermsMismatch),
    (dict(commitment=protocol.ModelCommitment(kind="upstream", upstream="x@y")), protocol.TermsMismatch),
], ids=["text", "commitment", "agreeing", "topk-over-threshold", "upstream"])
def test_a_bundle_that_does_not_prove_its_claim_is_refused(change, error):
    with pytest.raises(error):
        protocol.check_evidence(_resigned(_bundle(), **change))


def test_a_tampered_or_forged_bundle_is_refused():
    evidence = _bundle()
    with pytest.raises(protocol.BadSignature):  # changed after signing
        protocol.check_evidence(dataclasses.replace(evidence, verifier_text="5"))
    with pytest.raises(protocol.BadSignature):  # signed by someone else than it names
        protocol.check_evidence(protocol.sign(evidence, "sig", MALLORY))
    with pytest.raises(protocol.BadSignature):  # the receipt's provider never signed these numbers
        protocol.check_evidence(_resigned(evidence, receipt=dataclasses.replace(evidence.receipt, tokens_out=99)))
    with pytest.raises(protocol.BadSignature):  # not counter-signed: the consumer never took it
        protocol.check_evidence(_resigned(evidence, receipt=dataclasses.replace(evidence.receipt, consumer_sig=b"")))
    other = protocol.Request(session_id=b"s" * 16, call_seq=0, max_tokens=64, temperature_milli=0,
                             messages=(protocol.ChatMessage(role="user", content="what is 3+3?"),))
    with pytest.raises(protocol.TermsMismatch):  # another request than the receipt binds
        protocol.check_evidence(_resigned(evidence, request=protocol.encode(other)))
    with pytest.raises(protocol.DecodeError):
        protocol.check_evidence(_resigned(evidence, request=b"\x00junk"))


def test_a_sampled_call_proves_nothing():
    with pytest.raises(protocol.TermsMismatch, match="greedy"):
        protocol.check_evidence(_bundle(temperature_milli=700))


def test_a_call_cut_at_length_agrees_with_a_longer_rerun():
    assert protocol.outputs_agree("fish", "fish soup", "length")
    assert not protocol.outputs_agree("fish", "fish soup", "stop")
    assert not protocol.outputs_agree("fish", "chips", "length")
