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


PINNED = ["protocol", "wallet", "node", "node.daemon", "node.net", "node.provider", "node.provider.backends",
          "node.consumer", "node.escrow", "node.api"]


@pytest.mark.parametrize("name", PINNED)
def test_all_is_exactly_the_public_namespace(name):
    """The httpx way: every public name a package holds is in ``__all__``, and nothing else is."""
    import types

    pkg = importlib.import_module(name)
    public = {n for n, v in vars(pkg).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
              and n != "annotations"}
    lazy = {n for n in pkg.__all__ if n not in vars(pkg)}  # node's lazy names, served by its __getattr__
    assert public | lazy == set(pkg.__all__), f"{name}: not exported {sorted(public - set(pkg.__all__))}, " \
                                              f"exported but absent {sorted(set(pkg.__all__) - public - lazy)}"
    for n in lazy:
        assert getattr(pkg, n) is not None
