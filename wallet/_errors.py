"""The wallet package's errors, under one root.

    WalletError
    └── KeystoreError
        ├── KeystoreNotFound       no keystore at the path (run `node init`)
        ├── KeystoreExists         refusing to overwrite an existing keystore
        ├── KeystoreCorrupt        truncated, not a keystore, or tampered with
        ├── WrongPassphrase        decryption failed with the passphrase given
        └── PassphraseUnavailable  no INFERSWARM_PASSPHRASE and no terminal to ask on
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
]


class WalletError(Exception):
    """Root of every error raised by ``wallet``."""


class KeystoreError(WalletError):
    pass


class KeystoreNotFound(KeystoreError):
    pass


class KeystoreExists(KeystoreError):
    pass


class KeystoreCorrupt(KeystoreError):
    pass


class WrongPassphrase(KeystoreError):
    pass


class PassphraseUnavailable(KeystoreError):
    pass
