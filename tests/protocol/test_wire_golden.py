"""Wire stability: the field maps registered today are version 1, and they are frozen.

Two goldens sit beside this file, both checked in and both recomputed from the code here:

- ``wire_v1.json``: every registered (kind, version), sorted, with its wire fields in wire
  order (name, wire type with every bound, constructor default), its signature fields and
  their domain tags. Nested records are spelled out in place (a record's Python name is not on
  the wire, its field map is); a nested message is named by kind and version.
- ``wire_v1_bytes.json``: the canonical encoding, in hex, of one fixed example of each
  (kind, version), signed with a fixed key, so a change in the encoder or in the signing
  domain is caught even where no field map changed.

An entry may be added, never edited or dropped: a different field map is a new version,
registered beside the old one. To add the entries of a newly registered (kind, version), run
from the repository root::

    .venv/bin/python -m tests.protocol.test_wire_golden --write

It refuses to change or drop an existing entry. ``--doc-table`` prints the table of message
kinds that docs/PROTOCOL.md carries. The tests themselves never write.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import protocol
from protocol import _codec
from tests.support import identity

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MAPS = HERE / "wire_v1.json"
BYTES = HERE / "wire_v1_bytes.json"
DOC = ROOT / "docs" / "PROTOCOL.md"
REGENERATE = ".venv/bin/python -m tests.protocol.test_wire_golden --write"
FROZEN = "a registered wire map changed: add a new version instead of editing v1"
KEY = identity("wire-golden")  # signs the byte examples; Ed25519 signatures are deterministic

KindVersion = tuple[str, int]

# ---- describing the code's field maps -------------------------------------------------------

_TYPE_NAMES: dict[type, str] = {
    _codec.UInt: "uint",
    _codec.Str: "str",
    _codec.Bytes: "bytes",
    _codec.Bool: "bool",
    _codec.PeerId: "peer_id",
    _codec.ListOf: "list",
    _codec.Optional: "optional",
    _codec.Nested: "nested",
}


def registered() -> dict[KindVersion, type]:
    """Every registered message class by (kind, version)."""
    return {(kind, v): cls for kind, versions in _codec._REGISTRY.items() for v, cls in versions.items()}


def signature_fields(cls: type) -> list[str]:
    """A message's signature fields in wire order (the order given to ``@message`` is not on the wire)."""
    return [name for name, _ in cls._WIRE if name in cls.SIGNATURES]


def describe_type(kind: _codec.WireType) -> dict[str, Any]:
    """A wire type as JSON: its name and every parameter it is declared with (bounds included)."""
    name = _TYPE_NAMES.get(type(kind))
    if name is None:
        raise TypeError(f"{type(kind).__name__} is a wire type the golden cannot describe: teach describe_type")
    out: dict[str, Any] = {"type": name}
    for f in dataclasses.fields(kind):
        value = getattr(kind, f.name)
        if isinstance(kind, _codec.Nested) and f.name == "cls":
            if hasattr(value, "KIND"):  # a message nested as its body, signatures included
                out.update(message=value.KIND, v=value.VERSION)
            else:
                out["fields"] = describe_fields(value)
        elif isinstance(value, _codec.WireType):
            out[f.name] = describe_type(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif value is None or type(value) in (int, str, bool):
            out[f.name] = value
        else:
            raise TypeError(f"{type(kind).__name__}.{f.name}: {value!r} has no JSON form: teach describe_type")
    return out


def _default_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, tuple):
        return [_default_json(v) for v in value]
    if value is None or type(value) in (int, str, bool):
        return value
    raise TypeError(f"default {value!r} has no JSON form: teach _default_json")


