"""The node's settings: ``config.toml`` in the home, read at start and edited by the daemon
when offers change (comments and layout are kept by tomlkit).

Rules: money in the file is integer micro-credits (``input_price = 500000`` is 0.50 credits
per 1K tokens); every value is checked when read and a wrong one is a ``ConfigError`` naming
the file, the line, the key and what it must be (``config.toml:14: [health] interval_s must be a
number, not 'x'``); a table or key the node does not know is an error too (a typo would otherwise
be ignored in silence); the file is replaced atomically and stays mode 0600.

The shape (tables, keys, types) is checked here, from the dataclasses the sections parse into;
each section's parser checks the values' ranges and meanings.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import types
import typing
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
from .verify._spot import SPOT_CHECK_KEYS, SpotCheckConfig, parse_spot_checks

__all__ = ["NodeConfig", "load_config", "save_accept_escrow", "save_offers", "check_announce_addr"]

#: the top-level tables config.toml may hold, and the keys of [node]
_TABLES = ("node", "offers", "schedule", "health", "pricing", "sla", "contracts", "spot_checks")
_NODE_KEYS = ("listen", "bootstrap", "api", "accept_escrow", "claim_margin_s", "announce", "relay", "standing_idle_s",
              "chain", "x402")
#: the keys of the tables that do not parse straight into a dataclass, with their types
_SCHEDULE_KEYS: dict[str, Any] = {"timezone": str, "hours": dict, "maintenance": list}
_CONTRACT_KEYS: dict[str, Any] = {"client": str, "provider": str, "model": str, "input_price": int,
                                  "output_price": int, "until": (str, datetime.datetime), "reserved_slots": int}

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
    announce: tuple[str, ...] = ()  # [node] announce: addresses published first (a port forwarded by hand, a DNS name)
    relay: bool = False  # [node] relay: also relay circuits for peers behind NAT (public nodes only)
    # [node] standing_idle_s: a one-shot call's session (and channel) stays open this long for the next (0: off)
    standing_idle_s: int = 5
    chain: str = ""  # [node] chain: evm:embedded or evm:URL#ESCROW, the chain this node pays and is paid on ("": none)
    x402: bool = False  # [node] x402: the OpenAI API serves callers without the token who pay each request (x402)
    spot_checks: SpotCheckConfig = SpotCheckConfig()  # [spot_checks]: re-running sampled calls


class _Where:
    """Where a table or key is in the file, as ``PATH:LINE`` (best effort: ``PATH`` where the
    line cannot be told, e.g. a key of an inline table)."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\s\"']+?)\s*\]\]?")

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def __call__(self, table: str, key: str | None = None, index: int = 0) -> str:
        start, seen = None, -1
        for n, line in enumerate(self.lines):
            m = self._HEADER.match(line)
            if m and m.group(2).replace(" ", "") == table:
                seen += 1
                if seen == index:
                    start = n
                    break
        if start is None:
            return str(self.path)
        if key is None:
            return f"{self.path}:{start + 1}"
        for n in range(start + 1, len(self.lines)):
            if self._HEADER.match(self.lines[n]):
                break
            if re.match(rf"^\s*{re.escape(key)}\s*=", self.lines[n]):
                return f"{self.path}:{n + 1}"
        return f"{self.path}:{start + 1}"


_KINDS: dict[Any, str] = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
                          list: "a list", tuple: "a list", dict: "a table", datetime.datetime: "a date and time"}


def _fits(value: Any, kind: Any) -> bool:
    """Whether a TOML value fits a field's type (int for float is fine; bool is never a number)."""
    if isinstance(kind, tuple):
        return any(_fits(value, k) for k in kind)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, list)
    return isinstance(value, kind)


