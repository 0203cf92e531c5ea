"""Each package's public API is its __all__: every name exists, appears once, the implementation
modules are private (underscore), and (the httpx way) ``__all__`` is exactly the public names the
package holds, sorted."""

from __future__ import annotations

import importlib
import types
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


PINNED = ["protocol", "wallet", "wallet.chain", "node", "node.daemon", "node.net", "node.provider", "node.provider.backends",
          "node.consumer", "node.escrow", "node.api", "node.reputation", "node.insight", "node.chain"]


@pytest.mark.parametrize("name", PINNED)
def test_all_is_exactly_the_public_namespace(name):
    """The httpx way: ``__all__`` is every public name the package holds, nothing else, sorted.

    Public: not underscored, not a submodule, not ``annotations`` (``from __future__``). Names a
    module serves lazily from its ``__getattr__`` (node's ``open_swarm``, ``Swarm``,
    ``SwarmSession``) count as held when ``__all__`` lists them and they resolve.
    """
    pkg = importlib.import_module(name)
    held = {n for n, v in vars(pkg).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
            and n != "annotations"}
    lazy = {n for n in pkg.__all__ if n not in vars(pkg) and getattr(pkg, n, None) is not None}
    expected = sorted(held | lazy, key=str.casefold)
    assert pkg.__all__ == expected, (f"{name}: not exported {sorted(held - set(pkg.__all__))}, exported but "
                                     f"absent {sorted(set(pkg.__all__) - held - lazy)}, or out of casefold order")
