"""An offer: one model this node sells, as the operator configured it, and how it becomes the
``protocol.ModelOffer`` a listing carries. Checked when built, so a bad offer never reaches
the wire or the config file.

Features (``protocol.FEATURES``): an offer may declare what it serves (``features``; empty: the
backend's own claim, ``default_features``); the listing says what the loaded backend serves
(``Storefront.features``). An embeddings offer (``embeddings:builtin``, ``embeddings:PATH``, or an
``openai:`` one declaring ``embeddings``) serves nothing else, and a chat backend never claims
embeddings. An embeddings offer is priced per 1K input tokens; its output price may be 0.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import protocol

__all__ = ["Offer", "parse_backend", "parse_features", "default_features", "LOCAL_CHAT_FEATURES"]

_BACKEND = re.compile(
    r"^(builtin|transformers:.+|openai:https?://[^#\s]+(#[A-Za-z0-9_.-]+)?|llamacpp:.+|embeddings:.+)$")
BACKENDS = "builtin, transformers:PATH, openai:BASE_URL[#KEYNAME], llamacpp:PATH, embeddings:builtin, embeddings:PATH"
#: what a local chat model (builtin, transformers:) and an OpenAI upstream serve unless declared otherwise
LOCAL_CHAT_FEATURES = ("streaming", "tools", "json", "logprobs", "completions")
_LLAMACPP_FEATURES = ("streaming", "completions")
_EMBEDDINGS = ("embeddings",)


def parse_backend(spec: str) -> str:
    """Check a backend SPEC (builtin | transformers:PATH | openai:BASE_URL[#KEYNAME] | llamacpp:PATH |
    embeddings:builtin | embeddings:PATH).

    Raises:
        ValueError: not one of those forms.
    """
    if not _BACKEND.match(spec):
        raise ValueError(f"backend {spec!r} is not one of: {BACKENDS}")
    return spec


def parse_features(text: str) -> tuple[str, ...]:
    """``tools,json`` (the CLI's ``--features``) as a tuple of feature names, each checked.

    Raises:
        ValueError: a name not in ``protocol.FEATURES``.
    """
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    _check_features(names)
    return names


def _check_features(names: tuple[str, ...]) -> None:
    for name in names:
        if name not in protocol.FEATURES:
            raise ValueError(f"feature {name!r} is not one of: {', '.join(protocol.FEATURES)}")
    if len(set(names)) != len(names):
        raise ValueError("features names each feature once")


def default_features(backend: str) -> tuple[str, ...]:
    """What a backend SPEC serves when its offer declares nothing (before the backend says)."""
    if backend.startswith("embeddings:"):
        return _EMBEDDINGS
    if backend.startswith("llamacpp:"):
        return _LLAMACPP_FEATURES
    return LOCAL_CHAT_FEATURES


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
    # what it serves (protocol.FEATURES); empty: what the backend claims
    features: tuple[str, ...] = ()

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
        if isinstance(self.features, str) or not all(isinstance(f, str) for f in self.features):
            raise ValueError("features is a list of feature names")
        object.__setattr__(self, "features", tuple(self.features))
        _check_features(self.features)
        if self.kind == "embeddings" and set(self.features) - set(_EMBEDDINGS):
            raise ValueError("an embeddings offer serves only embeddings (sell chat in another offer)")
        if "embeddings" in self.features and not self.backend.startswith(("openai:", "embeddings:")):
            raise ValueError("only an embeddings: or openai: backend serves embeddings")
        try:
            self.to_model_offer()
        except (KeyError, TypeError, protocol.ProtocolError) as exc:
            raise ValueError(f"tiers need name, input_price, output_price, max_concurrent (priority): {exc}") from exc

    @property
    def kind(self) -> str:
        """"embeddings" (``embed`` calls only) or "chat"."""
        return "embeddings" if self.backend.startswith("embeddings:") or "embeddings" in self.features else "chat"

    def default_features(self) -> tuple[str, ...]:
        """What the listing says it serves before its backend is loaded: the declared ones, else
        what its kind of backend serves."""
        return self.features or default_features(self.backend)

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
            features=self.default_features(),
        )
        protocol.encode(protocol.Listing(provider=protocol.peer_id_from_public_key(bytes(32)), addrs=(), seq=0,
                                         issued_at=0, expires_at=1, provider_type="self_hosted", models=(offer,),
                                         escrow_agents=(), hardware=protocol.Hardware()))  # every field in range
        return offer

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["tiers"] = [dict(t) for t in self.tiers]
        if self.features:
            doc["features"] = list(self.features)
        else:  # an offer that declares nothing keeps the config it always had
            del doc["features"]
        return doc
