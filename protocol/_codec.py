"""Canonical msgpack encoding and strict decoding of versioned field maps.

Rules this module owns:
- Every wire type is a frozen dataclass whose fields each declare a wire type with ``wire()``;
  the declaration order *is* the wire order. A top-level message also has a kind and a version
  (``@message``); nested records (``@record``) travel only inside messages.
- The envelope is the msgpack map ``{"kind": str, "v": int, "body": {field: value, ...}}``
  packed with ``use_bin_type=True``. No floats exist in any wire type.
- Decoding is strict: unknown kind or version, a missing or extra field, a wrong type or an
  out-of-range value, and any encoding that does not re-encode to the very same bytes (key
  order, integer width, string header) are errors. So every message has exactly one encoding,
  and a signature over the canonical body covers the bytes that were sent.
- Version 1 is frozen: the field maps registered today are all version 1, and a registered
  field map is never edited. Adding, removing, reordering or retyping a field, or changing a
  bound, a default, a signature field or a nested record, is a new version registered beside
  the old one. tests/protocol/test_wire_golden.py pins every registered (kind, version) map
  and the canonical bytes of one example of each; docs/PROTOCOL.md states the rules.
Nothing here reads the clock or does I/O.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import msgpack

from ._errors import (
    DecodeError,
    ExtraField,
    FrameTooLarge,
    InvalidMessage,
    MalformedMessage,
    MessageTooLarge,
    MissingField,
    UnexpectedMessage,
    UnknownKind,
    UnknownVersion,
    WrongFieldType,
)
from ._identity import public_key_from_peer_id

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "UInt",
    "Str",
    "Bytes",
    "Bool",
    "PeerId",
    "ListOf",
    "Nested",
    "Optional",
    "wire",
    "message",
    "record",
    "encode",
    "decode",
    "encode_body",
    "pack",
    "registered_kinds",
]

DEFAULT_MAX_MESSAGE = 1 << 20  # 1 MiB, the default frame limit (docs/DESIGN.md, "Streams")
U64_MAX = (1 << 64) - 1

T = TypeVar("T")


class WireType:
    """How one field travels. ``check`` validates a Python value (raising WrongFieldType);
    ``to_wire`` / ``from_wire`` convert to and from what msgpack carries."""

    def check(self, value: Any, path: str) -> None:
        raise NotImplementedError

    def to_wire(self, value: Any) -> Any:
        return value

    def from_wire(self, raw: Any, path: str) -> Any:
        self.check(raw, path)
        return raw


@dataclasses.dataclass(frozen=True)
class UInt(WireType):
    """A non-negative integer (never a bool, never a float) up to ``max``."""

    max: int = U64_MAX

    def check(self, value: Any, path: str) -> None:
        if type(value) is not int:
            raise WrongFieldType(f"{path}: expected an integer, got {type(value).__name__}")
        if not 0 <= value <= self.max:
            raise WrongFieldType(f"{path}: {value} is outside 0..{self.max}")


@dataclasses.dataclass(frozen=True)
class Str(WireType):
    """UTF-8 text of at most ``max_bytes`` encoded bytes, optionally one of ``choices``."""

    max_bytes: int = 256
    choices: tuple[str, ...] | None = None
    min_bytes: int = 0

    def check(self, value: Any, path: str) -> None:
        if type(value) is not str:
            raise WrongFieldType(f"{path}: expected text, got {type(value).__name__}")
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise WrongFieldType(f"{path}: not valid UTF-8 text") from exc
        if not self.min_bytes <= n <= self.max_bytes:
            raise WrongFieldType(f"{path}: text length {n} outside {self.min_bytes}..{self.max_bytes}")
        if self.choices is not None and value not in self.choices:
            raise WrongFieldType(f"{path}: {value!r:.40} is not one of {', '.join(self.choices)}")


@dataclasses.dataclass(frozen=True)
class Bytes(WireType):
    """Raw bytes, either exactly ``size`` long or at most ``max_len``."""

    size: int | None = None
    max_len: int = 1024

    def check(self, value: Any, path: str) -> None:
        if type(value) is not bytes:
            raise WrongFieldType(f"{path}: expected bytes, got {type(value).__name__}")
        if self.size is not None and len(value) != self.size:
            raise WrongFieldType(f"{path}: expected {self.size} bytes, got {len(value)}")
        if len(value) > self.max_len:
            raise WrongFieldType(f"{path}: {len(value)} bytes is over {self.max_len}")


@dataclasses.dataclass(frozen=True)
class Bool(WireType):
    def check(self, value: Any, path: str) -> None:
        if type(value) is not bool:
            raise WrongFieldType(f"{path}: expected a boolean, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class PeerId(WireType):
    """A base58 Ed25519 peer id; its public key must parse out of it."""

    def check(self, value: Any, path: str) -> None:
        if type(value) is not str:
            raise WrongFieldType(f"{path}: expected a peer id, got {type(value).__name__}")
        try:
            public_key_from_peer_id(value)
        except WrongFieldType as exc:
            raise WrongFieldType(f"{path}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class ListOf(WireType):
    """A list (a tuple in Python, so messages stay immutable) of at most ``max_items``."""

    item: WireType
    max_items: int = 64

    def check(self, value: Any, path: str) -> None:
        if type(value) is not tuple:
            raise WrongFieldType(f"{path}: expected a tuple, got {type(value).__name__}")
        self._check_len(len(value), path)
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]")

    def _check_len(self, n: int, path: str) -> None:
        if n > self.max_items:
            raise WrongFieldType(f"{path}: {n} items is over {self.max_items}")

    def to_wire(self, value: Any) -> Any:
        return [self.item.to_wire(v) for v in value]

    def from_wire(self, raw: Any, path: str) -> Any:
        if type(raw) is not list:
            raise WrongFieldType(f"{path}: expected a list, got {type(raw).__name__}")
        self._check_len(len(raw), path)
        return tuple(self.item.from_wire(v, f"{path}[{i}]") for i, v in enumerate(raw))


@dataclasses.dataclass(frozen=True)
class Nested(WireType):
    """A record or message body nested as a map."""

    cls: type

    def check(self, value: Any, path: str) -> None:
        if type(value) is not self.cls:
            raise WrongFieldType(f"{path}: expected {self.cls.__name__}, got {type(value).__name__}")
        _check_fields(value, path)

    def to_wire(self, value: Any) -> Any:
        return _body_to_wire(value, signatures=True)

    def from_wire(self, raw: Any, path: str) -> Any:
        return _body_from_wire(self.cls, raw, path)


@dataclasses.dataclass(frozen=True)
class Optional(WireType):
    """The inner type, or nil."""

    inner: WireType

    def check(self, value: Any, path: str) -> None:
        if value is not None:
            self.inner.check(value, path)

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.inner.to_wire(value)

    def from_wire(self, raw: Any, path: str) -> Any:
        return None if raw is None else self.inner.from_wire(raw, path)


def wire(kind: WireType, **field_kwargs: Any) -> Any:
    """Declare a dataclass field's wire type (``default=`` etc. pass through)."""
    return dataclasses.field(metadata={"wire": kind}, **field_kwargs)


