"""The chain a node settles on (``[node] chain``): the link to it and this node's account there.

    _link   ChainLink, ChainSpec and parse_chain_spec: ``evm:embedded`` or ``evm:URL#ESCROW``
"""

from ._link import EMBEDDED, ChainLink, ChainSpec, open_chain_link, parse_chain_spec

__all__ = ["ChainLink", "ChainSpec", "EMBEDDED", "open_chain_link", "parse_chain_spec"]
