"""Attestations: a consumer's signed account of its business with one provider, checkable by anyone.

After a session the consumer signs an ``Attestation``: the provider, the commitment it was
served under, how many calls, how many failed, the tokens, the median latency and the value it
paid, with the proof that the business happened and was paid for:

- ``last_receipt``, the session's last doubly-signed receipt (its hash is the proof of
  business): the provider itself signed that it served this consumer this much;
- ``settlement``, the escrow agent's signed answer about the receipt's channel: what the
  provider has actually claimed from it (absent while nothing was settled).

``check_attestation`` re-checks all of it without asking anyone, and returns the ``Backing``:
the agent that settled and the value that is proven paid (0 without a settlement). Whether that
agent is worth believing, and how much any attestation should count, is the reader's policy
(``node/reputation``): a settlement only proves what its agent signed.
"""

from __future__ import annotations

import dataclasses

from ._codec import Bytes, Nested, Optional, PeerId, Str, UInt, message, wire
from ._errors import TermsMismatch
from ._identity import public_key_from_peer_id
from ._messages import EscrowResponse, Receipt
from ._session import receipt_hash, verify_channel, verify_doubly_signed
from ._signing import verify

__all__ = ["MAX_ATTESTATION_BYTES", "Attestation", "Backing", "attestation_quality",
           "check_attestation"]

MAX_ATTESTATION_BYTES = 8 * 1024  # a receipt, one channel's state and the counts: one gossip message
_AMOUNT = UInt(10**15)


@message("attestation", 1, signatures=("sig",))
@dataclasses.dataclass(frozen=True, slots=True)
class Attestation:
    """One session's account, signed by its consumer (``attester``)."""

    attester: str = wire(PeerId())
    provider: str = wire(PeerId())
    model: str = wire(Str(128, min_bytes=1))
    commitment: bytes = wire(Bytes(max_len=32))  # the commitment id the offer named (b"": none)
    calls: int = wire(UInt(1 << 32))
    failures: int = wire(UInt(1 << 32))
    tokens: int = wire(UInt(1 << 48))
    p50_latency_ms: int = wire(UInt(1 << 32))  # time to first token, median over the session's calls
    value_paid: int = wire(_AMOUNT)  # µc the consumer paid the provider in this session
    last_receipt: Receipt = wire(Nested(Receipt))
    settlement: EscrowResponse | None = wire(Optional(Nested(EscrowResponse)))
    issued_at: int = wire(UInt())
    sig: bytes = wire(Bytes(max_len=64), default=b"")

    @property
    def last_receipt_hash(self) -> bytes:
        return receipt_hash(self.last_receipt)


@dataclasses.dataclass(frozen=True, slots=True)
class Backing:
    """What an attestation proves was paid: ``settled`` µc, settled by ``agent`` ("" and 0: none)."""

    agent: str = ""
    settled: int = 0


def attestation_quality(attestation: Attestation) -> float:
    """The attester's verdict in [-1, 1]: 1 when every call completed, -1 when every call failed."""
    calls = max(1, attestation.calls)
    return 1.0 - 2.0 * min(attestation.failures, calls) / calls


def check_attestation(attestation: Attestation) -> Backing:
    """Raise unless ``attestation`` is what it says; return the value it proves was settled.

    Checked: the attester's signature; the last receipt's provider and consumer signatures, and
    that it names this provider, this attester as consumer and this model; counts that add up
    (failures within calls, the value within what the receipt's provider signed for). With a
    settlement: the agent's signature on its answer and on the channel grant inside it, that the
    channel is the receipt's, from this attester to this provider. The settled value is the least
    of ``value_paid`` and what the agent says the provider claimed.

    Raises:
        BadSignature: the attester's, provider's, consumer's or agent's signature does not verify.
        TermsMismatch: the receipt or the settlement does not back this attestation.
    """
    verify(attestation, "sig", public_key_from_peer_id(attestation.attester))
    r = attestation.last_receipt
    verify_doubly_signed(r)
    if r.provider != attestation.provider or r.consumer != attestation.attester:
        raise TermsMismatch("the last receipt is not between this attester and this provider")
    if attestation.attester == attestation.provider:
        raise TermsMismatch("a provider cannot attest to itself")
    if r.model != attestation.model:
        raise TermsMismatch(f"the last receipt is for {r.model!r}, not {attestation.model!r}")
    if attestation.calls < 1 or attestation.failures > attestation.calls:
        raise TermsMismatch("an attestation counts at least one call, and no more failures than calls")
    if attestation.value_paid > r.cumulative:
        raise TermsMismatch("the value paid is more than the last receipt's provider signed for")
    s = attestation.settlement
    if s is None:
        return Backing()
    verify(s, "sig", public_key_from_peer_id(s.agent))
    if not s.ok or len(s.channels) != 1:
        raise TermsMismatch("the settlement is not one channel's state")
    state = s.channels[0]
    verify_channel(state.channel)
    grant = state.channel
    if grant.agent != s.agent or grant.channel_id != r.channel_id:
        raise TermsMismatch("the settlement is about another channel than the last receipt's")
    if grant.consumer != attestation.attester or grant.provider != attestation.provider:
        raise TermsMismatch("the settled channel is not from this attester to this provider")
    return Backing(agent=s.agent, settled=min(attestation.value_paid, state.claimed))
