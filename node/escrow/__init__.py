"""The escrow role, both ends of ``protocol.ESCROW_PROTOCOL``.

    _service   the agent: answers signed requests with ``wallet.EscrowAgent``'s rules, sweeps expiries,
               checks the ledger's integrity and backs it up on a schedule
    _client    EscrowClient: one signed request to an agent (this node's own without a stream)
    _ops       EscrowOps: the operations a node asks for (mint, open, claim, close, budgets…)
    _results   what they give back, typed: ChannelInfo, BudgetInfo, WalletBalance, Settlement, …

The money rules live in ``wallet`` (``EscrowAgent`` over the ledger); this package only moves
requests and answers. Imports ``net`` (streams, addresses) and no other role.
"""

from ._client import EscrowClient, EscrowUnreachable
from ._ops import EscrowOps, EscrowRefused
from ._results import (
    BudgetInfo,
    ChannelInfo,
    ChannelOpened,
    CloseHalf,
    Settlement,
    Transfer,
    WalletBalance,
)
from ._service import serve_escrow

__all__ = [
    "BudgetInfo",
    "ChannelInfo",
    "ChannelOpened",
    "CloseHalf",
    "EscrowClient",
    "EscrowOps",
    "EscrowRefused",
    "EscrowUnreachable",
    "serve_escrow",
    "Settlement",
    "Transfer",
    "WalletBalance",
]
