"""``ChainLink``: this node's way to a chain its operator chose (``[node] chain`` / ``--chain``).

A chain is named ``evm:embedded`` — an EVM inside this process (eth-tester on py-evm) with our
contracts deployed at start and this node as the test stablecoin's minter: no server, no network,
gone when the node stops (the demo's and the tests' chain) — or ``evm:URL#ESCROW``, a JSON-RPC node
(``http://`` or ``https://``) and the address of the escrow contract on it; the token is the one
that escrow holds. On a devnet (a node that holds a funded, unlocked account: ganache, hardhat,
``node devnet``) this node's account is given gas at start when it has none.

web3.py is synchronous: every call runs in a worker thread (at most ``_THREADS`` at once), never
abandoned when its caller is cancelled, so a transaction sent is always seen to its end.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import trio

from wallet import ChainError, ChainUnreachable, Identity

__all__ = ["ChainLink", "ChainSpec", "parse_chain_spec", "open_chain_link", "EMBEDDED"]

EMBEDDED = "evm:embedded"
_THREADS = 4
_EMBEDDED_MINT = 10**15  # µc the embedded chain's minter (this node) starts with: a billion credits
_T = TypeVar("_T")
_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainSpec:
    """A parsed ``evm:…`` chain name."""

    url: str  # "" for the embedded chain
    escrow: str  # "" for the embedded chain (deployed at start)

    @property
    def embedded(self) -> bool:
        return not self.url

    def __str__(self) -> str:
        return EMBEDDED if self.embedded else f"evm:{self.url}#{self.escrow}"


def parse_chain_spec(text: str) -> ChainSpec:
    """``evm:embedded`` or ``evm:URL#ESCROW`` (URL http(s), ESCROW 0x and 40 hex digits).

    Raises:
        ValueError: anything else, saying what is expected.
    """
    example = "evm:embedded, or evm:http://127.0.0.1:8545#0xESCROW_CONTRACT"
    if text == EMBEDDED:
        return ChainSpec("", "")
    if not text.startswith("evm:") or "#" not in text:
        raise ValueError(f"a chain is {example}: not {text!r}")
    url, _, escrow = text[4:].rpartition("#")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the chain's JSON-RPC URL must be http:// or https:// ({example}): not {url!r}")
    if len(escrow) != 42 or not escrow.startswith("0x") or any(c not in "0123456789abcdefABCDEF" for c in escrow[2:]):
        raise ValueError(f"the escrow contract's address is 0x and 40 hex digits ({example}): not {escrow!r}")
    return ChainSpec(url, escrow)


class ChainLink:
    """The chain this node settles on: the client of its contracts, and this node's account there."""

    def __init__(self, spec: ChainSpec, chain: Any, identity: Identity, token_name: str, faucet: bool = False) -> None:
        self.spec = spec
        self.faucet = faucet  # a devnet whose faucet anyone reaching it may mint from: its tokens are worth nothing
        self.chain = chain  # wallet.chain.Chain
        self.key = identity.eth_key
        self.address = identity.eth_address
        self.token_name = token_name
        self._limiter = trio.CapacityLimiter(_THREADS)

    @property
    def chain_id(self) -> int:
        return int(self.chain.deployment.chain_id)

    @property
    def network(self) -> str:
        """The chain as CAIP-2 names it (what x402 calls a network): ``eip155:<chain id>``."""
        return f"eip155:{self.chain_id}"

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread (web3 blocks); it runs to its end even if we are cancelled."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)


def _connect(spec: ChainSpec, identity: Identity) -> ChainLink:
    from web3 import Web3

    from wallet.chain import Chain, deploy, find_deployment, fund_gas, in_process_web3

    faucet = False  # only a devnet answers inferswarm_deployment
    if spec.embedded:
        w3 = in_process_web3()
        fund_gas(w3, identity.eth_address)
        chain = Chain(w3, deploy(w3, identity.eth_key))
        chain.mint(identity.eth_key, identity.eth_address, _EMBEDDED_MINT)
    else:
        w3 = Web3(Web3.HTTPProvider(spec.url, request_kwargs={"timeout": 30}))
        if not w3.is_connected():
            raise ChainUnreachable(f"no JSON-RPC node answers at {spec.url}: is the chain running? ({spec})")
        chain = Chain(w3, find_deployment(w3, spec.escrow))
        try:
            faucet = "result" in w3.provider.make_request("inferswarm_deployment", [])
        except Exception:  # a real node refuses the method, or answers nonsense: no faucet either way
            faucet = False
        if w3.eth.get_balance(identity.eth_address) == 0:
            try:
                fund_gas(w3, identity.eth_address)
            except ChainError as exc:  # a real chain: the operator pays for gas
                _logger.warning("this node's chain account %s holds no ether for gas (%s): fund it to settle "
                                "on %s", identity.eth_address, exc, spec)
    return ChainLink(spec, chain, identity, chain.token_name(), faucet=faucet)


async def open_chain_link(spec: ChainSpec, identity: Identity) -> ChainLink:
    """Connect to (or, embedded, create) the chain and check our contracts are there.

    Raises:
        ChainUnreachable: the JSON-RPC node did not answer, is another chain, or holds no escrow of ours there.
    """
    link = await trio.to_thread.run_sync(_connect, spec, identity)
    _logger.info("settling on %s (chain %d, escrow %s, this node's account %s)", spec, link.chain_id,
                 link.chain.deployment.escrow, link.address)
    return link
