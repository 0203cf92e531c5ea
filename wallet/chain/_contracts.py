"""``Chain``: the escrow and token contracts on one chain, reached through web3.py.

Every state change is a transaction signed here by a local secp256k1 key (never a key the
JSON-RPC node holds), sent, and waited for: a method returns only once its transaction is mined,
with its hash and gas. A contract's refusal is translated once, here, into ``ChainReverted`` with
the contract's reason (the revert string), before anything is sent: gas estimation runs the
transaction first. A node that cannot be reached, or answers for another chain than the
deployment's, is ``ChainUnreachable``.

Blocking (web3.py is synchronous): the node calls these from worker threads. One lock orders the
transactions sent through one ``Chain`` so account nonces never collide.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from web3 import Web3
from web3.logs import DISCARD

from .._errors import ChainError, ChainReverted, ChainUnreachable
from ._artifacts import load_artifact

__all__ = ["Chain", "Deployment", "ChannelState", "BudgetState", "ClaimItem", "Sent", "deploy", "find_deployment"]

_WAIT_S = 120


@dataclass(frozen=True)
class Deployment:
    """Where our contracts live: a chain id and two addresses. Listings carry it (chain id + escrow)."""

    chain_id: int
    token: str
    escrow: str


@dataclass(frozen=True)
class Sent:
    """A mined transaction."""

    tx_hash: str  # 0x-prefixed
    gas_used: int
    block: int


@dataclass(frozen=True)
class ChannelState:
    """A channel as the contract holds it."""

    channel: int
    consumer: str
    provider: str
    budget: int  # 0: funded from the consumer's account
    cap: int
    claimed: int
    expiry: int
    closed: bool

    @property
    def remaining(self) -> int:
        return 0 if self.closed else self.cap - self.claimed


@dataclass(frozen=True)
class BudgetState:
    """A funded budget as the contract holds it (members are asked one at a time: ``is_member``)."""

    budget: int
    sponsor: str
    balance: int
    session_limit: int
    expiry: int


@dataclass(frozen=True)
class ClaimItem:
    """One voucher to claim: the consumer's signature over ``(channel, nonce, amount)``."""

    channel: int
    nonce: int
    amount: int
    signature: bytes
    close: bool = False


def _reason(exc: Exception) -> str | None:
    """The revert string of a refused call, or None when ``exc`` is not a refusal."""
    from eth_tester.exceptions import TransactionFailed
    from web3.exceptions import ContractCustomError, ContractLogicError

    if not isinstance(exc, TransactionFailed | ContractLogicError | ContractCustomError):
        return None
    text = str(exc.args[0] if exc.args else exc)
    marker = "execution reverted"
    if marker in text:
        text = text.split(marker, 1)[1].lstrip(": ").strip() or "reverted"
    return text.strip("'\"") or "reverted"


