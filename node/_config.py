"""The node's settings: ``config.toml`` in the home, read at start and edited by the daemon
when offers change (comments and layout are kept by tomlkit).

Rules: money in the file is integer micro-credits (``input_price = 500000`` is 0.50 credits
per 1K tokens); every value is checked when read and a wrong one is a ``ConfigError`` naming
the key; the file is replaced atomically and stays mode 0600.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable

import tomlkit

import protocol

from ._contracts import Contract, parse_contracts
from ._health import HealthConfig, parse_health
from ._home import ConfigError
from ._pricing_models import DynamicPricing, parse_dynamic
from ._schedule import Schedule, parse_schedule
from ._sla import SlaConfig, parse_sla

__all__ = ["Offer", "NodeConfig", "load_config", "save_offers", "parse_backend"]

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


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    api: str = "127.0.0.1:0"
    accept_escrow: tuple[str, ...] = ()
    offers: tuple[Offer, ...] = ()
    schedule: Schedule = Schedule()
    health: HealthConfig = HealthConfig()
    dynamic_pricing: DynamicPricing | None = None
    sla: SlaConfig = SlaConfig()
    contracts: tuple[Contract, ...] = ()  # as a provider (entries name a client) …
    client_contracts: tuple[Contract, ...] = ()  # … and as a client (entries name a provider)


def _strings(node: dict[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = node.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"[node] {key} must be a list of strings")
    return tuple(value)


def _section(path: Path, name: str, parse: Callable[..., Any], *args: Any) -> Any:
    """Parse one table of the config; a bad value becomes a ConfigError naming the table."""
    try:
        return parse(*args)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: {name}: {exc}") from exc


def load_config(path: Path) -> NodeConfig:
    """Read and check ``config.toml`` (defaults where it is absent).

    Raises:
        ConfigError: unreadable TOML or a value of the wrong shape, naming the key.
    """
    try:
        data = tomlkit.parse(path.read_text(encoding="utf-8")).unwrap()
    except FileNotFoundError:
        return NodeConfig()
    except (tomlkit.exceptions.ParseError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    node = data.get("node", {})
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: [node] must be a table")
    api = node.get("api", "127.0.0.1:0")
    if not isinstance(api, str):
        raise ConfigError(f"{path}: [node] api must be HOST:PORT")
    offers = []
    for i, raw in enumerate(data.get("offers", [])):
        try:
            offers.append(Offer(**raw))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: [[offers]] #{i + 1}: {exc}") from exc
    for escrow in _strings(node, "accept_escrow", ()):
        try:
            protocol.public_key_from_peer_id(escrow)
        except protocol.WrongFieldType as exc:
            raise ConfigError(f"{path}: [node] accept_escrow: {exc}") from exc
    pricing = data.get("pricing") or {}
    raw_contracts = data.get("contracts", [])
    schedule = _section(path, "[schedule]", parse_schedule, data.get("schedule"))
    health = _section(path, "[health]", parse_health, data.get("health"))
    dynamic = _section(path, "[pricing.dynamic]", parse_dynamic,
                       pricing.get("dynamic") if isinstance(pricing, dict) else None)
    contracts = _section(path, "[[contracts]]", parse_contracts, [c for c in raw_contracts if "client" in c],
                         "provider")
    client_contracts = _section(path, "[[contracts]]", parse_contracts,
                                [c for c in raw_contracts if "client" not in c], "client")
    sla = _section(path, "[sla]", parse_sla, data.get("sla"))
    return NodeConfig(
        sla=sla,
        contracts=contracts,
        client_contracts=client_contracts,
        schedule=schedule,
        health=health,
        dynamic_pricing=dynamic,
        listen=_strings(node, "listen", NodeConfig.listen),
        bootstrap=_strings(node, "bootstrap", ()),
        api=api,
        accept_escrow=_strings(node, "accept_escrow", ()),
        offers=tuple(offers),
    )


def save_offers(path: Path, offers: tuple[Offer, ...]) -> None:
    """Replace the ``[[offers]]`` of ``config.toml``, keeping everything else as written."""
    try:
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        doc = tomlkit.document()
    table = tomlkit.aot()
    for offer in offers:
        table.append(tomlkit.item(offer.to_json()))
    if "offers" in doc:
        del doc["offers"]
    if offers:
        doc["offers"] = table
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(tomlkit.dumps(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
