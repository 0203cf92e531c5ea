"""What a node asks of escrow agents on its own behalf: every request built and signed here,
answered through ``EscrowClient``, presented as JSON (integer µc, hex ids) for the API."""

from __future__ import annotations

import re
import secrets
from typing import Any, Callable

import protocol
from protocol import (
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

from .._errors import InvalidRequest, RemoteError
from ._client import EscrowClient, EscrowUnreachable
from ._results import BudgetInfo, ChannelInfo, ChannelOpened, CloseHalf, Settlement, Transfer, WalletBalance

__all__ = ["EscrowOps", "EscrowRefused", "in_credits"]


class EscrowRefused(RemoteError):
    """The agent refused the request; ``code`` is its error code, ``detail`` its words (µc), and
    the message says it for a person (credits; ``message`` when the caller knows better)."""

    def __init__(self, code: str, detail: str, message: str | None = None) -> None:
        super().__init__(message or (f"{code}: {in_credits(detail)}" if detail else code))
        self.code = code
        self.detail = detail


# the agent's details that carry amounts (``wallet``'s refusals): µc, said as credits
_AMOUNTS = re.compile(r"\b(holds|needs|reach|cap|most) (\d+)\b|^(\d+) (already claimed)")


def in_credits(detail: str) -> str:
    """An agent's refusal detail with its µc amounts said in credits (``holds 2000`` -> ``holds
    0.002000 credits``); anything else is left as the agent wrote it."""

    def credits(m: re.Match[str]) -> str:
        if m.group(3) is not None:
            return f"{protocol.format_credits(int(m.group(3)))} credits {m.group(4)}"
        return f"{m.group(1)} {protocol.format_credits(int(m.group(2)))} credits"

    return _AMOUNTS.sub(credits, detail)


def _hex_id(value: str, what: str, field: str | None = None) -> bytes:
    """The 16 bytes of a hex id.

    Raises:
        InvalidRequest: not 32 hex digits (naming ``field``).
    """
    try:
        raw = bytes.fromhex(value)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{what} must be 32 hex digits", field) from exc
    if len(raw) != 16:
        raise InvalidRequest(f"{what} must be 32 hex digits", field)
    return raw


def _decode_hex(value: str, cls: type, what: str, field: str | None = None) -> Any:
    """A hex-encoded message of ``cls``.

    Raises:
        InvalidRequest: not one (naming ``field``).
    """
    try:
        return protocol.decode(bytes.fromhex(value.strip()), expect=(cls,))
    except (ValueError, TypeError, protocol.ProtocolError) as exc:
        raise InvalidRequest(f"{what} is not a hex-encoded {cls.KIND} message: {exc}", field) from exc


class EscrowOps:
    """The escrow operations this node asks of agents, each signed by this node, each answer checked."""

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

    async def mint(self, agent: str | None, to: str, amount: int) -> Transfer:
        r = await self._call(agent, self._signed(EscrowMint, to=to, amount=amount))
        return Transfer(r.agent, r.paid, r.balance.available if r.balance else None, to=to)

    async def withdraw(self, agent: str | None, amount: int) -> Transfer:
        r = await self._call(agent, self._signed(EscrowWithdraw, amount=amount))
        return Transfer(r.agent, r.paid, r.balance.available if r.balance else None)

    async def balance(self, agent: str | None) -> WalletBalance:
        r = await self._call(agent, self._signed(EscrowQuery))
        if r.balance is None:
            raise EscrowUnreachable(f"escrow agent {r.agent} answered a balance query without a balance")
        return WalletBalance(r.agent, r.balance.available, r.balance.locked, tuple(ChannelInfo(c) for c in r.channels))

    async def budgets(self, agent: str | None) -> list[BudgetInfo]:
        r = await self._call(agent, self._signed(EscrowQuery))
        return [BudgetInfo(b) for b in r.budgets]

    async def channel(self, agent: str | None, channel_id: str) -> ChannelInfo:
        r = await self._call(agent, self._signed(EscrowQuery, channel_id=_hex_id(channel_id, "channel id",
                                                                                 "channel_id")))
        return ChannelInfo(r.channels[0])

    async def channel_proof(self, agent: str, channel_id: bytes) -> EscrowResponse:
        """The agent's signed answer about channel ``channel_id`` (one ``ChannelState``): what an
        attestation carries as proof of what was settled.

        Raises:
            EscrowRefused: the agent said no. EscrowUnreachable: it could not be asked.
        """
        r = await self._call(agent, self._signed(EscrowQuery, channel_id=channel_id))
        if len(r.channels) != 1:
            raise EscrowUnreachable(f"escrow agent {r.agent} answered a channel query without that channel")
        return r

    async def open(self, agent: str | None, provider: str, cap: int, ttl_s: int,
                   budget_id: str | None = None) -> ChannelOpened:
        r = await self._call(agent, self._signed(
            EscrowOpen, provider=provider, cap=cap, expires_at=self.now() + ttl_s,
            budget_id=_hex_id(budget_id, "budget id", "budget_id") if budget_id else None))
        return ChannelOpened(r.agent, r.channels[0].channel)

    async def open_grant(self, agent: str | None, provider: str, cap: int, ttl_s: int) -> protocol.ChannelGrant:
        """Open a channel and return the agent-signed grant a session carries."""
        r = await self._call(agent, self._signed(EscrowOpen, provider=provider, cap=cap, expires_at=self.now() + ttl_s))
        return r.channels[0].channel

    async def claim(self, agent: str | None, receipt_hex: str) -> Settlement:
        """Be paid what a doubly-signed receipt proves, beyond what its session was paid already.

        A receipt already paid in full (this node's settlement worker claims on its own, at each
        session's end) is no refusal here: the answer pays 0 and says ``already_paid``, with the
        channel as its agent reports it.

        Raises:
            InvalidRequest: not a hex-encoded receipt.
            EscrowRefused, EscrowUnreachable: the agent said no (another reason), or could not be asked.
        """
        receipt = _decode_hex(receipt_hex, protocol.Receipt, "receipt", "receipt")
        agent = agent or receipt.agent
        try:
            r = await self._call(agent, self._signed(EscrowClaim, receipt=receipt))
        except EscrowRefused as exc:
            if exc.code != "already_claimed":
                raise
            return Settlement(await self.channel(agent, receipt.channel_id.hex()), 0, already_paid=True)
        return Settlement(ChannelInfo(r.channels[0]), r.paid)

    async def refund(self, agent: str | None, channel_id: str) -> Settlement:
        r = await self._call(agent, self._signed(EscrowRefund, channel_id=_hex_id(channel_id, "channel id",
                                                                                  "channel_id")))
        return Settlement(ChannelInfo(r.channels[0]))

    async def close(self, agent: str | None, channel_id: str, receipt_hex: str | None, partial_hex: str | None,
                    sign_only: bool) -> CloseHalf | Settlement:
        """A cooperative close: ``sign_only`` returns this party's half for the other party; with
        ``partial_hex`` (the other half) it adds this party's signature and submits.

        Raises:
            InvalidRequest: this node is no party of the channel; a malformed or mismatched half.
            EscrowRefused, EscrowUnreachable: the agent said no, or could not be asked.
        """
        cid = _hex_id(channel_id, "channel id", "channel_id")
        grant = (await self.channel(agent, channel_id)).grant
        me = self.identity.peer_id
        role = "consumer_sig" if grant.consumer == me else "provider_sig" if grant.provider == me else None
        if role is None:
            raise InvalidRequest("this node is not a party of that channel", "channel_id")
        if partial_hex:
            msg = _decode_hex(partial_hex, EscrowClose, "the other party's close", "partial")
            if msg.channel_id != cid:
                raise InvalidRequest("that close is for another channel", "partial")
        else:
            receipt = _decode_hex(receipt_hex, protocol.Receipt, "receipt", "receipt") if receipt_hex else None
            msg = EscrowClose(request_id=secrets.token_bytes(16), channel_id=cid, receipt=receipt, issued_at=self.now())
        msg = protocol.sign(msg, role, self.identity)
        if sign_only:
            return CloseHalf(msg)
        if not partial_hex:
            raise InvalidRequest("a cooperative close needs both parties: sign with --sign-only and have the other "
                                 "party submit with --with FILE", "partial")
        r = await self._call(agent, msg)
        return Settlement(ChannelInfo(r.channels[0]), r.paid)

    async def budget_create(self, agent: str | None, amount: int, whitelist: list[str], per_session_limit: int,
                            ttl_s: int) -> BudgetInfo:
        r = await self._call(agent, self._signed(EscrowBudgetCreate, amount=amount, whitelist=tuple(whitelist),
                                                 per_session_limit=per_session_limit, expires_at=self.now() + ttl_s))
        return BudgetInfo(r.budgets[0])

    async def budget_refund(self, agent: str | None, budget_id: str) -> BudgetInfo:
        r = await self._call(agent, self._signed(EscrowBudgetRefund, budget_id=_hex_id(budget_id, "budget id",
                                                                                       "budget_id")))
        return BudgetInfo(r.budgets[0])
