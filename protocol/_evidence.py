"""Evidence that a provider served another model than it committed to, checkable by anyone.

A spot check re-runs a paid call greedily on the committed weights and compares. When they
disagree, the checker signs an ``Evidence`` bundle: the doubly-signed receipt, the request
(its canonical bytes), the commitment, the text the provider streamed, the checker's own
output and how the two were compared. ``check_evidence`` re-checks everything a bundle can
prove without the weights:

- the receipt carries valid provider and consumer signatures;
- its ``input_hash`` is ``committed_input_hash(request_hash(request), commitment_id(commitment))``:
  the provider signed that it served *this* request under *this* commitment;
- its ``output_hash`` is the hash of ``provider_text``: this is what it served;
- the request was greedy (temperature 0), so one right answer exists;
- the stated comparison fails: ``exact`` — the checker's text differs and neither is a prefix of
  the other where the receipt stopped early (``length``); ``topk`` — the share of the provider's
  tokens inside the checker's top-``topk`` is under ``threshold_permille``;
- the checker signed all of it.

What a bundle cannot prove without the weights is that the checker's output is right: anyone
holding weights with the same commitment re-runs the request (``node verify-evidence FILE
--backend SPEC``) and sees for themselves. A node that cannot treats a bundle as its
signer's word, and weighs it by its signer's standing.
"""

from __future__ import annotations

import dataclasses

from ._codec import Bytes, Nested, PeerId, Str, UInt, decode, message, wire
from ._commitments import ModelCommitment, commitment_id, committed_input_hash
from ._errors import TermsMismatch
from ._identity import public_key_from_peer_id
from ._messages import Receipt, Request
from ._session import output_hash, request_hash, verify_doubly_signed
from ._signing import verify

__all__ = ["EVIDENCE_MODES", "MAX_EVIDENCE_BYTES", "Evidence", "check_evidence", "evidence_request", "outputs_agree"]

EVIDENCE_MODES = ("exact", "topk")
MAX_EVIDENCE_BYTES = 192 * 1024  # a bundle travels in one gossip message
_TEXT = Str(64 * 1024)


@message("evidence", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class Evidence:
    """A failed spot check, signed by the ``verifier`` that ran it."""

    verifier: str = wire(PeerId())
    receipt: Receipt = wire(Nested(Receipt))
    request: bytes = wire(Bytes(max_len=96 * 1024))  # the call_request v1 message, canonical bytes
    commitment: ModelCommitment = wire(Nested(ModelCommitment))
    provider_text: str = wire(_TEXT)
    verifier_text: str = wire(_TEXT)
    mode: str = wire(Str(choices=EVIDENCE_MODES))
    issued_at: int = wire(UInt())
    agreement_permille: int = wire(UInt(1000), default=0)  # topk: the share of tokens in the checker's top-k
    threshold_permille: int = wire(UInt(1000), default=0)
    topk: int = wire(UInt(1000), default=0)
    sig: bytes = wire(Bytes(max_len=64), default=b"")


def evidence_request(evidence: Evidence) -> Request:
    """The request a bundle carries, decoded strictly (raises ``DecodeError``)."""
    return decode(evidence.request, expect=(Request,))


def outputs_agree(provider_text: str, verifier_text: str, finish_reason: str) -> bool:
    """Exact comparison: the same text, or (a call stopped at ``length``: a cancel, a budget, a
    limit) one is a prefix of the other."""
    if provider_text == verifier_text:
        return True
    return finish_reason == "length" and (verifier_text.startswith(provider_text)
                                          or provider_text.startswith(verifier_text))


def check_evidence(evidence: Evidence) -> Request:
    """Raise unless ``evidence`` proves what it says (the module's list); return its request.

    Raises:
        BadSignature: the verifier's, provider's or consumer's signature does not verify.
        TermsMismatch: the receipt does not bind this request, commitment or text; the request
            was not greedy; the comparison does not fail.
        DecodeError: the request bytes are not a call_request v1.
    """
    verify(evidence, "sig", public_key_from_peer_id(evidence.verifier))
    r = evidence.receipt
    verify_doubly_signed(r)
    request = evidence_request(evidence)
    if r.input_hash != committed_input_hash(request_hash(request), commitment_id(evidence.commitment)):
        raise TermsMismatch("the receipt does not bind this request under this commitment")
    if r.output_hash != output_hash(evidence.provider_text):
        raise TermsMismatch("the receipt does not bill this text")
    if request.temperature_milli != 0:
        raise TermsMismatch("the call was sampled, not greedy: no one right answer to compare with")
    if evidence.commitment.kind != "weights":
        raise TermsMismatch("an upstream commitment names no weights to re-run")
    if evidence.mode == "exact":
        if outputs_agree(evidence.provider_text, evidence.verifier_text, r.finish_reason):
            raise TermsMismatch("the outputs agree: nothing is proven")
    elif not (0 < evidence.topk and evidence.agreement_permille < evidence.threshold_permille):
        raise TermsMismatch("the top-k agreement is not under its threshold: nothing is proven")
    return request
