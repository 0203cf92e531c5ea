"""Model commitments computed from what a backend loads (``protocol.ModelCommitment``).

A model folder is split in two groups, each hashed in a stated order:

- **weights**: every file but the tokenizer's (``*.safetensors``, ``*.bin``, ``config.json``,
  ``generation_config.json``, a GGUF file, ...): the architecture and the numbers;
- **tokenizer**: ``TOKENIZER_FILES`` and any ``*.jinja`` chat template: how text becomes tokens
  and how a conversation is laid out.

Each group's hash is sha256 over, for each file in sorted order of its relative POSIX path,
``path NUL size(8 bytes, big-endian) content``; hidden files (``.lock`` and the like) and
``README``/``LICENSE`` files do not count. Two folders that load the same model hash alike
wherever they sit on disk, and a changed byte, a renamed file or a swapped tokenizer changes
the commitment. Hashing reads every byte once (about 1 s per GB here); backends compute it once,
when they load.

An upstream API has no weights to name: its commitment is the upstream's model id and host
(``kind="upstream"``), which says exactly that much and no more.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlsplit

import protocol

__all__ = ["TOKENIZER_FILES", "folder_commitment", "file_commitment", "upstream_commitment"]

TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.json",
})
_SKIPPED_PREFIXES = ("readme", "license", "notice")
_BLOCK = 1 << 20


def _counts(relative: Path) -> bool:
    if any(part.startswith(".") for part in relative.parts):
        return False
    return not relative.name.lower().startswith(_SKIPPED_PREFIXES)


def _is_tokenizer(relative: Path) -> bool:
    return relative.name in TOKENIZER_FILES or relative.suffix == ".jinja"


def _hash_files(root: Path, files: list[Path]) -> bytes:
    digest = hashlib.sha256()
    for relative in sorted(files, key=lambda p: p.as_posix()):
        path = root / relative
        digest.update(relative.as_posix().encode() + b"\0" + path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return digest.digest()


def folder_commitment(folder: Path) -> protocol.ModelCommitment:
    """The commitment to the model in ``folder`` (blocking: run it in a worker thread).

    Raises:
        OSError: the folder cannot be read. ValueError: it holds no weight files.
    """
    files = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file()]
    files = [p for p in files if _counts(p)]
    tokenizer = [p for p in files if _is_tokenizer(p)]
    weights = [p for p in files if not _is_tokenizer(p)]
    if not weights:
        raise ValueError(f"no model files in {folder}")
    return protocol.ModelCommitment(kind="weights", weights_hash=_hash_files(folder, weights),
                                    tokenizer_hash=_hash_files(folder, tokenizer) if tokenizer else protocol.ZERO_HASH,
                                    files=len(files))


def file_commitment(path: Path) -> protocol.ModelCommitment:
    """The commitment to a single-file model (a GGUF file holds its tokenizer and template)."""
    return protocol.ModelCommitment(kind="weights", weights_hash=_hash_files(path.parent, [Path(path.name)]),
                                    files=1)


def upstream_commitment(model: str, base_url: str) -> protocol.ModelCommitment:
    """The commitment of an upstream API's model: its id and the host that serves it."""
    host = urlsplit(base_url).netloc or base_url
    return protocol.ModelCommitment(kind="upstream", upstream=f"{model}@{host}"[:256])
