"""Portable reputation: attestations consumers sign after their sessions, and the network trust
this node aggregates from everyone's (``_network_trust`` states the model and its limits)."""

from ._network_trust import NetworkTrust, NetworkView, blend

__all__ = ["NetworkTrust", "NetworkView", "blend"]
