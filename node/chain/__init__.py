"""The chain a node settles on (``[node] chain``): the link to it and this node's account there, and
a development chain to share (``node devnet``, ``node start --devnet``).

    _link     ChainLink, ChainSpec and parse_chain_spec: ``evm:embedded`` or ``evm:URL#ESCROW``
    _devnet   Devnet and serve_devnet: the in-process EVM behind a loopback JSON-RPC endpoint, with a faucet
"""

from ._devnet import FAUCET_MAX, Devnet, serve_devnet
from ._link import EMBEDDED, ChainLink, ChainSpec, open_chain_link, parse_chain_spec

__all__ = ["ChainLink", "ChainSpec", "Devnet", "EMBEDDED", "FAUCET_MAX", "open_chain_link", "parse_chain_spec",
           "serve_devnet"]