def _translated(what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ChainError:
        raise
    except Exception as exc:
        reason = _reason(exc)
        if reason is not None:
            raise ChainReverted(reason) from exc
        raise ChainUnreachable(f"{what}: {type(exc).__name__}: {exc}") from exc


def deploy(w3: Web3, deployer_key: bytes, *, token_name: str = "Inferswarm USD",
           token_symbol: str = "ISC") -> Deployment:
    """Deploy the test stablecoin (``deployer_key`` may mint) and an escrow over it.

    Raises:
        ChainUnreachable: the node did not take the transactions.
    """
    chain = Chain(w3, Deployment(chain_id=_translated("chain id", lambda: w3.eth.chain_id), token="", escrow=""))
    token = chain._deploy(deployer_key, "Stablecoin", token_name, token_symbol)
    escrow = chain._deploy(deployer_key, "Escrow", token)
    return Deployment(chain_id=chain.deployment.chain_id, token=token, escrow=escrow)


def find_deployment(w3: Web3, escrow: str) -> Deployment:
    """The deployment whose escrow contract is at ``escrow`` (its token is what the escrow holds),
    checked to run this release's code (both contracts' runtime bytecode, Vyper's immutables after it).

    Raises:
        ChainUnreachable: the node did not answer, or no escrow of ours (and its token) is at that address.
    """
    chain_id = _translated("chain id", lambda: w3.eth.chain_id)
    try:
        address = Web3.to_checksum_address(escrow)
    except ValueError as exc:
        raise ChainUnreachable(f"{escrow!r} is not a contract address (0x and 40 hex digits)") from exc
    contract = w3.eth.contract(address=address, abi=load_artifact("Escrow").abi)
    try:
        token = _translated("escrow token", contract.functions.token().call)
    except ChainError as exc:
        raise ChainUnreachable(f"no Inferswarm escrow contract at {address} on chain {chain_id}: {exc}") from exc
    chain = Chain(w3, Deployment(chain_id=chain_id, token=token, escrow=address))
    chain.check()
    # the code must be ours, not merely answer like it: a look-alike token could "pay" without moving value
    for where, name in ((address, "Escrow"), (token, "Stablecoin")):
        code = "0x" + bytes(_translated("code", lambda a=where: w3.eth.get_code(a))).hex()
        if not code.startswith(load_artifact(name).runtime):
            raise ChainUnreachable(f"the contract at {where} on chain {chain_id} is not Inferswarm's {name} "
                                   "(its code differs from this release's)")
    return chain.deployment


class Chain:
    """Our contracts on one chain. Amounts are token units: 1 unit = 1 µc."""

    def __init__(self, w3: Web3, deployment: Deployment) -> None:
        self.w3 = w3
        self.deployment = deployment
        self._lock = threading.Lock()
        self._token_abi = load_artifact("Stablecoin").abi
        self._escrow_abi = load_artifact("Escrow").abi
        self.token = w3.eth.contract(address=deployment.token, abi=self._token_abi) if deployment.token else None
        self.escrow = w3.eth.contract(address=deployment.escrow, abi=self._escrow_abi) if deployment.escrow else None

    # -- checks and views --------------------------------------------------------------------

    def check(self) -> None:
        """The node answers, is on the deployment's chain, and both contracts have code.

        Raises:
            ChainUnreachable: any of those is not so.
        """
        chain_id = _translated("chain id", lambda: self.w3.eth.chain_id)
        if chain_id != self.deployment.chain_id:
            raise ChainUnreachable(f"the node is on chain {chain_id}, the contracts on {self.deployment.chain_id}")
        for address in (self.deployment.token, self.deployment.escrow):
            if not _translated("code", lambda a=address: self.w3.eth.get_code(a)):
                raise ChainUnreachable(f"no contract at {address} on chain {chain_id}")

    def now(self) -> int:
        """The latest block's timestamp: the contracts' clock."""
        return int(_translated("latest block", lambda: self.w3.eth.get_block("latest"))["timestamp"])

    def token_name(self) -> str:
        """The token's EIP-712 domain name (what EIP-3009 authorizations are signed under)."""
        return str(self._view(self.token.functions.name()))

    def token_balance(self, address: str) -> int:
        return int(self._view(self.token.functions.balanceOf(address)))

    def held(self) -> int:
        """What the escrow contract holds of the token."""
        return self.token_balance(self.deployment.escrow)

    def account(self, address: str) -> int:
        return int(self._view(self.escrow.functions.accounts(address)))

    def channel(self, channel: int) -> ChannelState:
        c = self._view(self.escrow.functions.channels(channel))
        return ChannelState(channel, c[0], c[1], int(c[2]), int(c[3]), int(c[4]), int(c[5]), bool(c[6]))

    def channel_count(self) -> int:
        return int(self._view(self.escrow.functions.channel_count()))

    def claimed(self, channel: int, nonce: int) -> int:
        return int(self._view(self.escrow.functions.claimed(channel, nonce)))

    def budget(self, budget: int) -> BudgetState:
        b = self._view(self.escrow.functions.budgets(budget))
        return BudgetState(budget, b[0], int(b[1]), int(b[2]), int(b[3]))

    def budget_count(self) -> int:
        return int(self._view(self.escrow.functions.budget_count()))

    def is_member(self, budget: int, address: str) -> bool:
        return bool(self._view(self.escrow.functions.members(budget, address)))

    def authorization_used(self, sender: str, nonce: bytes) -> bool:
        return bool(self._view(self.token.functions.authorizationState(sender, nonce)))

    # -- the token ---------------------------------------------------------------------------

    def mint(self, minter_key: bytes, to: str, amount: int) -> Sent:
        return self._send(minter_key, self.token.functions.mint(to, amount))

    def transfer(self, key: bytes, to: str, amount: int) -> Sent:
        return self._send(key, self.token.functions.transfer(to, amount))

    def transfer_with_authorization(self, submitter_key: bytes, sender: str, receiver: str, value: int,
                                    valid_after: int, valid_before: int, nonce: bytes, signature: bytes) -> Sent:
        """Submit an EIP-3009 authorization signed by ``sender`` (anyone may: the submitter pays the gas)."""
        r, s, v = signature[:32], signature[32:64], signature[64]
        return self._send(submitter_key, self.token.functions.transferWithAuthorization(
            sender, receiver, value, valid_after, valid_before, nonce, v, r, s))

    # -- the escrow --------------------------------------------------------------------------

    def deposit(self, key: bytes, amount: int) -> Sent:
        """Approve the escrow for ``amount`` and move it into the key's account (two transactions)."""
        self._send(key, self.token.functions.approve(self.deployment.escrow, amount))
        return self._send(key, self.escrow.functions.deposit(amount))

    def withdraw(self, key: bytes, amount: int) -> Sent:
        return self._send(key, self.escrow.functions.withdraw(amount))

    def open_channel(self, key: bytes, provider: str, cap: int, expiry: int) -> tuple[int, Sent]:
        sent, receipt = self._send_receipt(key, self.escrow.functions.open_channel(provider, cap, expiry))
        return self._event_arg(receipt, "ChannelOpened", "channel"), sent

    def open_budget_channel(self, key: bytes, budget: int, provider: str, cap: int, expiry: int) -> tuple[int, Sent]:
        sent, receipt = self._send_receipt(key, self.escrow.functions.open_budget_channel(budget, provider, cap,
                                                                                          expiry))
        return self._event_arg(receipt, "ChannelOpened", "channel"), sent

    def extend(self, key: bytes, channel: int, added: int, expiry: int) -> Sent:
        return self._send(key, self.escrow.functions.extend(channel, added, expiry))

    def claim(self, key: bytes, items: Sequence[ClaimItem]) -> tuple[int, Sent]:
        """Claim every voucher of ``items`` in one transaction (all or none); returns what it paid."""
        if not items:
            raise ValueError("nothing to claim")
        batch = [(i.channel, i.nonce, i.amount, bytes(i.signature), i.close) for i in items]
        sent, receipt = self._send_receipt(key, self.escrow.functions.claim_many(batch))
        paid = sum(e["args"]["paid"] for e in self.escrow.events.Claimed().process_receipt(receipt, errors=DISCARD))
        return paid, sent

    def refund(self, key: bytes, channel: int) -> Sent:
        return self._send(key, self.escrow.functions.refund(channel))

    def create_budget(self, key: bytes, amount: int, session_limit: int, expiry: int,
                      members: Sequence[str]) -> tuple[int, Sent]:
        sent, receipt = self._send_receipt(key, self.escrow.functions.create_budget(amount, session_limit, expiry,
                                                                                    list(members)))
        return self._event_arg(receipt, "BudgetCreated", "budget"), sent

    def fund_budget(self, key: bytes, budget: int, amount: int) -> Sent:
        return self._send(key, self.escrow.functions.fund_budget(budget, amount))

    def set_member(self, key: bytes, budget: int, member: str, allowed: bool) -> Sent:
        return self._send(key, self.escrow.functions.set_member(budget, member, allowed))

    def reclaim_budget(self, key: bytes, budget: int) -> Sent:
        return self._send(key, self.escrow.functions.reclaim_budget(budget))

    # -- sending -----------------------------------------------------------------------------

    def _view(self, fn: Any) -> Any:
        return _translated(fn.fn_name, fn.call)

    def _send(self, key: bytes, fn: Any) -> Sent:
        return self._send_receipt(key, fn)[0]

    def _send_receipt(self, key: bytes, fn: Any) -> tuple[Sent, Any]:
        account = Account.from_key(key)
        with self._lock:
            def build() -> Any:
                nonce = self.w3.eth.get_transaction_count(account.address, "pending")
                return fn.build_transaction({"from": account.address, "nonce": nonce,
                                             "chainId": self.deployment.chain_id})
            tx = _translated(fn.fn_name, build)  # estimating gas runs it: a refusal raises here
            signed = account.sign_transaction(tx)
            tx_hash = _translated("send", lambda: self.w3.eth.send_raw_transaction(signed.raw_transaction))
            receipt = _translated("receipt", lambda: self.w3.eth.wait_for_transaction_receipt(tx_hash,
                                                                                                timeout=_WAIT_S))
        if receipt["status"] != 1:  # the state moved between estimate and mining
            raise ChainReverted("reverted")
        return Sent("0x" + bytes(tx_hash).hex(), int(receipt["gasUsed"]), int(receipt["blockNumber"])), receipt

    def _deploy(self, key: bytes, name: str, *args: Any) -> str:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        _, receipt = self._send_receipt(key, _Constructor(factory.constructor(*args)))
        return receipt["contractAddress"]

    def _event_arg(self, receipt: Any, event: str, arg: str) -> int:
        events = getattr(self.escrow.events, event)().process_receipt(receipt, errors=DISCARD)
        return int(events[0]["args"][arg])


class _Constructor:
    """A contract constructor with the ``fn_name`` the senders log by."""

    fn_name = "deploy"

    def __init__(self, constructor: Any) -> None:
        self._constructor = constructor

    def build_transaction(self, tx: dict[str, Any]) -> Any:
        return self._constructor.build_transaction(tx)
