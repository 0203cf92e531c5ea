"""The contracts deployed on a fresh in-process EVM, with named, funded keys and a clock to move."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from eth_account import Account
from web3 import Web3

from wallet.chain import Chain, ClaimItem, Deployment, Voucher, deploy, fund_gas, in_process_web3, sign_voucher


def key(name: str) -> bytes:
    """A deterministic secp256k1 private key for ``name``."""
    return hashlib.sha256(b"inferswarm-test-eth-key/" + name.encode()).digest()


def address(name: str) -> str:
    return Account.from_key(key(name)).address


@dataclass
class ChainRig:
    w3: Web3
    chain: Chain
    minter: bytes

    @property
    def deployment(self) -> Deployment:
        return self.chain.deployment

    def fund(self, name: str, tokens: int = 0, deposit: int = 0) -> bytes:
        """Gas for ``name``, ``tokens`` minted to it, ``deposit`` of them moved into its escrow account."""
        k = key(name)
        fund_gas(self.w3, address(name))
        if tokens:
            self.chain.mint(self.minter, address(name), tokens)
        if deposit:
            self.chain.deposit(k, deposit)
        return k

    def advance(self, seconds: int) -> int:
        """Mine a block ``seconds`` after the latest; returns its timestamp."""
        at = self.chain.now() + seconds
        self.w3.provider.ethereum_tester.time_travel(at)
        return at

    def voucher(self, consumer: str, channel: int, nonce: int, amount: int, *, chain_id: int | None = None,
                contract: str | None = None, close: bool = False) -> ClaimItem:
        v = Voucher(chain_id=self.deployment.chain_id if chain_id is None else chain_id,
                    contract=contract or self.deployment.escrow, channel=channel, nonce=nonce, amount=amount)
        return ClaimItem(channel, nonce, amount, sign_voucher(key(consumer), v), close)

    def snapshot(self) -> int:
        return self.w3.provider.ethereum_tester.take_snapshot()

    def revert(self, snapshot: int) -> None:
        self.w3.provider.ethereum_tester.revert_to_snapshot(snapshot)


def chain_rig() -> ChainRig:
    w3 = in_process_web3()
    minter = key("minter")
    fund_gas(w3, address("minter"))
    return ChainRig(w3, Chain(w3, deploy(w3, minter)), minter)
