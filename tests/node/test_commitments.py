"""Commitments computed from model files, and a session served under its backend's commitment."""

from __future__ import annotations

import shutil
from pathlib import Path

import protocol
from node.provider._offers import Offer
from node.provider.backends._commitment import file_commitment, folder_commitment, upstream_commitment
from tests.node.impostor import SEED_A, SEED_B, builtin_folder
from tests.node.session_rig import builtin_backend, session_rig


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_a_folder_commitment_names_the_files_not_where_they_sit(tmp_path):
    a = builtin_folder(tmp_path / "models", SEED_A)
    copy = _copy(a, tmp_path / "elsewhere" / "model")
    (copy / ".lock").write_text("hidden files do not count")
    (copy / "README.md").write_text("nor do readmes")
    assert folder_commitment(copy) == folder_commitment(a)
    c = folder_commitment(a)
    assert c.kind == "weights" and c.files == 7 and c.tokenizer_hash != protocol.ZERO_HASH


def test_another_seed_a_changed_byte_or_another_tokenizer_is_another_commitment(tmp_path):
    a = builtin_folder(tmp_path / "models", SEED_A)
    b = builtin_folder(tmp_path / "models", SEED_B)
    ca, cb = folder_commitment(a), folder_commitment(b)
    assert ca.weights_hash != cb.weights_hash and ca.tokenizer_hash == cb.tokenizer_hash
    flipped = _copy(a, tmp_path / "flipped")
    weights = bytearray((flipped / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (flipped / "model.safetensors").write_bytes(bytes(weights))
    assert folder_commitment(flipped).weights_hash != ca.weights_hash
    retemplated = _copy(a, tmp_path / "retemplated")
    (retemplated / "chat_template.jinja").write_text("{{ messages }}")
    assert folder_commitment(retemplated).weights_hash == ca.weights_hash
    assert folder_commitment(retemplated).tokenizer_hash != ca.tokenizer_hash


def test_single_file_and_upstream_commitments(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    assert file_commitment(gguf).weights_hash != protocol.ZERO_HASH and file_commitment(gguf).files == 1
    up = upstream_commitment("llama-3-70b", "https://api.example.com/v1")
    assert up == protocol.ModelCommitment(kind="upstream", upstream="llama-3-70b@api.example.com")


async def test_the_listing_and_the_session_name_the_loaded_models_commitment():
    offer = Offer(model="m", backend="builtin", input_price=100, output_price=200, max_context=2048)
    backend = builtin_backend()
    async with session_rig({"m": offer}, {"m": backend}, tag="commit") as rig:
        storefront = rig.provider_service.storefront
        await storefront.backend_for(offer)
        listed = storefront.listed(offer)
        committed = folder_commitment(backend.folder)
        assert listed.commitment == committed and listed.reproducible
        channel = await rig.open_channel(cap=1_000_000)
        async with rig.session(channel, commitment=protocol.commitment_id(committed)) as session:
            result = await session.call([{"role": "user", "content": "hello"}], 8)
            assert session.machine.accept.commitment == protocol.commitment_id(committed)
        req = session.machine._request
        assert result.receipt.input_hash != protocol.ZERO_HASH and req is None
