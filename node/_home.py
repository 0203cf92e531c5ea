"""The node's home directory: where its keystore, config and runtime files live.

Layout (mode 0700):
    keystore.json   encrypted identity and upstream API keys (wallet.Keystore), mode 0600
    config.toml     the operator's settings (comments preserved when the node edits it)
The home is ``--home`` if given, else ``$INFERSWARM_HOME``, else the platform's user data dir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import platformdirs
import tomlkit

from wallet import Keystore

from ._errors import LocalError

__all__ = ["HOME_ENV", "Home", "resolve_home", "init_home", "ConfigError"]

HOME_ENV = "INFERSWARM_HOME"

_DEFAULT_CONFIG = """\
# Inferswarm node configuration. `node offer add|rm` edits [[offers]]; comments are kept.

[node]
# libp2p listen addresses (TCP; Noise and Yamux are always used)
listen = ["/ip4/0.0.0.0/tcp/0"]
# peers to join the network through, e.g. "/ip4/203.0.113.5/tcp/4001/p2p/12D3KooW..."
bootstrap = []
# the local HTTP API (control + OpenAI-compatible); loopback only
api = "127.0.0.1:0"
# escrow agents (peer ids) this node's offers accept
accept_escrow = []
"""


class ConfigError(LocalError):
    """The config file is unreadable or holds a value of the wrong shape."""


def resolve_home(explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The node home: ``explicit``, else ``$INFERSWARM_HOME``, else the user data dir."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit).expanduser()
    if env.get(HOME_ENV):
        return Path(env[HOME_ENV]).expanduser()
    return Path(platformdirs.user_data_dir("inferswarm", appauthor=False))


@dataclass(frozen=True)
class Home:
    """A node's home folder and the paths of what lives in it (keystore, config, runtime files)."""

    path: Path

    @property
    def keystore(self) -> Path:
        return self.path / "keystore.json"

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    def is_initialised(self) -> bool:
        return self.keystore.exists()

    def load_config(self) -> dict[str, Any]:
        """The parsed config (an empty node section if the file is absent).

        Raises:
            ConfigError: not valid TOML.
        """
        try:
            doc = tomlkit.parse(self.config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"node": {}}
        except (tomlkit.exceptions.ParseError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.config}: {exc}") from exc
        data = doc.unwrap()
        if not isinstance(data.get("node", {}), dict):
            raise ConfigError(f"{self.config}: [node] must be a table")
        data.setdefault("node", {})
        return data


def init_home(path: Path, passphrase: str, **keystore_kwargs: Any) -> Keystore:
    """Create the home: directory (0700), a new keystore, and a default config if none.

    Raises:
        wallet.KeystoreExists: the home already holds a keystore.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    home = Home(path)
    ks = Keystore.create(home.keystore, passphrase, **keystore_kwargs)
    if not home.config.exists():
        fd = os.open(home.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_DEFAULT_CONFIG)
    return ks
