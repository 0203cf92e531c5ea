"""Everything that does I/O, one subpackage per role (docs/DESIGN.md, "node/, by role"):
``net``, ``provider``, ``consumer``, ``escrow``, ``api``, composed by ``_node.open_node``. The
embeddable entry point is ``open_swarm``; the CLI's is ``node.daemon``. Every error node raises on
purpose is a ``NodeError``: a ``LocalError`` (the caller's or this node's fault) or a
``RemoteError`` (a peer refused or broke).

Importing this package stays light (the CLI imports it for every command); ``open_swarm`` and
the swarm types load the networking stack on first use.
"""

from typing import Any as _Any

from ._errors import InvalidRequest, LocalError, NodeError, RemoteError
from ._home import HOME_ENV, ConfigError, Home, init_home, resolve_home

__all__ = [
    "HOME_ENV",
    "ConfigError",
    "Home",
    "init_home",
    "resolve_home",
    "NodeError",
    "LocalError",
    "RemoteError",
    "InvalidRequest",
    "open_swarm",
    "Swarm",
    "SwarmSession",
]


def __getattr__(name: str) -> _Any:
    if name in ("open_swarm", "Swarm", "SwarmSession"):
        from . import _swarm

        return getattr(_swarm, name)
    raise AttributeError(f"module 'node' has no attribute {name!r}")