_REGISTRY: dict[str, dict[int, type]] = {}


def _collect(cls: type) -> tuple[tuple[str, WireType], ...]:
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    out = []
    for f in dataclasses.fields(cls):
        kind = f.metadata.get("wire")
        if not isinstance(kind, WireType):
            raise TypeError(f"{cls.__name__}.{f.name} has no wire type")
        out.append((f.name, kind))
    return tuple(out)


def record(cls: type[T]) -> type[T]:
    """Mark a frozen dataclass as a nested wire record."""
    cls._WIRE = _collect(cls)  # type: ignore[attr-defined]
    cls.SIGNATURES = ()  # type: ignore[attr-defined]
    return cls


def message(kind: str, version: int, signatures: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as the wire message ``kind`` at ``version``.

    Args:
        kind: the message kind on the wire (and in its signature domain tag).
        version: the field map's version; a new field map is a new version.
        signatures: names of 64-byte signature fields, excluded from the signed body.
    """

    def wrap(cls: type[T]) -> type[T]:
        fields = _collect(cls)
        names = [n for n, _ in fields]
        for s in signatures:
            if s not in names:
                raise TypeError(f"{cls.__name__}: no signature field {s}")
        if version in _REGISTRY.get(kind, {}):
            raise TypeError(f"message {kind} v{version} registered twice")
        _REGISTRY.setdefault(kind, {})[version] = cls
        cls._WIRE = fields  # type: ignore[attr-defined]
        cls.KIND = kind  # type: ignore[attr-defined]
        cls.VERSION = version  # type: ignore[attr-defined]
        cls.SIGNATURES = tuple(signatures)  # type: ignore[attr-defined]
        return cls

    return wrap


def registered_kinds() -> dict[str, tuple[int, ...]]:
    """Every registered kind with its known versions."""
    return {k: tuple(sorted(v)) for k, v in _REGISTRY.items()}


def _check_fields(obj: Any, path: str) -> None:
    for name, kind in type(obj)._WIRE:
        kind.check(getattr(obj, name), f"{path}.{name}")


def _body_to_wire(obj: Any, signatures: bool) -> dict[str, Any]:
    skip = () if signatures else type(obj).SIGNATURES
    return {name: kind.to_wire(getattr(obj, name)) for name, kind in type(obj)._WIRE if name not in skip}


def _body_from_wire(cls: type, raw: Any, path: str) -> Any:
    if type(raw) is not dict:
        raise WrongFieldType(f"{path}: expected a map, got {type(raw).__name__}")
    wanted = [name for name, _ in cls._WIRE]
    missing = [n for n in wanted if n not in raw]
    if missing:
        raise MissingField(f"{path}: missing field(s) {', '.join(missing)}")
    extra = [str(k) for k in raw if k not in wanted]
    if extra:
        raise ExtraField(f"{path}: unknown field(s) {', '.join(extra)[:200]}")
    values = {name: kind.from_wire(raw[name], f"{path}.{name}") for name, kind in cls._WIRE}
    return cls(**values)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def pack(obj: Any) -> bytes:
    """The canonical msgpack of a plain value (lists, text, integers): what a hash covers."""
    return _pack(obj)


def encode_body(msg: Any, signatures: bool = True) -> bytes:
    """Canonical bytes of a message's field map (without its signatures if ``signatures=False``)."""
    try:
        _check_fields(msg, type(msg).__name__)
    except DecodeError as exc:
        raise InvalidMessage(str(exc)) from exc
    return _pack(_body_to_wire(msg, signatures))


def encode(msg: Any, max_size: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """The canonical encoding of a registered message.

    Raises:
        InvalidMessage: a field does not fit its declared wire type.
        MessageTooLarge: the encoding is over ``max_size``.
    """
    cls = type(msg)
    if not hasattr(cls, "KIND"):
        raise InvalidMessage(f"{cls.__name__} is not a registered message")
    try:
        _check_fields(msg, cls.__name__)
    except DecodeError as exc:
        raise InvalidMessage(str(exc)) from exc
    data = _pack({"kind": cls.KIND, "v": cls.VERSION, "body": _body_to_wire(msg, True)})
    if len(data) > max_size:
        raise MessageTooLarge(f"{cls.KIND} message is {len(data)} bytes, over {max_size}")
    return data


def decode(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE, expect: tuple[type, ...] | None = None) -> Any:
    """Strictly decode one message.

    Args:
        data: the message bytes (one frame's payload).
        max_size: refuse anything larger before parsing it.
        expect: if given, the message classes acceptable here.

    Raises:
        FrameTooLarge, MalformedMessage, UnknownKind, UnknownVersion, MissingField,
        ExtraField, WrongFieldType: what is wrong with the bytes (all DecodeError).
    """
    if len(data) > max_size:
        raise FrameTooLarge(f"message of {len(data)} bytes is over {max_size}")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except msgpack.ExtraData as exc:
        raise MalformedMessage("trailing bytes after the message") from exc
    except (ValueError, msgpack.UnpackException, UnicodeDecodeError, TypeError) as exc:
        raise MalformedMessage(f"not a msgpack message: {exc}") from exc
    if type(raw) is not dict or set(raw) != {"kind", "v", "body"}:
        raise MalformedMessage("envelope must be a map of exactly kind, v, body")
    kind, version = raw["kind"], raw["v"]
    if type(kind) is not str or type(version) is not int:
        raise MalformedMessage("envelope kind must be text and v an integer")
    versions = _REGISTRY.get(kind)
    if versions is None:
        raise UnknownKind(f"unknown message kind {kind!r:.40}")
    cls = versions.get(version)
    if cls is None:
        raise UnknownVersion(f"unknown version {version} of {kind}")
    if expect is not None and cls not in expect:
        raise UnexpectedMessage(f"{kind} is not expected here")
    msg = _body_from_wire(cls, raw["body"], kind)
    if encode(msg, max_size=max_size + 64) != data:
        raise MalformedMessage(f"{kind}: non-canonical encoding")
    return msg
