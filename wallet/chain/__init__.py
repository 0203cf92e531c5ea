"""Settlement on a chain: the Vyper contracts (a test stablecoin with EIP-3009, and the escrow:
channels, vouchers, claims, refunds, funded budgets), their EIP-712 messages and a client for them.

    _artifacts   the contracts' checked-in ABI and bytecode; recompiling and comparing them
    _vouchers    Voucher and TransferAuthorization: EIP-712 typed data, signing and recovery
    _contracts   Chain: views and signed, mined transactions on one deployment; deploy()
    _devnet      the in-process EVM (eth-tester) and gas from a devnet's funded account
    _facilitator x402's "exact" scheme: verify an EIP-3009 payment against what was asked, settle it

Imports web3.py and eth-account (synchronous: callers on trio use worker threads); never trio,
libp2p or ``node``. Not imported by ``wallet`` itself: web3 takes a second to import.
"""

from .._eth import load_eth_libraries as _load_eth_libraries

_load_eth_libraries()  # before any of ours imports them: the recursion limit stays as it was (wallet/_eth.py)

from ._artifacts import CONTRACTS, Artifact, compile_artifact, load_artifact, write_artifacts  # noqa: E402
from ._contracts import (  # noqa: E402
    BudgetState,
    Chain,
    ChannelState,
    ClaimItem,
    Deployment,
    Sent,
    deploy,
    find_deployment,
)
from ._devnet import GAS_ALLOWANCE_WEI, fund_gas, in_process_web3  # noqa: E402
from ._facilitator import (  # noqa: E402
    VALID_MARGIN_S,
    PaymentAsked,
    PaymentRefused,
    settle_payment,
    verify_payment,
)
from ._vouchers import (  # noqa: E402
    ESCROW_DOMAIN_NAME,
    ESCROW_DOMAIN_VERSION,
    TransferAuthorization,
    Voucher,
    authorization_signer,
    sign_authorization,
    sign_voucher,
    voucher_signer,
)

__all__ = [
    "Artifact",
    "authorization_signer",
    "BudgetState",
    "Chain",
    "ChannelState",
    "ClaimItem",
    "compile_artifact",
    "CONTRACTS",
    "deploy",
    "Deployment",
    "ESCROW_DOMAIN_NAME",
    "ESCROW_DOMAIN_VERSION",
    "find_deployment",
    "fund_gas",
    "GAS_ALLOWANCE_WEI",
    "in_process_web3",
    "load_artifact",
    "PaymentAsked",
    "PaymentRefused",
    "Sent",
    "settle_payment",
    "sign_authorization",
    "sign_voucher",
    "TransferAuthorization",
    "VALID_MARGIN_S",
    "verify_payment",
    "Voucher",
    "voucher_signer",
    "write_artifacts",
]
