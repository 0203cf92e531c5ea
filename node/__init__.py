"""Everything that does I/O: the libp2p host, market, sessions, backends, escrow service,
HTTP API and daemon lifecycle. The embeddable entry point is ``open_swarm``.

Importing this package stays light (the CLI imports it for every command); ``open_swarm`` and
the swarm types load the networking stack on first use.
"""

from typing import Any as _Any

from ._home import HOME_ENV, ConfigError, Home, init_home, resolve_home

__all__ = ["HOME_ENV", "ConfigError", "Home", "init_home", "resolve_home", "open_swarm", "Swarm", "SwarmSession"]


def __getattr__(name: str) -> _Any:
    if name in ("open_swarm", "Swarm", "SwarmSession"):
        from . import _swarm

        return getattr(_swarm, name)
    raise AttributeError(f"module 'node' has no attribute {name!r}")
