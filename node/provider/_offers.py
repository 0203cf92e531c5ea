"""An offer: one model this node sells, as the operator configured it, and how it becomes the
``protocol.ModelOffer`` a listing carries. Checked when built, so a bad offer never reaches
the wire or the config file.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import protocol

__all__ = ["Offer", "parse_backend"]

_BACKEND = re.compile(r"^(builtin|transformers:.+|openai:https?://[^#\s]+(#[A-Za-z0-9_.-]+)?|llamacpp:.+)$")


def parse_backend(spec: str) -> str:
    """Check a backend SPEC (builtin | transformers:PATH | openai:BASE_URL[#KEYNAME] | llamacpp:PATH).

    Raises:
        ValueError: not one of those forms.
    """
    if not _BACKEND.match(spec):
        raise ValueError(
            f"backend {spec!r} is not one of: builtin, transformers:PATH, openai:BASE_URL[#KEYNAME], llamacpp:PATH"
        )
    return spec


@dataclasses.dataclass(frozen=True)
class Offer:
    """One model this node sells, as the operator configured it (prices in µc per 1K tokens)."""

    model: str
    backend: str
    input_price: int
    output_price: int
    max_context: int = 4096
    min_charge: int = 0
    rate_limit: int = 0  # requests per minute per consumer; 0: no limit
    max_concurrent: int = 4
    # tiers: [{name: basic|premium|enterprise, input_price, output_price, max_concurrent, priority}]
    tiers: tuple[dict[str, Any], ...] = ()
    batch_min_calls: int = 0
    batch_discount_permille: int = 0

    def __post_init__(self) -> None:
        if not self.model or len(self.model.encode()) > 128:
            raise ValueError("a model name is 1 to 128 bytes")
        parse_backend(self.backend)
        for name in ("input_price", "output_price", "max_context", "min_charge", "rate_limit", "max_concurrent",
                     "batch_min_calls", "batch_discount_permille"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_context < 1 or self.max_concurrent < 1:
            raise ValueError("max_context and max_concurrent are at least 1")
        if self.batch_discount_permille > 1000 or self.batch_min_calls < 0:
            raise ValueError("batch_discount_permille is 0..1000")
        object.__setattr__(self, "tiers", tuple(dict(t) for t in self.tiers))
        try:
            self.to_model_offer()
        except (KeyError, TypeError, protocol.ProtocolError) as exc:
            raise ValueError(f"tiers need name, input_price, output_price, max_concurrent (priority): {exc}") from exc

    def to_model_offer(self) -> protocol.ModelOffer:
        tiers = tuple(
            protocol.Tier(name=t["name"], price=protocol.Price(input_per_1k=t["input_price"],
                                                               output_per_1k=t["output_price"],
                                                               min_charge=self.min_charge),
                          max_concurrent=t["max_concurrent"], priority=t.get("priority", 1))
            for t in self.tiers)
        offer = protocol.ModelOffer(
            name=self.model,
            price=protocol.Price(
                input_per_1k=self.input_price, output_per_1k=self.output_price, min_charge=self.min_charge
            ),
            max_context=self.max_context,
            rate_limit_rpm=self.rate_limit,
            max_concurrent=self.max_concurrent,
            tiers=tiers,
            batch_min_calls=self.batch_min_calls,
            batch_discount_permille=self.batch_discount_permille,
        )
        protocol.encode(protocol.Listing(provider=protocol.peer_id_from_public_key(bytes(32)), addrs=(), seq=0,
                                         issued_at=0, expires_at=1, provider_type="self_hosted", models=(offer,),
                                         escrow_agents=(), hardware=protocol.Hardware()))  # every field in range
        return offer

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["tiers"] = [dict(t) for t in self.tiers]
        return doc
