"""Keys, the encrypted keystore, the durable ledger and the escrow agent's rules. Never imports
trio, libp2p or node."""

from ._errors import *  # noqa: F403
from ._errors import __all__ as _errors_all
from ._escrow import (
    ESCROW_REQUESTS,
    EscrowAgent,
    EscrowError,
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
    WITHDRAWN,
    InvariantViolation,
    Ledger,
    LedgerError,
    peer_account,
)

__all__ = [
    "Identity",
    "Keystore",
    "PASSPHRASE_ENV",
    "read_public_identity",
    "resolve_passphrase",
    "Ledger",
    "LedgerError",
    "InvariantViolation",
    "MINT",
    "WITHDRAWN",
    "peer_account",
    "EscrowAgent",
    "EscrowError",
    "ESCROW_REQUESTS",
    "channel_account",
    "budget_account",
    *_errors_all,
]
