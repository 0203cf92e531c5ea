"""The node's settings: ``config.toml`` in the home, read at start and edited by the daemon
when offers change (comments and layout are kept by tomlkit).

Rules: money in the file is integer micro-credits (``input_price = 500000`` is 0.50 credits
per 1K tokens); every value is checked when read and a wrong one is a ``ConfigError`` naming
the key; the file is replaced atomically and stays mode 0600.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import tomlkit

import protocol

from ._contracts import Contract, parse_contracts
from ._home import ConfigError
from .provider._health import HealthConfig, parse_health
from .provider._offers import Offer
from .provider._pricing_models import DynamicPricing, parse_dynamic
from .provider._schedule import Schedule, parse_schedule
from .provider._sla import SlaConfig, parse_sla

__all__ = ["NodeConfig", "load_config", "save_offers"]

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
    claim_margin_s: int = 30  # [node] claim_margin_s: claim everything this long before a channel expires


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
        claim_margin_s=_claim_margin(path, node.get("claim_margin_s", NodeConfig.claim_margin_s)),
    )


def _claim_margin(path: Path, value: Any) -> int:
    """Seconds before a channel's expiry by which everything owed on it is claimed: 5 to 100 (a
    channel is admitted with at least 120 s to live, and no call starts inside the margin)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 5 <= value <= 100:
        raise ConfigError(f"{path}: [node] claim_margin_s must be a whole number of seconds from 5 to 100")
    return value


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
