"""A node's identity: one Ed25519 key that signs everything and names the node as a libp2p peer.

The 32-byte seed is the secret; the public key and the peer id derive from it. The same seed
gives the libp2p host its key pair (``node/`` builds it), so the peer id others see on the
wire is the one in our listings and receipts.
"""

from __future__ import annotations

import nacl.signing

from protocol import peer_id_from_public_key

__all__ = ["Identity"]


class Identity:
    """An Ed25519 signing identity (implements ``protocol.Signer``)."""

    __slots__ = ("_key", "public_key", "peer_id")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        self.public_key: bytes = bytes(self._key.verify_key)
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        """The secret seed. Handle with care: whoever has it is this node."""
        return bytes(self._key)

    def sign_bytes(self, data: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(data).signature

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
