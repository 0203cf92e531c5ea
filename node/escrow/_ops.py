"""What a node asks of escrow agents on its own behalf: every request built and signed here,
answered through ``EscrowClient``, presented as JSON (integer µc, hex ids) for the API."""

from __future__ import annotations

import secrets
from typing import Any, Callable

import protocol
from protocol import (
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
    EscrowWithdraw,
)
from wallet import Identity

from .._errors import RemoteError
from ._client import EscrowClient

__all__ = ["EscrowOps", "EscrowRefused", "channel_json"]


class EscrowRefused(RemoteError):
    """The agent refused the request; ``code`` is its error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


def channel_json(state: ChannelState) -> dict[str, Any]:
    ch = state.channel
    return {
        "channel_id": ch.channel_id.hex(),
        "agent": ch.agent,
        "consumer": ch.consumer,
        "provider": ch.provider,
        "cap": ch.cap,
        "claimed": state.claimed,
        "remaining": ch.cap - state.claimed if state.status == "open" else 0,
        "expires_at": ch.expires_at,
        "budget_id": ch.budget_id.hex() if ch.budget_id else None,
        "status": state.status,
    }


def budget_json(b: protocol.BudgetState) -> dict[str, Any]:
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


def _hex_id(value: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} must be 32 hex digits") from exc
    if len(raw) != 16:
        raise ValueError(f"{what} must be 32 hex digits")
    return raw


def _decode_hex(value: str, cls: type, what: str) -> Any:
    try:
        return protocol.decode(bytes.fromhex(value.strip()), expect=(cls,))
    except (ValueError, TypeError, protocol.ProtocolError) as exc:
        raise ValueError(f"{what} is not a hex-encoded {cls.KIND} message: {exc}") from exc


class EscrowOps:
    def __init__(self, identity: Identity, client: EscrowClient, clock: Callable[[], float]) -> None:
        self.identity = identity
        self.client = client
        self.clock = clock

    def now(self) -> int:
        return int(self.clock())

    def _signed(self, cls: type, **fields: Any) -> Any:
        msg = cls(request_id=secrets.token_bytes(16), party=self.identity.peer_id, issued_at=self.now(), **fields)
        return protocol.sign(msg, "sig", self.identity)

    async def _call(self, agent: str | None, request: Any) -> EscrowResponse:
        response = await self.client.call(agent, request)
        if not response.ok:
            raise EscrowRefused(response.error, response.detail)
        return response

    def agent_id(self, agent: str | None) -> str:
        return self.client.resolve(agent)[0]

    async def mint(self, agent: str | None, to: str, amount: int) -> dict[str, Any]:
        r = await self._call(agent, self._signed(EscrowMint, to=to, amount=amount))
        return {"escrow": r.agent, "to": to, "minted": r.paid, "available": r.balance.available if r.balance else None}

    async def withdraw(self, agent: str | None, amount: int) -> dict[str, Any]:
        r = await self._call(agent, self._signed(EscrowWithdraw, amount=amount))
        return {"escrow": r.agent, "withdrawn": r.paid, "available": r.balance.available if r.balance else None}

    async def balance(self, agent: str | None) -> dict[str, Any]:
        r = await self._call(agent, self._signed(EscrowQuery))
        assert r.balance is not None
        return {"escrow": r.agent, "available": r.balance.available, "locked": r.balance.locked,
                "channels": [channel_json(c) for c in r.channels]}

    async def budgets(self, agent: str | None) -> list[dict[str, Any]]:
        r = await self._call(agent, self._signed(EscrowQuery))
        return [budget_json(b) for b in r.budgets]

    async def channel(self, agent: str | None, channel_id: str) -> dict[str, Any]:
        r = await self._call(agent, self._signed(EscrowQuery, channel_id=_hex_id(channel_id, "channel id")))
        return channel_json(r.channels[0])

    async def open(self, agent: str | None, provider: str, cap: int, ttl_s: int,
                   budget_id: str | None = None) -> dict[str, Any]:
        r = await self._call(agent, self._signed(
            EscrowOpen, provider=provider, cap=cap, expires_at=self.now() + ttl_s,
            budget_id=_hex_id(budget_id, "budget id") if budget_id else None))
        ch = r.channels[0].channel
        return {"channel_id": ch.channel_id.hex(), "cap": ch.cap, "expires_at": ch.expires_at, "escrow": r.agent,
                "provider": ch.provider, "budget_id": budget_id}

    async def open_grant(self, agent: str | None, provider: str, cap: int, ttl_s: int) -> protocol.ChannelGrant:
        """Open a channel and return the agent-signed grant a session carries."""
        r = await self._call(agent, self._signed(EscrowOpen, provider=provider, cap=cap, expires_at=self.now() + ttl_s))
        return r.channels[0].channel

    async def claim(self, agent: str | None, receipt_hex: str) -> dict[str, Any]:
        receipt = _decode_hex(receipt_hex, protocol.Receipt, "receipt")
        r = await self._call(agent or receipt.agent, self._signed(EscrowClaim, receipt=receipt))
        return {"paid": r.paid, "channel": channel_json(r.channels[0])}

    async def refund(self, agent: str | None, channel_id: str) -> dict[str, Any]:
        r = await self._call(agent, self._signed(EscrowRefund, channel_id=_hex_id(channel_id, "channel id")))
        return {"channel": channel_json(r.channels[0])}

    async def close(self, agent: str | None, channel_id: str, receipt_hex: str | None, partial_hex: str | None,
                    sign_only: bool) -> dict[str, Any]:
        """A cooperative close: ``sign_only`` returns this party's half for the other party; with
        ``partial_hex`` (the other half) it adds this party's signature and submits."""
        cid = _hex_id(channel_id, "channel id")
        state = await self.channel(agent, channel_id)
        me = self.identity.peer_id
        role = "consumer_sig" if state["consumer"] == me else "provider_sig" if state["provider"] == me else None
        if role is None:
            raise ValueError("this node is not a party of that channel")
        if partial_hex:
            msg = _decode_hex(partial_hex, EscrowClose, "the other party's close")
            if msg.channel_id != cid:
                raise ValueError("that close is for another channel")
        else:
            receipt = _decode_hex(receipt_hex, protocol.Receipt, "receipt") if receipt_hex else None
            msg = EscrowClose(request_id=secrets.token_bytes(16), channel_id=cid, receipt=receipt, issued_at=self.now())
        msg = protocol.sign(msg, role, self.identity)
        if sign_only:
            return {"partial": protocol.encode(msg).hex(), "channel_id": channel_id,
                    "valid_until": msg.issued_at + 300}
        if not partial_hex:
            raise ValueError("a cooperative close needs both parties: sign with --sign-only and have the other "
                             "party submit with --with FILE")
        r = await self._call(agent, msg)
        return {"paid": r.paid, "channel": channel_json(r.channels[0])}

    async def budget_create(self, agent: str | None, amount: int, whitelist: list[str], per_session_limit: int,
                            ttl_s: int) -> dict[str, Any]:
        r = await self._call(agent, self._signed(EscrowBudgetCreate, amount=amount, whitelist=tuple(whitelist),
                                                 per_session_limit=per_session_limit, expires_at=self.now() + ttl_s))
        return budget_json(r.budgets[0])

    async def budget_refund(self, agent: str | None, budget_id: str) -> dict[str, Any]:
        r = await self._call(agent, self._signed(EscrowBudgetRefund, budget_id=_hex_id(budget_id, "budget id")))
        return budget_json(r.budgets[0])
