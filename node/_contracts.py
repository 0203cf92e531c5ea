"""Fixed-rate contracts and reserved capacity for named clients.

Agreed off the network and written on both sides, so neither publishes the terms:

    # the provider's config.toml                    # the client's config.toml
    [[contracts]]                                   [[contracts]]
    client = "12D3KooW…"    # the consumer           provider = "12D3KooW…"
    model = "tiny"                                   model = "tiny"
    input_price = 100000    # µc per 1K tokens       input_price = 100000
    output_price = 300000                            output_price = 300000
    until = "2027-01-01T00:00:00+00:00"              until = "2027-01-01T00:00:00+00:00"
    reserved_slots = 2      # sessions only this client may use

Until ``until``, the client's sessions of ``model`` are priced at the contract rate (pinned at
accept like any price) and may use the reserved slots; every other consumer sees the model's
capacity less the slots reserved by contracts in force.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import protocol

__all__ = ["Contract", "parse_contracts", "active_contract", "reserved_slots"]


@dataclasses.dataclass(frozen=True)
class Contract:
    peer: str  # the other party: the client on a provider, the provider on a client
    model: str
    price: protocol.Price
    until: dt.datetime
    reserved_slots: int = 0

    def in_force(self, now: dt.datetime) -> bool:
        return now < self.until


def parse_contracts(raw: list[dict[str, Any]] | None, side: str) -> tuple[Contract, ...]:
    """``[[contracts]]`` entries; ``side`` is "provider" (entries name a ``client``) or "client".

    Raises:
        ValueError: a missing or malformed field.
    """
    out = []
    key = "client" if side == "provider" else "provider"
    for i, c in enumerate(raw or []):
        try:
            peer = str(c[key])
            protocol.public_key_from_peer_id(peer)
            until = dt.datetime.fromisoformat(str(c["until"]))
            price = protocol.Price(input_per_1k=c["input_price"], output_per_1k=c["output_price"])
            slots = c.get("reserved_slots", 0)
            if until.tzinfo is None or type(slots) is not int or slots < 0:
                raise ValueError("until needs an offset; reserved_slots is a non-negative integer")
            if type(price.input_per_1k) is not int or type(price.output_per_1k) is not int:
                raise ValueError("prices are integers of micro-credits")
            protocol.encode(protocol.Reject(session_id=bytes(16), reason="bad_request", detail=str(c["model"])[:1]))
            if not 0 <= price.input_per_1k <= 10**12 or not 0 <= price.output_per_1k <= 10**12:
                raise ValueError("prices are out of range")
            out.append(Contract(peer, str(c["model"]), price, until, slots))
        except (KeyError, TypeError, ValueError, protocol.ProtocolError) as exc:
            raise ValueError(f"contract #{i + 1}: {exc}") from exc
    return tuple(out)


def active_contract(contracts: tuple[Contract, ...], peer: str, model: str, now: dt.datetime) -> Contract | None:
    return next((c for c in contracts if c.peer == peer and c.model == model and c.in_force(now)), None)


def reserved_slots(contracts: tuple[Contract, ...], model: str, now: dt.datetime, except_peer: str = "") -> int:
    """Slots of ``model`` held for clients (other than ``except_peer``) by contracts in force."""
    return sum(c.reserved_slots for c in contracts if c.model == model and c.in_force(now) and c.peer != except_peer)
