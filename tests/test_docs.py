"""The docs are true to the repository: nothing cites a file outside it, every cited document
exists, and every public class says what it is."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SOURCES = [p for d in ("node", "protocol", "wallet", "cli", "tests", "bench", "docs") for p in (ROOT / d).rglob("*")
            if p.suffix in (".py", ".md")] + [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
_CITED_DOC = re.compile(r"(?<![\w/.])((?:\.\./|[\w-]+/)*[\w-]+\.md)\b")


def test_nothing_cites_a_file_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _SOURCES
               for m in re.finditer(r"\.\./shared|shared/\w+\.md|NOTES-[\w-]+\.md", p.read_text())]
    assert not outside, "\n".join(outside)


def test_every_cited_document_exists():
    missing = []
    for path in _SOURCES:
        if path.name == "test_docs.py":
            continue
        for m in _CITED_DOC.finditer(path.read_text()):
            name = m.group(1)
            if not any((base / name).exists() for base in (ROOT, path.parent, ROOT / "docs")):
                missing.append(f"{path.relative_to(ROOT)} cites {name}")
    assert not missing, "\n".join(missing)


# every package a library user imports: a protocol error says when it is raised, a wire message who
# sends it and when, an event or a state what it means
PACKAGES = ["protocol", "wallet", "wallet.chain", "node", "node.net", "node.provider", "node.provider.backends", "node.consumer",
            "node.escrow", "node.api", "node.daemon", "node.chain"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_class_has_a_docstring(name):
    pkg = importlib.import_module(name)
    bare = []
    for export in pkg.__all__:
        obj = getattr(pkg, export)
        if not inspect.isclass(obj) or obj.__module__.split(".")[0] not in ("protocol", "wallet", "node"):
            continue  # functions, constants, and classes of other projects re-exported for convenience
        if not (obj.__doc__ or "").strip() or obj.__doc__ == _dataclass_doc(obj):
            bare.append(export)
    assert not bare, f"{name}: public classes without a docstring: {', '.join(bare)}"


def _dataclass_doc(cls: type) -> str | None:
    """The docstring ``dataclasses`` invents for an undocumented dataclass (its signature)."""
    try:
        return cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
    except (TypeError, ValueError):
        return None
