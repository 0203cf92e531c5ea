"""Building signed escrow requests and doubly-signed receipts for tests."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import protocol
from tests.support import identity
from wallet import EscrowAgent, Identity, Ledger

AGENT = identity("escrow-agent")
_ids = itertools.count(1)


def rid() -> bytes:
    return next(_ids).to_bytes(16, "big")


def signed(cls: type, who: Identity, now: int, **fields: Any) -> Any:
    msg = cls(request_id=fields.pop("request_id", None) or rid(), party=who.peer_id, issued_at=now, **fields)
    return protocol.sign(msg, "sig", who)


def receipt(channel: protocol.ChannelGrant, consumer: Identity, provider: Identity, cumulative: int,
            session: bytes = b"S" * 16, call_seq: int = 0, sign_consumer: bool = True,
            agent: str | None = None) -> protocol.Receipt:
    r = protocol.Receipt(
        session_id=session, call_seq=call_seq, model="tiny", provider=provider.peer_id, consumer=consumer.peer_id,
        agent=agent or channel.agent, channel_id=channel.channel_id, input_hash=b"i" * 32, output_hash=b"o" * 32,
        tokens_in=1, tokens_out=1, finish_reason="stop", price=protocol.Price(input_per_1k=0, output_per_1k=0),
        cost=cumulative, cumulative=cumulative, prev_hash=protocol.ZERO_HASH, issued_at=0,
    )
    r = protocol.sign(r, "provider_sig", provider)
    return protocol.sign(r, "consumer_sig", consumer) if sign_consumer else r


def close_request(channel_id: bytes, consumer: Identity, provider: Identity, now: int,
                  final: protocol.Receipt | None = None) -> protocol.EscrowClose:
    msg = protocol.EscrowClose(request_id=rid(), channel_id=channel_id, receipt=final, issued_at=now)
    msg = protocol.sign(msg, "consumer_sig", consumer)
    return protocol.sign(msg, "provider_sig", provider)


def new_agent(tmp_path) -> EscrowAgent:
    return EscrowAgent(Ledger(tmp_path / "escrow.db"), AGENT)


def snapshot(agent: EscrowAgent) -> Any:
    """Everything a refused request must leave unchanged."""
    with agent.ledger.reading() as db:
        return (
            db.execute("SELECT name, balance FROM accounts ORDER BY name").fetchall(),
            db.execute("SELECT channel_id, cap, expires_at, claimed, status FROM channels ORDER BY channel_id").fetchall(),
            db.execute("SELECT * FROM channel_sessions ORDER BY channel_id, session_id").fetchall(),
            db.execute("SELECT budget_id, status FROM budgets ORDER BY budget_id").fetchall(),
            db.execute("SELECT COUNT(*) FROM entries").fetchall(),
        )


def ok(response: protocol.EscrowResponse) -> protocol.EscrowResponse:
    assert response.ok, f"{response.error}: {response.detail}"
    protocol.verify(response, "sig", AGENT.public_key)
    return response


def replace_sig(msg: Any, who: Identity) -> Any:
    return protocol.sign(dataclasses.replace(msg, sig=b""), "sig", who)