def _kind_of(hint: Any) -> Any:
    """The plain type a dataclass field's hint asks of a TOML value (None: not checked here)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        return _kind_of(kinds[0]) if len(kinds) == 1 else None
    if origin in (tuple, list, dict):
        return origin
    return hint if hint in _KINDS else None


def _describe(kind: Any) -> str:
    return " or ".join(_KINDS[k] for k in kind) if isinstance(kind, tuple) else _KINDS[kind]


def _check_table(where: _Where, name: str, raw: Any, keys: dict[str, Any], required: tuple[str, ...] = (),
                 index: int = 0, label: str | None = None) -> dict[str, Any]:
    """``raw`` as a table of the config whose keys and their types are ``keys``.

    Raises:
        ConfigError: not a table, a key it may not hold, a required key missing, a value of
            the wrong type: naming the file, the line and the key.
    """
    label = label or f"[{name}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(name, index=index)}: {label} must be a table")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ConfigError(f"{where(name, unknown[0], index)}: {label} has no key {unknown[0]!r} "
                          f"(its keys: {', '.join(keys)})")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{where(name, index=index)}: {label} needs {', '.join(missing)}")
    for key, value in raw.items():
        kind = keys[key]
        if kind is not None and not _fits(value, kind):
            raise ConfigError(f"{where(name, key, index)}: {label} {key} must be {_describe(kind)}, not {value!r}")
    return raw


def _dataclass_keys(cls: type) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A dataclass's fields as ``_check_table`` keys (their TOML types), and its required ones."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = tuple(f.name for f in fields
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return {f.name: _kind_of(hints[f.name]) for f in fields}, required


def _array_of_tables(where: _Where, name: str, raw: Any) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where.path}: {name} must be an array of tables ([[{name}]])")
    return raw


def _strings(where: _Where, node: dict[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = node.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where('node', key)}: [node] {key} must be a list of strings, not {value!r}")
    return tuple(value)


def _section(where: _Where, name: str, parse: Callable[..., Any], *args: Any) -> Any:
    """Parse one table of the config; a bad value becomes a ConfigError naming the table."""
    try:
        return parse(*args)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where(name.strip('[]'))}: {name}: {exc}") from exc


def load_config(path: Path) -> NodeConfig:
    """Read and check ``config.toml`` (defaults where it is absent).

    Raises:
        ConfigError: unreadable TOML or a value of the wrong shape, naming the key.
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = tomlkit.parse(text).unwrap()
    except FileNotFoundError:
        return NodeConfig()
    except (tomlkit.exceptions.ParseError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    where = _Where(path, text)
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise ConfigError(f"{where(unknown[0])}: no table or key {unknown[0]!r} in a config "
                          f"(its tables: {', '.join(_TABLES)})")
    node = _check_table(where, "node", data.get("node", {}), dict.fromkeys(_NODE_KEYS))
    api = node.get("api", "127.0.0.1:0")
    if not isinstance(api, str):
        raise ConfigError(f"{where('node', 'api')}: [node] api must be HOST:PORT, not {api!r}")
    offer_keys, offer_required = _dataclass_keys(Offer)
    offers = []
    for i, raw in enumerate(_array_of_tables(where, "offers", data.get("offers"))):
        label = f"[[offers]] #{i + 1}"
        _check_table(where, "offers", raw, offer_keys, offer_required, i, label)
        try:
            offers.append(Offer(**raw))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where('offers', index=i)}: {label}: {exc}") from exc
    for escrow in _strings(where, node, "accept_escrow", ()):
        try:
            protocol.public_key_from_peer_id(escrow)
        except protocol.WrongFieldType as exc:
            raise ConfigError(f"{where('node', 'accept_escrow')}: [node] accept_escrow: {exc}") from exc
    announce = _strings(where, node, "announce", ())
    for addr in announce:
        try:
            check_announce_addr(addr)
        except ValueError as exc:
            raise ConfigError(f"{where('node', 'announce')}: [node] announce: {exc}") from exc
    relay = node.get("relay", False)
    if not isinstance(relay, bool):
        raise ConfigError(f"{where('node', 'relay')}: [node] relay must be true or false, not {relay!r}")
    chain, x402 = _chain(where, node.get("chain", ""), node.get("x402", False))
    pricing = _check_table(where, "pricing", data.get("pricing") or {}, {"dynamic": dict})
    raw_contracts = _array_of_tables(where, "contracts", data.get("contracts"))
    for i, raw in enumerate(raw_contracts):
        _check_table(where, "contracts", raw, _CONTRACT_KEYS, ("model", "input_price", "output_price", "until"), i,
                     f"[[contracts]] #{i + 1}")
    if data.get("schedule") is not None:
        _check_table(where, "schedule", data["schedule"], _SCHEDULE_KEYS)
    for name, cls in (("health", HealthConfig), ("sla", SlaConfig)):
        if data.get(name) is not None:
            _check_table(where, name, data[name], _dataclass_keys(cls)[0])
    if pricing.get("dynamic") is not None:
        _check_table(where, "pricing.dynamic", pricing["dynamic"], _dataclass_keys(DynamicPricing)[0],
                     label="[pricing.dynamic]")
    schedule = _section(where, "[schedule]", parse_schedule, data.get("schedule"))
    health = _section(where, "[health]", parse_health, data.get("health"))
    dynamic = _section(where, "[pricing.dynamic]", parse_dynamic, pricing.get("dynamic"))
    contracts = _section(where, "[[contracts]]", parse_contracts, [c for c in raw_contracts if "client" in c],
                         "provider")
    client_contracts = _section(where, "[[contracts]]", parse_contracts,
                                [c for c in raw_contracts if "client" not in c], "client")
    sla = _section(where, "[sla]", parse_sla, data.get("sla"))
    if data.get("spot_checks") is not None:
        _check_table(where, "spot_checks", data["spot_checks"], SPOT_CHECK_KEYS)
    spot_checks = _section(where, "[spot_checks]", parse_spot_checks, data.get("spot_checks"))
    return NodeConfig(
        spot_checks=spot_checks,
        sla=sla,
        contracts=contracts,
        client_contracts=client_contracts,
        schedule=schedule,
        health=health,
        dynamic_pricing=dynamic,
        listen=_strings(where, node, "listen", NodeConfig.listen),
        bootstrap=_strings(where, node, "bootstrap", ()),
        api=api,
        accept_escrow=_strings(where, node, "accept_escrow", ()),
        offers=tuple(offers),
        claim_margin_s=_claim_margin(where, node.get("claim_margin_s", NodeConfig.claim_margin_s)),
        standing_idle_s=_standing_idle(where, node.get("standing_idle_s", NodeConfig.standing_idle_s)),
        announce=announce,
        relay=relay,
        chain=chain,
        x402=x402,
    )


