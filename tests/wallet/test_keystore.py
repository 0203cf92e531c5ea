"""The encrypted keystore: round trip, wrong passphrase, damage, permissions."""

from __future__ import annotations

import json
import os
import stat

import nacl.pwhash
import pytest

import wallet
from wallet import Identity, Keystore

FAST = dict(opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN, memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "home" / "keystore.json"


def test_round_trip_keeps_identity_and_api_keys(path):
    ks = Keystore.create(path, "correct horse", **FAST)
    ks.set_api_key("upstream", "sk-secret-value")
    again = Keystore.open(path, "correct horse")
    assert again.identity.peer_id == ks.identity.peer_id
    assert again.identity.seed == ks.identity.seed
    assert again.api_key("upstream") == "sk-secret-value"
    assert again.api_key_names() == ["upstream"]
    again.remove_api_key("upstream")
    assert Keystore.open(path, "correct horse").api_key_names() == []
    with pytest.raises(KeyError, match="nope"):
        again.api_key("nope")


def test_the_keystore_holds_a_chain_account_derived_from_the_seed(path):
    from eth_account import Account

    ks = Keystore.create(path, "correct horse", **FAST)
    again = Keystore.open(path, "correct horse")
    assert again.identity.eth_address == ks.identity.eth_address == Account.from_key(ks.identity.eth_key).address
    assert ks.identity.eth_key != ks.identity.seed and len(ks.identity.eth_key) == 32
    assert Keystore.create(path.with_name("other.json"), "pw", **FAST).identity.eth_address != ks.identity.eth_address
    assert ks.identity.eth_key.hex().encode() not in path.read_bytes()


def test_secrets_are_not_in_the_file_or_repr(path):
    passphrase = "pass-0-phrase"  # '-' and '0' are not base58: it cannot turn up inside a peer id by chance
    ks = Keystore.create(path, passphrase, **FAST)
    ks.set_api_key("up", "sk-very-secret")
    raw = path.read_bytes()
    assert b"sk-very-secret" not in raw and ks.identity.seed.hex().encode() not in raw
    assert passphrase.encode() not in raw
    assert "sk-very-secret" not in repr(ks) and passphrase not in repr(ks).replace(str(path), "")


def test_public_identity_needs_no_passphrase(path):
    ks = Keystore.create(path, "pw", **FAST)
    assert wallet.read_public_identity(path) == (ks.identity.peer_id, ks.identity.public_key)


def test_wrong_passphrase(path):
    Keystore.create(path, "right", **FAST)
    with pytest.raises(wallet.WrongPassphrase, match="wrong passphrase"):
        Keystore.open(path, "wrong")


def test_truncated_file(path):
    Keystore.create(path, "pw", **FAST)
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(wallet.KeystoreCorrupt):
            Keystore.open(path, "pw")


def test_tampered_box_or_header(path):
    Keystore.create(path, "pw", **FAST)
    doc = json.loads(path.read_text())
    box = bytearray(doc["box"].encode())
    box[20] = ord("A") if box[20] != ord("A") else ord("B")
    path.write_text(json.dumps({**doc, "box": box.decode()}))
    with pytest.raises((wallet.WrongPassphrase, wallet.KeystoreCorrupt)):
        Keystore.open(path, "pw")
    other = Identity.generate()
    path.write_text(json.dumps({**doc, "peer_id": other.peer_id, "public_key": other.public_key.hex()}))
    with pytest.raises(wallet.KeystoreCorrupt, match="header"):
        Keystore.open(path, "pw")
    path.write_text(json.dumps({**doc, "kdf": {**doc["kdf"], "memlimit": 1 << 40}}))
    with pytest.raises(wallet.KeystoreCorrupt, match="out of range"):
        Keystore.open(path, "pw")
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(wallet.KeystoreCorrupt, match="not an inferswarm keystore"):
        Keystore.open(path, "pw")


def test_permissions_are_0600_even_after_updates(path):
    old = os.umask(0)
    try:
        ks = Keystore.create(path, "pw", **FAST)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        ks.set_api_key("a", "b")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert not list(path.parent.glob("*.tmp"))


def test_never_overwrites_and_missing_file(path):
    Keystore.create(path, "pw", **FAST)
    with pytest.raises(wallet.KeystoreExists):
        Keystore.create(path, "pw", **FAST)
    with pytest.raises(wallet.KeystoreNotFound, match="node init"):
        Keystore.open(path.with_name("absent.json"), "pw")
    with pytest.raises(wallet.PassphraseUnavailable):
        Keystore.create(path.with_name("new.json"), "", **FAST)


def test_passphrase_from_env_or_a_clear_error(monkeypatch):
    assert wallet.resolve_passphrase(env={"INFERSWARM_PASSPHRASE": "s3cret"}) == "s3cret"
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(wallet.PassphraseUnavailable, match="INFERSWARM_PASSPHRASE"):
        wallet.resolve_passphrase(env={})


def test_identity_signs_verifiably():
    import nacl.signing

    ident = Identity(b"\x07" * 32)
    sig = ident.sign_bytes(b"hello")
    nacl.signing.VerifyKey(ident.public_key).verify(b"hello", sig)
    assert Identity(ident.seed).peer_id == ident.peer_id
    with pytest.raises(ValueError):
        Identity(b"short")
