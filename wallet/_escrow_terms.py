"""The escrow's vocabulary, shared by its rules (``_escrow``) and the package: which requests
there are, the storage refusals and what a client is told about them, the rules' error, account
names, refusal keys, and a request prepared for group commit (``Prepared``). Pure."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from protocol import (
    BudgetState,
    ChannelState,
    EscrowBudgetCreate,
    EscrowBudgetRefund,
    EscrowClaim,
    EscrowClose,
    EscrowMint,
    EscrowOpen,
    EscrowQuery,
    EscrowRefund,
    EscrowResponse,
    EscrowTopUp,
    EscrowWithdraw,
)

from ._errors import WalletError

ESCROW_REQUESTS = (
    EscrowMint, EscrowOpen, EscrowTopUp, EscrowClaim, EscrowClose, EscrowRefund, EscrowWithdraw,
    EscrowBudgetCreate, EscrowBudgetRefund, EscrowQuery,
)
MAX_LISTED_CHANNELS = 1024
STORAGE_REFUSALS = ("ledger_damaged", "ledger_unavailable", "storage_full", "storage_readonly", "storage_error")
_STORAGE_DETAILS = {  # what a client is told (the operator's log has the file and SQLite's words)
    "ledger_damaged": "the agent's ledger is damaged: money operations are stopped until its operator restores it "
                      "(`node escrow check`); nothing was applied",
    "storage_full": "the agent's disk is full: nothing was applied; try again later",
    "storage_readonly": "the agent's ledger is read-only: nothing was applied; try again later",
    "storage_error": "the agent's disk failed a read or write: nothing was applied; try again later",
    "ledger_unavailable": "the agent's ledger cannot be used now: nothing was applied; try again later",
}
MAX_LISTED_BUDGETS = 256


_HORIZON_LEAD_S = 5  # how far ahead of our clock a refusal may date and still only be remembered


class EscrowError(WalletError):
    """A request the rules refuse; ``code`` is the answer's error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


def channel_account(channel_id: bytes) -> str:
    return f"channel:{channel_id.hex()}"


def budget_account(budget_id: bytes) -> str:
    return f"budget:{budget_id.hex()}"


def _derive_id(tag: bytes, request_id: bytes) -> bytes:
    return hashlib.sha256(tag + request_id).digest()[:16]


@dataclasses.dataclass(frozen=True)
class _Result:
    paid: int = 0
    channels: tuple[ChannelState, ...] = ()
    budgets: tuple[BudgetState, ...] = ()
    budget_id: bytes | None = None
    balance_of: str | None = None


class _Forget(Exception):
    """Raised inside a refused request's transaction to roll it back: the refusal is kept in
    memory instead (``answer`` is what the caller gets)."""

    def __init__(self, answer: EscrowResponse) -> None:
        super().__init__("refusal kept in memory")
        self.answer = answer


def _party_key(request: Any) -> str:
    """Who a request's refusals count against: its signing party; a cooperative close (signed by
    both parties of one channel) counts against its channel."""
    if isinstance(request, EscrowClose):
        return f"close:{request.channel_id.hex()}"
    return f"party:{request.party}"


def _source_key(source: str | None) -> str | None:
    return None if source is None else f"via:{source}"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request that passed ``EscrowAgent.prepare``, waiting for ``apply_many``."""

    request: Any
    now: int
    keys: tuple[str, str | None]
    digest: bytes  # of the request's canonical bytes (its idempotency record)
    receipt_signed: bool | None = None  # the receipt's two signatures hold (None: no receipt, or unchecked)


