"""What escrow operations give back, typed: the agent's signed answers, read. Each edge presents
them with ``to_json()`` (the CLI contract's documents: integer µc, hex ids)."""

from __future__ import annotations

import dataclasses
from typing import Any

import protocol

__all__ = ["ChannelInfo", "BudgetInfo", "WalletBalance", "Transfer", "ChannelOpened", "Settlement", "CloseHalf"]


@dataclasses.dataclass(frozen=True)
class ChannelInfo:
    """A channel as its agent reports it: the signed grant, what has been claimed, its status."""

    state: protocol.ChannelState

    @property
    def grant(self) -> protocol.ChannelGrant:
        return self.state.channel

    @property
    def remaining(self) -> int:
        """What the provider may still claim (nothing once closed or refunded)."""
        return self.grant.cap - self.state.claimed if self.state.status == "open" else 0

    def to_json(self) -> dict[str, Any]:
        ch = self.grant
        return {
            "channel_id": ch.channel_id.hex(),
            "agent": ch.agent,
            "consumer": ch.consumer,
            "provider": ch.provider,
            "cap": ch.cap,
            "claimed": self.state.claimed,
            "remaining": self.remaining,
            "expires_at": ch.expires_at,
            "budget_id": ch.budget_id.hex() if ch.budget_id else None,
            "status": self.state.status,
        }


@dataclasses.dataclass(frozen=True)
class BudgetInfo:
    """A funder's budget as its agent reports it."""

    state: protocol.BudgetState

    def to_json(self) -> dict[str, Any]:
        b = self.state
        return {
            "budget_id": b.budget_id.hex(),
            "funder": b.funder,
            "amount": b.amount,
            "remaining": b.remaining,
            "whitelist": list(b.whitelist),
            "per_session_limit": b.per_session_limit,
            "expires_at": b.expires_at,
            "status": b.status,
        }


@dataclasses.dataclass(frozen=True)
class WalletBalance:
    """This node's account at one agent: available and locked µc, and its channels."""

    agent: str
    available: int
    locked: int
    channels: tuple[ChannelInfo, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"escrow": self.agent, "available": self.available, "locked": self.locked,
                "channels": [c.to_json() for c in self.channels]}


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Credits minted to an account (``to``) or withdrawn from this node's; ``available`` after it."""

    agent: str
    amount: int
    available: int | None
    to: str | None = None  # set for a mint

    def to_json(self) -> dict[str, Any]:
        if self.to is not None:
            return {"escrow": self.agent, "to": self.to, "minted": self.amount, "available": self.available}
        return {"escrow": self.agent, "withdrawn": self.amount, "available": self.available}


@dataclasses.dataclass(frozen=True)
class ChannelOpened:
    """A channel this node opened: the agent-signed grant a session carries."""

    agent: str
    grant: protocol.ChannelGrant

    def to_json(self) -> dict[str, Any]:
        ch = self.grant
        return {"channel_id": ch.channel_id.hex(), "cap": ch.cap, "expires_at": ch.expires_at, "escrow": self.agent,
                "provider": ch.provider, "budget_id": ch.budget_id.hex() if ch.budget_id else None}


@dataclasses.dataclass(frozen=True)
class Settlement:
    """A claim, close or refund: what was paid by it (None for a refund) and the channel after it."""

    channel: ChannelInfo
    paid: int | None = None
    already_paid: bool = False  # a claim of a receipt whose session was paid that much already

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"channel": self.channel.to_json()}
        if self.paid is not None:
            doc = {"paid": self.paid, **doc}
        if self.already_paid:
            doc["already_paid"] = True
        return doc


@dataclasses.dataclass(frozen=True)
class CloseHalf:
    """This party's signed half of a cooperative close, for the other party to complete and submit."""

    close: protocol.EscrowClose

    def to_json(self) -> dict[str, Any]:
        return {"partial": protocol.encode(self.close).hex(), "channel_id": self.close.channel_id.hex(),
                "valid_until": self.close.issued_at + 300}
