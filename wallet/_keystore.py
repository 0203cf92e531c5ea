"""The encrypted keystore: the node's identity seed and upstream API keys, at rest.

File format (JSON, mode 0600, written atomically):
    {"format": "inferswarm-keystore", "version": 1,
     "peer_id": ..., "public_key": hex,             public, so `node id` needs no passphrase
     "kdf": {"name": "argon2id", "opslimit": n, "memlimit": n, "salt": hex},
     "box": base64(XSalsa20-Poly1305 secretbox of msgpack {"seed": bytes, "api_keys": {name: key}})}
The public header is checked against the decrypted seed on every unlock. Secrets never leave
this module except through ``identity`` and ``api_key(name)``; ``repr`` never shows them.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import msgpack
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from ._errors import (
    KeystoreCorrupt,
    KeystoreExists,
    KeystoreNotFound,
    PassphraseUnavailable,
    WrongPassphrase,
)
from ._keys import Identity

__all__ = ["Keystore", "PASSPHRASE_ENV", "resolve_passphrase", "read_public_identity"]

PASSPHRASE_ENV = "INFERSWARM_PASSPHRASE"
_FORMAT = "inferswarm-keystore"
_VERSION = 1
_ARGON = nacl.pwhash.argon2id
# Interactive limits (64 MiB, 2 passes): unlocking happens once per daemon start.
DEFAULT_OPSLIMIT = _ARGON.OPSLIMIT_INTERACTIVE
DEFAULT_MEMLIMIT = _ARGON.MEMLIMIT_INTERACTIVE
_MAX_MEMLIMIT = 1 << 30  # refuse files that would make us allocate more than 1 GiB
_MAX_OPSLIMIT = 64
_MAX_FILE = 1 << 20


def resolve_passphrase(confirm: bool = False, env: Mapping[str, str] | None = None) -> str:
    """The keystore passphrase: ``$INFERSWARM_PASSPHRASE``, else a prompt on a terminal.

    Raises:
        PassphraseUnavailable: no variable and stdin is not a terminal (or an empty answer).
    """
    env = os.environ if env is None else env
    value = env.get(PASSPHRASE_ENV)
    if value:
        return value
    if not sys.stdin.isatty():
        raise PassphraseUnavailable(f"set {PASSPHRASE_ENV} or run on a terminal to enter the keystore passphrase")
    value = getpass.getpass("Keystore passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != value:
        raise PassphraseUnavailable("the passphrases did not match")
    if not value:
        raise PassphraseUnavailable("an empty passphrase is not allowed")
    return value


def _read(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_FILE:
            raise KeystoreCorrupt(f"{path} is too large to be a keystore")
        doc = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise KeystoreNotFound(f"no keystore at {path} (run `node init`)") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeystoreCorrupt(f"{path} is not a readable keystore (truncated or damaged)") from exc
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise KeystoreCorrupt(f"{path} is not an inferswarm keystore")
    if doc.get("version") != _VERSION:
        raise KeystoreCorrupt(f"{path}: unsupported keystore version {doc.get('version')!r}")
    return doc


def read_public_identity(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """``(peer_id, public_key)`` from the keystore's public header; no passphrase needed.

    Raises:
        KeystoreNotFound, KeystoreCorrupt.
    """
    doc = _read(Path(path))
    try:
        return str(doc["peer_id"]), bytes.fromhex(doc["public_key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KeystoreCorrupt(f"{path}: damaged public header") from exc


def _derive(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return _ARGON.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase.encode("utf-8"), salt, opslimit=opslimit, memlimit=memlimit)


class Keystore:
    """An unlocked keystore. Create with ``Keystore.create`` or unlock with ``Keystore.open``."""

    def __init__(
        self, path: Path, passphrase: str, identity: Identity, api_keys: dict[str, str], opslimit: int, memlimit: int
    ) -> None:
        self.path = path
        self._passphrase = passphrase
        self.identity = identity
        self._api_keys = api_keys
        self._opslimit = opslimit
        self._memlimit = memlimit

    def __repr__(self) -> str:
        return f"Keystore({str(self.path)!r}, peer_id={self.identity.peer_id})"

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        passphrase: str,
        identity: Identity | None = None,
        *,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> "Keystore":
        """Write a new keystore (a fresh identity unless one is given).

        Raises:
            KeystoreExists: a file is already at ``path``.
            PassphraseUnavailable: an empty passphrase.
        """
        path = Path(path)
        if not passphrase:
            raise PassphraseUnavailable("an empty passphrase is not allowed")
        if path.exists():
            raise KeystoreExists(f"a keystore already exists at {path}")
        ks = cls(path, passphrase, identity or Identity.generate(), {}, opslimit, memlimit)
        ks._save(exclusive=True)
        return ks

    @classmethod
    def open(cls, path: str | os.PathLike[str], passphrase: str) -> "Keystore":
        """Unlock the keystore at ``path``.

        Raises:
            KeystoreNotFound, KeystoreCorrupt, WrongPassphrase.
        """
        path = Path(path)
        doc = _read(path)
        try:
            kdf = doc["kdf"]
            if kdf["name"] != "argon2id":
                raise KeystoreCorrupt(f"{path}: unknown key derivation {kdf['name']!r}")
            opslimit, memlimit = int(kdf["opslimit"]), int(kdf["memlimit"])
            salt = bytes.fromhex(kdf["salt"])
            box = base64.b64decode(doc["box"], validate=True)
            header_key = bytes.fromhex(doc["public_key"])
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise KeystoreCorrupt(f"{path}: damaged keystore fields") from exc
        if len(salt) != _ARGON.SALTBYTES or not (0 < opslimit <= _MAX_OPSLIMIT and 0 < memlimit <= _MAX_MEMLIMIT):
            raise KeystoreCorrupt(f"{path}: key derivation parameters out of range")
        key = _derive(passphrase, salt, opslimit, memlimit)
        try:
            plain = nacl.secret.SecretBox(key).decrypt(box)
        except nacl.exceptions.CryptoError as exc:
            raise WrongPassphrase(f"wrong passphrase for {path} (or the file was altered)") from exc
        try:
            inner = msgpack.unpackb(plain, raw=False)
            identity = Identity(inner["seed"])
            api_keys = {str(k): str(v) for k, v in inner["api_keys"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            raise KeystoreCorrupt(f"{path}: damaged encrypted content") from exc
        if identity.public_key != header_key or identity.peer_id != doc.get("peer_id"):
            raise KeystoreCorrupt(f"{path}: the public header does not match the encrypted key")
        return cls(path, passphrase, identity, api_keys, opslimit, memlimit)

    def api_key_names(self) -> list[str]:
        """Names of stored upstream API keys (never their values)."""
        return sorted(self._api_keys)

    def api_key(self, name: str) -> str:
        """The upstream API key stored under ``name``.

        Raises:
            KeyError: no such key.
        """
        try:
            return self._api_keys[name]
        except KeyError:
            raise KeyError(f"no API key named {name!r} in the keystore") from None

    def set_api_key(self, name: str, value: str) -> None:
        """Store (or replace) an upstream API key and save the keystore."""
        if not name or not value:
            raise ValueError("an API key needs a name and a value")
        self._api_keys[name] = value
        self._save()

    def remove_api_key(self, name: str) -> None:
        self.api_key(name)
        del self._api_keys[name]
        self._save()

    def _save(self, exclusive: bool = False) -> None:
        salt = nacl.utils.random(_ARGON.SALTBYTES)
        key = _derive(self._passphrase, salt, self._opslimit, self._memlimit)
        plain = msgpack.packb({"seed": self.identity.seed, "api_keys": self._api_keys}, use_bin_type=True)
        doc = {
            "format": _FORMAT,
            "version": _VERSION,
            "peer_id": self.identity.peer_id,
            "public_key": self.identity.public_key.hex(),
            "kdf": {"name": "argon2id", "opslimit": self._opslimit, "memlimit": self._memlimit, "salt": salt.hex()},
            "box": base64.b64encode(nacl.secret.SecretBox(key).encrypt(plain)).decode("ascii"),
        }
        data = json.dumps(doc, indent=2).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, self.path)  # fails if someone created the keystore meanwhile
            except FileExistsError as exc:
                raise KeystoreExists(f"a keystore already exists at {self.path}") from exc
            finally:
                os.unlink(tmp)
        else:
            os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
