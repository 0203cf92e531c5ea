"""Keys, the encrypted keystore and (later) the durable ledger and escrow. Never imports trio,
libp2p or node."""

from ._errors import *  # noqa: F403
from ._errors import __all__ as _errors_all
from ._keys import Identity
from ._keystore import PASSPHRASE_ENV, Keystore, read_public_identity, resolve_passphrase

__all__ = ["Identity", "Keystore", "PASSPHRASE_ENV", "read_public_identity", "resolve_passphrase", *_errors_all]
