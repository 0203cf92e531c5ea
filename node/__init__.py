"""Everything that does I/O, one subpackage per role (docs/DESIGN.md, "node/, by role"):
``net``, ``provider``, ``consumer``, ``escrow``, ``api``, composed by ``_node.open_node``. The
embeddable entry point is ``open_swarm``; the CLI's is ``node.daemon``. Every error node raises on
purpose is a ``NodeError``: a ``LocalError`` (the caller's or this node's fault) or a
``RemoteError`` (a peer refused or broke).

    net/, provider/, consumer/, escrow/, api/   the roles (each package draws its own modules)
    _node           the composition root: open_node builds and wires every part, yields Node
    _swarm          open_swarm: a whole node embedded in a trio program, without the HTTP API
    daemon          the CLI's way in: run_daemon, run_demo, serve_node_api, the daemon's files
    _daemon         run_daemon: the node and its HTTP API until cancelled; daemon.json means ready
    _daemon_files   daemon.json and api.token in the home (light: the CLI reads them)
    _demo           ``node demo``: a whole market on loopback in one process
    _home           the home directory: keystore, config and runtime files; init_home
    _config         config.toml: read and checked at start, edited when offers change
    _contracts      fixed-rate contracts and the capacity they reserve for named clients
    _receipts       every doubly-signed receipt, kept by both sides (SQLite)
    _clock          the one clock rule: trio's clock for durations, an injected WallClock for dates
    _errors         NodeError: Local vs Remote, and which errors are refusals, closings, breakages

Importing this package stays light (the CLI imports it for every command); ``open_swarm`` and
the swarm types load the networking stack on first use.
"""

from typing import Any as _Any

from ._errors import InvalidRequest, LocalError, NodeError, RemoteError
from ._home import HOME_ENV, ConfigError, Home, HomeInUse, init_home, resolve_home

__all__ = [
    "ConfigError",
    "Home",
    "HOME_ENV",
    "HomeInUse",
    "init_home",
    "InvalidRequest",
    "LocalError",
    "NodeError",
    "open_swarm",
    "RemoteError",
    "resolve_home",
    "Swarm",
    "SwarmSession",
]


def __getattr__(name: str) -> _Any:
    if name in ("open_swarm", "Swarm", "SwarmSession"):
        from . import _swarm

        return getattr(_swarm, name)
    raise AttributeError(f"module 'node' has no attribute {name!r}")
