"""A node's identity: one Ed25519 key that signs everything and names the node as a libp2p peer.

The 32-byte seed is the secret; the public key and the peer id derive from it. The same seed
gives the libp2p host its key pair (``node/`` builds it), so the peer id others see on the
wire is the one in our listings and receipts.

The node's account on a chain (a secp256k1 key, for EIP-712 vouchers and transactions) derives
from the same seed too, under its own domain tag: the keystore that holds the seed holds the
account, a backup of one is a backup of both, and no key is ever stored twice.
"""

from __future__ import annotations

import hashlib

import nacl.signing

from protocol import peer_id_from_public_key

__all__ = ["Identity"]


class Identity:
    """An Ed25519 signing identity (implements ``protocol.Signer``)."""

    __slots__ = ("_key", "public_key", "peer_id", "_eth_address")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        self.public_key: bytes = bytes(self._key.verify_key)
        self.peer_id: str = peer_id_from_public_key(self.public_key)
        self._eth_address: str | None = None

    @classmethod
    def generate(cls) -> "Identity":
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        """The secret seed. Handle with care: whoever has it is this node."""
        return bytes(self._key)

    @property
    def eth_key(self) -> bytes:
        """The 32-byte secp256k1 private key of this node's chain account (derived from the seed)."""
        return _eth_key(bytes(self._key))

    @property
    def eth_address(self) -> str:
        """This node's chain account: the checksummed address of ``eth_key``."""
        if self._eth_address is None:
            from ._eth import kept_recursion_limit

            with kept_recursion_limit():  # half a second to import: only nodes that settle on a chain pay it
                from eth_account import Account
            self._eth_address = Account.from_key(self.eth_key).address
        return self._eth_address

    def sign_bytes(self, data: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(data).signature

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"


_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _eth_key(seed: bytes) -> bytes:
    """A secp256k1 private key from ``seed``: BLAKE2b keyed by a domain tag of its own, so it reveals
    nothing of the Ed25519 key; a draw outside [1, n) (odds 2**-128) takes the next counter."""
    for counter in range(256):
        digest = hashlib.blake2b(seed + bytes([counter]), key=b"inferswarm/eth-account/v1", digest_size=32).digest()
        if 0 < int.from_bytes(digest, "big") < _SECP256K1_ORDER:
            return digest
    raise AssertionError("unreachable: 256 draws outside the curve order")
