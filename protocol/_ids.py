"""The names our protocols go by on the network. Versioned like the messages they carry: a
change that an old peer cannot follow is a new id, never an edit of one of these.
"""

__all__ = ["SESSION_PROTOCOL", "RECEIPT_PROTOCOL", "ESCROW_PROTOCOL", "LISTING_TOPIC", "EVIDENCE_TOPIC",
           "ATTESTATION_TOPIC", "OBSERVATION_TOPIC", "DHT_NAMESPACE", "ATTESTATION_NAMESPACE"]

#: consumer -> provider: Open, Accept/Reject, Request, Chunk…, Receipt, CounterSign, CounterSignAck, Close
SESSION_PROTOCOL = "/inferswarm/session/1.0.0"
#: consumer -> provider: a doubly-signed Receipt the provider has not acknowledged, answered by a
#: CounterSignAck or a ReceiptRefused (a few per stream); the redelivery of a lost counter-signature
RECEIPT_PROTOCOL = "/inferswarm/receipt/1.0.0"
#: any party -> escrow agent: signed escrow requests, one signed response each
ESCROW_PROTOCOL = "/inferswarm/escrow/1.0.0"
#: GossipSub topic carrying signed listings (the fast path; the DHT is the source of truth)
LISTING_TOPIC = "inferswarm/listings/1"
EVIDENCE_TOPIC = "inferswarm/evidence/1"  # failed spot checks (protocol/_evidence.py)
ATTESTATION_TOPIC = "inferswarm/attestation/1"  # consumers' accounts of their sessions (protocol/_attestation.py)
OBSERVATION_TOPIC = "inferswarm/observation/1"  # hourly market figures (protocol/_observation.py)
#: the DHT namespace of listing records: /isw/<first 40 hex digits of sha256("inferswarm/listing/" + peer id)>
DHT_NAMESPACE = "isw"
#: the DHT namespace of attestation records: /isa/<40 hex digits of sha256 of the attester and provider>
ATTESTATION_NAMESPACE = "isa"