def describe_fields(cls: type) -> list[dict[str, Any]]:
    """A message's or record's fields in wire order."""
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for name, kind in cls._WIRE:
        entry: dict[str, Any] = {"name": name, "type": describe_type(kind)}
        f = defaults[name]
        if f.default is not dataclasses.MISSING:
            entry["default"] = _default_json(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            entry["default"] = _default_json(f.default_factory())
        out.append(entry)
    return out


def describe_message(cls: type) -> dict[str, Any]:
    """One (kind, version) entry of ``wire_v1.json``."""
    return {
        "kind": cls.KIND,
        "v": cls.VERSION,
        "signatures": [
            {"field": name, "domain_tag": protocol.domain_tag(cls, name).decode()} for name in signature_fields(cls)
        ],
        "fields": describe_fields(cls),
    }


def current_maps() -> dict[KindVersion, dict[str, Any]]:
    """Every registered field map, as the golden holds it (through JSON, so types compare alike)."""
    return {key: json.loads(json.dumps(describe_message(cls))) for key, cls in registered().items()}


# ---- one fixed example of each kind -------------------------------------------------------

_UINTS = (0, 7, 200, 60_000, 4_000_000_000, (1 << 64) - 1)  # one of each msgpack integer width


def _example_value(kind: _codec.WireType, name: str, i: int, depth: int) -> Any:
    if isinstance(kind, _codec.UInt):
        return min(_UINTS[i % len(_UINTS)], kind.max)
    if isinstance(kind, _codec.Str):
        if kind.choices:
            return kind.choices[i % len(kind.choices)]
        text = f"{name}-µ"
        return text if len(text.encode()) <= kind.max_bytes else "x" * max(kind.min_bytes, 1)
    if isinstance(kind, _codec.Bytes):
        n = kind.size if kind.size is not None else min(3, kind.max_len)
        return bytes((i * 31 + j) % 256 for j in range(n))
    if isinstance(kind, _codec.Bool):
        return i % 2 == 0
    if isinstance(kind, _codec.PeerId):
        return KEY.peer_id
    if isinstance(kind, _codec.ListOf):  # one item at the top, empty below: small, yet every path runs
        return (_example_value(kind.item, name, i, depth),) if depth == 0 else ()
    if isinstance(kind, _codec.Optional):
        return _example_value(kind.inner, name, i, depth) if depth == 0 else None
    if isinstance(kind, _codec.Nested):
        return example(kind.cls, depth + 1)
    raise TypeError(f"{type(kind).__name__}: teach _example_value")


def example(cls: type, depth: int = 0) -> Any:
    """A deterministic instance of ``cls``: every value derived from the field map alone."""
    values = {}
    for i, (name, kind) in enumerate(cls._WIRE):
        values[name] = b"" if name in cls.SIGNATURES else _example_value(kind, name, i, depth)
    msg = cls(**values)
    if depth == 0:
        for field in cls.SIGNATURES:
            msg = protocol.sign(msg, field, KEY)
    return msg


def current_bytes() -> dict[KindVersion, str]:
    return {key: protocol.encode(example(cls)).hex() for key, cls in registered().items()}


# ---- the goldens on disk ----------------------------------------------------------------------


def _key_name(key: KindVersion) -> str:
    return f"{key[0]} v{key[1]}"


def load_maps() -> dict[KindVersion, dict[str, Any]]:
    data = json.loads(MAPS.read_text())
    return {(e["kind"], e["v"]): e for e in data["messages"]}


def load_bytes() -> dict[KindVersion, str]:
    data = json.loads(BYTES.read_text())
    out = {}
    for name, hexed in data["examples"].items():
        kind, v = name.rsplit("/v", 1)
        out[(kind, int(v))] = hexed
    return out


def _dump(obj: Any, indent: int = 0, prefix: int = 0, width: int = 120) -> str:
    """JSON, each value on one line where it fits (a list of plain values always does): one
    line per field in the maps file."""
    flat = json.dumps(obj)
    if indent + prefix + len(flat) <= width or not isinstance(obj, (dict, list)) or not obj:
        return flat
    if isinstance(obj, list) and not any(isinstance(v, (dict, list)) for v in obj):
        return flat
    pad = " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {_dump(v, indent + 2, len(json.dumps(k)) + 2, width)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + _dump(v, indent + 2, 0, width) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def render_maps(entries: dict[KindVersion, dict[str, Any]]) -> str:
    doc = {
        "about": "Frozen wire field maps, one entry per registered (kind, version). Never edit an entry: "
        "a changed field map is a new version. New entries: " + REGENERATE,
        "messages": [entries[k] for k in sorted(entries)],
    }
    return _dump(doc) + "\n"


def render_bytes(entries: dict[KindVersion, str]) -> str:
    doc = {
        "about": "Canonical encoding (hex) of one fixed example per (kind, version), built by "
        "tests/protocol/test_wire_golden.py:example() and signed with identity('wire-golden'). "
        "New entries: " + REGENERATE,
        "examples": {f"{k[0]}/v{k[1]}": entries[k] for k in sorted(entries)},
    }
    return json.dumps(doc, indent=1) + "\n"


# ---- comparing -------------------------------------------------------------------------------


def _nests(obj: Any, key: KindVersion) -> bool:
    if isinstance(obj, dict):
        if obj.get("type") == "nested" and (obj.get("message"), obj.get("v")) == key:
            return True
        return any(_nests(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(_nests(v, key) for v in obj)
    return False


def explain_map_change(key: KindVersion, old: dict[str, Any], new: dict[str, Any] | None,
                       golden: dict[KindVersion, dict[str, Any]]) -> str:
    """Why the entry ``key`` no longer matches: removed, added, reordered or retyped fields."""
    lines = [f"{_key_name(key)}: {FROZEN}"]
    if new is None:
        lines.append("  the (kind, version) is no longer registered")
    else:
        before = {f["name"]: f for f in old["fields"]}
        after = {f["name"]: f for f in new["fields"]}
        for name in before.keys() - after.keys():
            lines.append(f"  removed field {name}")
        for name in after.keys() - before.keys():
            lines.append(f"  added field {name}: {json.dumps(after[name])}")
        kept_before = [n for n in before if n in after]
        kept_after = [n for n in after if n in before]
        if kept_before != kept_after:
            lines.append(f"  field order {kept_before} -> {kept_after}")
        for name in kept_before:
            if before[name] != after[name]:
                lines.append(f"  field {name}: {json.dumps(before[name])} -> {json.dumps(after[name])}")
        if old["signatures"] != new["signatures"]:
            lines.append(f"  signatures {json.dumps(old['signatures'])} -> {json.dumps(new['signatures'])}")
    carriers = [_key_name(k) for k in sorted(golden) if k != key and _nests(golden[k]["fields"], key)]
    if carriers:
        lines.append(f"  (nested in {', '.join(carriers)}, whose bytes change too)")
    return "\n".join(lines)


@dataclasses.dataclass
class Comparison:
    edits: list[str]  # entries of the golden that the code no longer matches: never allowed
    additions: list[KindVersion]  # registered (kind, version)s that the golden lacks


def compare_maps(golden: dict[KindVersion, dict[str, Any]], current: dict[KindVersion, dict[str, Any]]) -> Comparison:
    edits = [
        explain_map_change(key, golden[key], current.get(key), golden)
        for key in sorted(golden)
        if current.get(key) != golden[key]
    ]
    return Comparison(edits, [k for k in sorted(current) if k not in golden])


def compare_bytes(golden: dict[KindVersion, str], current: dict[KindVersion, str]) -> Comparison:
    edits = []
    for key in sorted(golden):
        now = current.get(key)
        if now is None:
            edits.append(f"{_key_name(key)}: {FROZEN}\n  the (kind, version) is no longer registered")
        elif now != golden[key]:
            at = len(os.path.commonprefix([golden[key], now])) // 2
            edits.append(f"{_key_name(key)}: {FROZEN}\n  the canonical encoding of its example differs "
                         f"from byte {at} (the encoder, the signing domain, the field map or example() here changed)")
    return Comparison(edits, [k for k in sorted(current) if k not in golden])


def _not_in_golden(additions: list[KindVersion], path: Path) -> str:
    names = ", ".join(_key_name(k) for k in additions)
    return (f"registered but not in {path.name}: {names}. A new (kind, version) needs its golden entry: "
            f"run `{REGENERATE}` from the repository root and commit {path.name}")


# ---- the tests ---------------------------------------------------------------------------------


def _load(loader: Any, path: Path) -> Any:
    if not path.exists():
        pytest.fail(f"{path.name} is missing: run `{REGENERATE}` from the repository root")
    return loader()


def test_every_registered_field_map_matches_the_golden():
    result = compare_maps(_load(load_maps, MAPS), current_maps())
    assert not result.edits, "\n".join(result.edits)
    assert not result.additions, _not_in_golden(result.additions, MAPS)


def test_canonical_bytes_of_each_example_match_the_golden():
    result = compare_bytes(_load(load_bytes, BYTES), current_bytes())
    assert not result.edits, "\n".join(result.edits)
    assert not result.additions, _not_in_golden(result.additions, BYTES)


@pytest.mark.parametrize("key", sorted(registered()), ids=lambda k: f"{k[0]}-v{k[1]}")
def test_each_pinned_example_decodes_and_verifies(key):
    """The pinned bytes are a valid message: they decode to the example, re-encode identically,
    and every signature in them verifies."""
    hexed = _load(load_bytes, BYTES).get(key)
    if hexed is None:
        pytest.fail(_not_in_golden([key], BYTES))
    data = bytes.fromhex(hexed)
    msg = protocol.decode(data)
    assert msg == example(registered()[key])
    assert protocol.encode(msg) == data
    for field in type(msg).SIGNATURES:
        protocol.verify(msg, field, KEY.public_key)


def test_the_golden_files_are_in_their_written_form():
    """Sorted, one entry per (kind, version), exactly as ``--write`` lays them out."""
    assert MAPS.read_text() == render_maps(load_maps()), f"{MAPS.name} was edited by hand: rewrite it with --write"
    assert BYTES.read_text() == render_bytes(load_bytes()), f"{BYTES.name} was edited by hand: rewrite it with --write"


def doc_table() -> str:
    """The table of message kinds in docs/PROTOCOL.md, from the registry."""
    rows = ["| kind | v | class | signature fields (domain tag) |", "|---|---|---|---|"]
    for key in sorted(registered()):
        cls = registered()[key]
        sigs = ", ".join(f"`{s}` (`{protocol.domain_tag(cls, s).decode()}`)" for s in signature_fields(cls)) or "none"
        rows.append(f"| `{key[0]}` | {key[1]} | `{cls.__name__}` | {sigs} |")
    return "\n".join(rows) + "\n"


def test_docs_list_every_registered_kind():
    assert doc_table() in DOC.read_text(), (
        "docs/PROTOCOL.md's table of message kinds is not the registry's: replace it with the output of "
        "`.venv/bin/python -m tests.protocol.test_wire_golden --doc-table`"
    )


# ---- the check itself can fail: scratch edits of a registered map ---------------------------


def _variant(base: type, edit: Any) -> type:
    """A copy of the message or record ``base`` (kind, version and signatures included) whose
    field list is ``edit(fields)``: (name, wire type, dataclasses.Field or None) in wire order.
    It is never registered, so the registry stays as the code has it."""
    by_name = {f.name: f for f in dataclasses.fields(base)}
    fields = [(name, kind, by_name[name]) for name, kind in base._WIRE]
    spec = []
    for name, kind, f in edit(fields):
        kwargs: dict[str, Any] = {}
        if f is not None and f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f is not None and f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        spec.append((name, Any, _codec.wire(kind, **kwargs)))
    cls = _codec.record(dataclasses.make_dataclass(f"Edited{base.__name__}", spec, frozen=True))
    if hasattr(base, "KIND"):
        cls.KIND, cls.VERSION, cls.SIGNATURES = base.KIND, base.VERSION, base.SIGNATURES
    return cls


def _retype(name: str, kind: _codec.WireType) -> Any:
    return lambda fs: [(n, kind if n == name else k, f) for n, k, f in fs]


SCRATCH_EDITS = {
    "add a field": (lambda fs: [*fs, ("retry_after_s", _codec.UInt(86400), dataclasses.field(default=0))],
                    "added field retry_after_s"),
    "remove a field": (lambda fs: [x for x in fs if x[0] != "detail"], "removed field detail"),
    "reorder fields": (lambda fs: [fs[1], fs[0], *fs[2:]], "field order"),
    "retype a field": (_retype("call_seq", _codec.Bytes(8)), "field call_seq"),
    "change a bound": (_retype("detail", _codec.Str(513)), "field detail"),
    "add a choice": (_retype("reason", _codec.Str(choices=(*protocol.CALL_ERROR_REASONS, "new"))), "field reason"),
    "change a default": (lambda fs: [(n, k, dataclasses.field(default="x") if n == "detail" else f)
                                     for n, k, f in fs], "field detail"),
}


@pytest.mark.parametrize("edit", SCRATCH_EDITS)
def test_an_edited_registered_map_fails_naming_its_kind_and_version(edit):
    change, says = SCRATCH_EDITS[edit]
    golden = load_maps()  # every other entry as pinned: only the edit under test differs
    current = {**golden, ("call_error", 1): describe_message(_variant(protocol.CallError, change))}
    result = compare_maps(golden, current)
    assert len(result.edits) == 1
    assert result.edits[0].startswith(f"call_error v1: {FROZEN}")
    assert says in result.edits[0]


def test_an_edited_nested_record_fails_the_kind_that_carries_it():
    unchanged = _variant(protocol.Accept, lambda fs: fs)  # the control: a faithful copy matches
    assert describe_message(unchanged) == load_maps()[("session_accept", 1)]
    price = _variant(protocol.Price, _retype("min_charge", _codec.UInt(10**15)))
    accept = _variant(protocol.Accept, _retype("price", _codec.Nested(price)))
    result = compare_maps(load_maps(), {**load_maps(), ("session_accept", 1): describe_message(accept)})
    assert [e.split(":")[0] for e in result.edits] == ["session_accept v1"]


def test_a_removed_kind_and_a_new_kind_fail():
    golden = load_maps()
    new = ("call_queued", 1 + max(v for kind, v in golden if kind == "call_queued"))
    current = dict(golden)
    del current[("call_queued", 1)]
    current[new] = {**golden[("call_queued", 1)], "v": new[1]}
    result = compare_maps(golden, current)
    assert result.edits == [f"call_queued v1: {FROZEN}\n  the (kind, version) is no longer registered"]
    assert result.additions == [new]
    assert REGENERATE in _not_in_golden(result.additions, MAPS)


def test_a_changed_encoding_fails():
    golden = load_bytes()
    last = int(golden[("call_chunk", 1)][-2:], 16)
    changed = {**golden, ("call_chunk", 1): golden[("call_chunk", 1)][:-2] + f"{last ^ 1:02x}"}
    result = compare_bytes(golden, changed)
    assert len(result.edits) == 1 and result.edits[0].startswith(f"call_chunk v1: {FROZEN}")


# ---- regeneration (never used by the tests above) ----------------------------------------------


def write() -> int:
    """Add the golden entries of newly registered (kind, version)s; refuse any other change."""
    maps, data = current_maps(), current_bytes()
    old_maps = load_maps() if MAPS.exists() else {}
    old_bytes = load_bytes() if BYTES.exists() else {}
    edits = compare_maps(old_maps, maps).edits + compare_bytes(old_bytes, data).edits
    if edits:
        print("\n".join(edits), file=sys.stderr)
        print("refusing to rewrite a frozen entry: register a new version instead", file=sys.stderr)
        return 1
    added = sorted(set(maps) - set(old_maps) | set(data) - set(old_bytes))
    MAPS.write_text(render_maps(maps))
    BYTES.write_text(render_bytes(data))
    print(f"added: {', '.join(_key_name(k) for k in added) or 'nothing'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="add golden entries for new (kind, version)s")
    parser.add_argument("--doc-table", action="store_true", help="print docs/PROTOCOL.md's table of kinds")
    args = parser.parse_args(argv)
    if args.doc_table:
        print(doc_table(), end="")
        return 0
    if args.write:
        return write()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
