"""Chains to settle on without a network: the in-process EVM (eth-tester on py-evm) the embedded
default and the tests use, and gas for local accounts from a devnet's unlocked, funded account.

Only for development chains: ``fund_gas`` needs a node that holds an unlocked account with ether
(eth-tester, ganache, hardhat all start with some); a real chain has none.
"""

from __future__ import annotations

from web3 import EthereumTesterProvider, Web3

from .._errors import ChainUnreachable
from .._eth import kept_recursion_limit

__all__ = ["in_process_web3", "fund_gas", "GAS_ALLOWANCE_WEI"]

GAS_ALLOWANCE_WEI = 10**20  # 100 ether: enough gas for any test or demo, on a chain where it is worthless


def in_process_web3() -> Web3:
    """A fresh EVM in this process: its own chain, blocks mined on each transaction, time from the clock."""
    with kept_recursion_limit():  # py-evm's first import would raise it (wallet/_eth.py)
        return Web3(EthereumTesterProvider())


def fund_gas(w3: Web3, address: str, wei: int = GAS_ALLOWANCE_WEI) -> None:
    """Send ``address`` ether for gas from the devnet's first unlocked account.

    Raises:
        ChainUnreachable: the node holds no unlocked account (not a devnet), or refused.
    """
    try:
        accounts = w3.eth.accounts
        if not accounts:
            raise ChainUnreachable("this chain's node holds no funded account to pay gas from (not a devnet)")
        tx_hash = w3.eth.send_transaction({"from": accounts[0], "to": address, "value": wei})
        w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    except ChainUnreachable:
        raise
    except Exception as exc:
        raise ChainUnreachable(f"funding {address} with gas failed: {exc}") from exc
