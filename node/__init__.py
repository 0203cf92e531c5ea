"""Everything that does I/O: the libp2p host, market, sessions, backends, escrow service,
HTTP API and daemon lifecycle. Today: the node home and its config."""

from ._home import HOME_ENV, ConfigError, Home, init_home, resolve_home

__all__ = ["HOME_ENV", "ConfigError", "Home", "init_home", "resolve_home"]
