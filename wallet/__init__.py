"""Keys, the encrypted keystore, the durable ledger and the escrow agent's rules.

    _keys           Identity: the one Ed25519 key that signs everything and names the node
    _keystore       the encrypted keystore: the identity seed and upstream API keys, at rest
    _ledger         the durable double-entry ledger (SQLite): transfers, request records, invariant,
                    storage faults translated once, integrity checks, backups and restore
    _escrow         EscrowAgent: the escrow's rules (signatures, freshness, caps, expiry, claims); Prepared:
                    a request checked outside the ledger, for group commit (``apply_many``)
    _escrow_terms   the escrow's vocabulary: request kinds, storage refusals, EscrowError, account names, Prepared
    _escrow_store   the only SQL about channels, budgets and request records; it decides nothing
    _refusals       RefusalBook: refused requests remembered in memory while fresh, and the rate limit
    _errors         WalletError, the keystore's errors and the chain's
    chain/          settlement on a chain: the contracts, their EIP-712 vouchers, a web3 client (imported
                    on its own: ``wallet.chain``)

Imports ``protocol``; never trio, libp2p or ``node``.
"""

from ._errors import (
    BadVoucher,
    ChainError,
    ChainReverted,
    ChainUnreachable,
    KeystoreCorrupt,
    KeystoreError,
    KeystoreExists,
    KeystoreNotFound,
    PassphraseUnavailable,
    WalletError,
    WrongPassphrase,
)
from ._escrow import (
    ESCROW_REQUESTS,
    STORAGE_REFUSALS,
    EscrowAgent,
    EscrowError,
    Prepared,
    budget_account,
    channel_account,
)
from ._keys import Identity
from ._keystore import (
    PASSPHRASE_ENV,
    Keystore,
    read_public_identity,
    resolve_passphrase,
)
from ._ledger import (
    MINT,
    RECOVERY,
    WITHDRAWN,
    Backup,
    FileCheck,
    InvariantViolation,
    Ledger,
    LedgerDamaged,
    LedgerError,
    LedgerInUse,
    StorageError,
    StorageFull,
    StorageReadOnly,
    check_ledger_file,
    hold_exclusive,
    ledger_backup_folder,
    list_ledger_backups,
    peer_account,
    restore_ledger,
)
from ._refusals import RefusalBook

__all__ = [
    "Backup",
    "BadVoucher",
    "budget_account",
    "ChainError",
    "ChainReverted",
    "ChainUnreachable",
    "channel_account",
    "check_ledger_file",
    "ESCROW_REQUESTS",
    "EscrowAgent",
    "EscrowError",
    "FileCheck",
    "hold_exclusive",
    "Identity",
    "InvariantViolation",
    "Keystore",
    "KeystoreCorrupt",
    "KeystoreError",
    "KeystoreExists",
    "KeystoreNotFound",
    "Ledger",
    "ledger_backup_folder",
    "LedgerDamaged",
    "LedgerError",
    "LedgerInUse",
    "list_ledger_backups",
    "MINT",
    "PASSPHRASE_ENV",
    "PassphraseUnavailable",
    "peer_account",
    "Prepared",
    "read_public_identity",
    "RECOVERY",
    "RefusalBook",
    "resolve_passphrase",
    "restore_ledger",
    "STORAGE_REFUSALS",
    "StorageError",
    "StorageFull",
    "StorageReadOnly",
    "WalletError",
    "WITHDRAWN",
    "WrongPassphrase",
]
