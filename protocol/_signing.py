"""Ed25519 signatures over domain-tagged canonical bodies.

A signature in field ``F`` of a message of kind ``K`` at version ``V`` is over
``b"inferswarm/K/vV" + suffix + canonical_body_without_signature_fields`` where the suffix is
empty for a field named ``sig`` and ``/ROLE`` for a field named ``ROLE_sig``. So no signature
can be replayed as another kind, another version or another party's role. Verification raises
with the reason; it never returns a bool.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Protocol, TypeVar

import nacl.exceptions
import nacl.signing

from ._codec import encode_body
from ._errors import BadSignature, InvalidMessage

__all__ = ["Signer", "domain_tag", "signed_bytes", "sign", "verify", "body_hash"]

M = TypeVar("M")


class Signer(Protocol):
    """What protocol/ needs of a key: its raw public key and detached Ed25519 signatures."""

    @property
    def public_key(self) -> bytes: ...

    def sign_bytes(self, data: bytes) -> bytes: ...


def domain_tag(cls: type, field: str) -> bytes:
    """The domain tag of signature field ``field`` of message class ``cls``."""
    if field not in cls.SIGNATURES:
        raise InvalidMessage(f"{cls.__name__} has no signature field {field}")
    suffix = "" if field == "sig" else "/" + field.removesuffix("_sig")
    return f"inferswarm/{cls.KIND}/v{cls.VERSION}{suffix}".encode()


def signed_bytes(msg: Any, field: str) -> bytes:
    """The exact bytes that signature field ``field`` of ``msg`` covers."""
    return domain_tag(type(msg), field) + encode_body(msg, signatures=False)


def sign(msg: M, field: str, signer: Signer) -> M:
    """A copy of ``msg`` with ``field`` holding ``signer``'s signature."""
    signature = signer.sign_bytes(signed_bytes(msg, field))
    return dataclasses.replace(msg, **{field: signature})  # type: ignore[type-var]


def verify(msg: Any, field: str, public_key: bytes) -> None:
    """Check signature field ``field`` of ``msg`` against ``public_key``.

    Raises:
        BadSignature: missing, malformed or not made by that key over these bytes.
    """
    signature = getattr(msg, field)
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise BadSignature(f"{type(msg).KIND}.{field} is missing or not 64 bytes")
    try:
        nacl.signing.VerifyKey(public_key).verify(signed_bytes(msg, field), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
        raise BadSignature(f"{type(msg).KIND}.{field} does not verify") from exc


def body_hash(msg: Any) -> bytes:
    """sha256 of the kind-tagged canonical body without signatures: a message's stable id."""
    cls = type(msg)
    return hashlib.sha256(f"inferswarm/{cls.KIND}/v{cls.VERSION}".encode() + encode_body(msg, signatures=False)).digest()
