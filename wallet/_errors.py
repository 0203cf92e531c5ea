"""The wallet package's errors, under one root.

    WalletError
    └── KeystoreError
        ├── KeystoreNotFound       no keystore at the path (run `node init`)
        ├── KeystoreExists         refusing to overwrite an existing keystore
        ├── KeystoreCorrupt        truncated, not a keystore, or tampered with
        ├── WrongPassphrase        decryption failed with the passphrase given
        └── PassphraseUnavailable  no INFERSWARM_PASSPHRASE and no terminal to ask on
    └── ChainError                 settlement on a chain failed (``wallet.chain``)
        ├── ChainReverted          the contract refused: ``reason`` is its revert string
        ├── ChainUnreachable       the JSON-RPC node did not answer, or answered nonsense
        └── BadVoucher             a voucher or authorization is malformed or not signed by whom it must be
"""

from __future__ import annotations

__all__ = [
    "WalletError",
    "KeystoreError",
    "KeystoreNotFound",
    "KeystoreExists",
    "KeystoreCorrupt",
    "WrongPassphrase",
    "PassphraseUnavailable",
    "ChainError",
    "ChainReverted",
    "ChainUnreachable",
    "BadVoucher",
]


class WalletError(Exception):
    """Root of every error raised by ``wallet``."""


class KeystoreError(WalletError):
    """The encrypted key file could not be created, read or unlocked, or no passphrase could be had
    (the base of the reasons below)."""


class KeystoreNotFound(KeystoreError):
    """No keystore at the path (a home gets one from ``node init``)."""


class KeystoreExists(KeystoreError):
    """Refusing to create a keystore where a file already is: a key is never overwritten."""


class KeystoreCorrupt(KeystoreError):
    """The file is too large, truncated, not an inferswarm keystore, of an unknown version or key
    derivation, or its public header does not match the encrypted key."""


class WrongPassphrase(KeystoreError):
    """Decryption failed with the passphrase given (or the file was altered since it was written)."""


class PassphraseUnavailable(KeystoreError):
    """No usable passphrase: ``INFERSWARM_PASSPHRASE`` is unset and there is no terminal to ask on,
    the two entries at creation differ, or it is empty."""


class ChainError(WalletError):
    """Settlement on a chain failed (the base of the reasons below)."""


class ChainReverted(ChainError):
    """The contract refused the transaction (or the call): nothing changed on the chain.

    Attributes:
        reason: the contract's revert string ("bad voucher", "over cap", ...), or "reverted".
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the contract refused: {reason}")
        self.reason = reason


class ChainUnreachable(ChainError):
    """The chain's JSON-RPC node did not answer, answered nonsense, or is another chain than expected."""


class BadVoucher(ChainError):
    """A voucher or transfer authorization is malformed, or was not signed by the key it must be."""