def check_announce_addr(text: str) -> str:
    """An address to announce: TCP on an IP or a DNS name (``/ip4/203.0.113.7/tcp/4001``,
    ``/dns4/gpu.example.org/tcp/4001``), never an unspecified IP (0.0.0.0, ::).

    Raises:
        ValueError: anything else, naming it.
    """
    import ipaddress

    import multiaddr

    example = "e.g. /ip4/203.0.113.7/tcp/4001 or /dns4/host.example.org/tcp/4001"
    try:
        names = [p.name for p in multiaddr.Multiaddr(text).protocols()]
    except Exception as exc:  # multiaddr raises several unrelated types
        raise ValueError(f"not an address to announce ({example}): {text!r}") from exc
    if names not in (["ip4", "tcp"], ["ip6", "tcp"], ["dns", "tcp"], ["dns4", "tcp"], ["dns6", "tcp"]):
        raise ValueError(f"not an address to announce ({example}; TCP on an IP or DNS name, no /p2p/): {text!r}")
    if names[0] in ("ip4", "ip6") and ipaddress.ip_address(text.split("/")[2]).is_unspecified:
        raise ValueError(f"{text!r} is no address a peer can dial (0.0.0.0 and :: mean 'every interface' "
                         f"only to a listener; {example})")
    return text


def _claim_margin(where: _Where, value: Any) -> int:
    """Seconds before a channel's expiry by which everything owed on it is claimed: 5 to 100 (a
    channel is admitted with at least 120 s to live, and no call starts inside the margin)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 5 <= value <= 100:
        raise ConfigError(f"{where('node', 'claim_margin_s')}: [node] claim_margin_s must be a whole number of seconds from 5 to 100")
    return value


def _chain(where: _Where, chain: Any, x402: Any) -> tuple[str, bool]:
    """``[node] chain`` (``evm:embedded`` or ``evm:URL#ESCROW``) and ``[node] x402`` (which needs a chain)."""
    from .chain import parse_chain_spec

    if not isinstance(chain, str):
        raise ConfigError(f"{where('node', 'chain')}: [node] chain must be a string, not {chain!r}")
    if chain:
        try:
            parse_chain_spec(chain)
        except ValueError as exc:
            raise ConfigError(f"{where('node', 'chain')}: [node] chain: {exc}") from exc
    if not isinstance(x402, bool):
        raise ConfigError(f"{where('node', 'x402')}: [node] x402 must be true or false, not {x402!r}")
    if x402 and not chain:
        raise ConfigError(f"{where('node', 'x402')}: [node] x402 takes payments on a chain: set [node] chain too "
                          "(evm:embedded, or evm:URL#ESCROW)")
    return chain, x402


def _standing_idle(where: _Where, value: Any) -> int:
    """Seconds a one-shot call's session waits open for the next call (``consumer/_standing.py``):
    0 (every call opens and settles its own channel) to 120 (well inside a provider's idle limit)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 120:
        raise ConfigError(f"{where('node', 'standing_idle_s')}: [node] standing_idle_s must be a whole number of "
                          "seconds from 0 (off) to 120")
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
    _write_doc(path, doc)


def save_accept_escrow(path: Path, agents: tuple[str, ...]) -> None:
    """Set ``[node] accept_escrow`` in ``config.toml`` (``node escrow accept``), keeping everything
    else — comments included — as written; an empty tuple empties the list."""
    try:
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        doc = tomlkit.document()
    node = doc.get("node")
    if node is None:
        node = doc["node"] = tomlkit.table()
    node["accept_escrow"] = list(agents)
    _write_doc(path, doc)


def _write_doc(path: Path, doc: Any) -> None:
    """Write ``doc`` to ``path`` atomically (a synced temporary file renamed over it), mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(tomlkit.dumps(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
