"""Each package's public API is its __all__: every name exists, appears once, and the
implementation modules are private (underscore)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["protocol", "wallet", "node"])
def test_all_is_complete_and_unique(name):
    pkg = importlib.import_module(name)
    assert len(pkg.__all__) == len(set(pkg.__all__)), "a name is exported twice"
    for export in pkg.__all__:
        assert hasattr(pkg, export), f"{name}.{export} is in __all__ but missing"


PUBLIC_MODULES = {"node/daemon.py"}  # the CLI's way into a daemon


@pytest.mark.parametrize("name", ["protocol", "wallet", "node"])
def test_modules_are_private(name):
    for path in (ROOT / name).rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        assert path.name == "__init__.py" or path.name.startswith("_") or rel in PUBLIC_MODULES, f"{rel} should be private"


def test_every_protocol_error_and_message_is_exported():
    import protocol
    from protocol import _codec

    kinds = {cls.__name__ for versions in _codec._REGISTRY.values() for cls in versions.values()}
    assert kinds <= set(protocol.__all__)
