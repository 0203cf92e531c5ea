"""Portable reputation: attestations consumers sign after their sessions, and the network trust
this node aggregates from everyone's (``_network_trust`` states the model and its limits)."""

from ._network_trust import NetworkTrust, NetworkView, blend
from ._service import Reputation, attestation_json, open_reputation

__all__ = ["attestation_json", "blend", "NetworkTrust", "NetworkView", "open_reputation", "Reputation"]
