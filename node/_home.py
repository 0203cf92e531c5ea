"""The node's home directory: where its keystore, config and runtime files live.

Layout (mode 0700):
    keystore.json   encrypted identity and upstream API keys (wallet.Keystore), mode 0600
    config.toml     the operator's settings (comments preserved when the node edits it)
    *.db (-wal, -shm)  receipts (with the claims the agent confirmed and the receipts in doubt),
                    trust and the escrow agent's ledger (sqlite)
    escrow.db.lock  held by the node that has the ledger open (``node escrow check`` refuses then)
    node.lock       held (``flock``) by the one node running on this home, for its whole life; it names
                    that node's pid. Never deleted: a lock file removed while held locks nothing
    escrow-backups/ verified online backups of the ledger (hourly and at a clean stop; the last 24)
    api.token, daemon.json   the daemon's runtime files
    peers.json      the peers this node was last connected to, dialled at start (a hint, rewritten)
The home is ``--home`` if given, else ``$INFERSWARM_HOME``, else the platform's user data dir.

Rule: the home is private, whatever existed before. Opening one (``Home(path)``, as every entry
point does) makes its folders 0700 and every file in it 0600, without following links; a file
the node creates there later is created 0600 (``private_file`` before sqlite opens a database:
sqlite gives its -wal and -shm files the database's own mode).
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import socket
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import platformdirs
import tomlkit

from wallet import Keystore

from ._errors import LocalError

__all__ = ["HOME_ENV", "Home", "resolve_home", "init_home", "ConfigError", "HomeInUse", "hold_home", "secure_home",
           "private_file"]

_logger = logging.getLogger(__name__)

HOME_ENV = "INFERSWARM_HOME"

_DEFAULT_CONFIG = """\
# Inferswarm node configuration. `node offer add|rm` edits [[offers]]; comments are kept.

[node]
# libp2p listen addresses (TCP; Noise and Yamux are always used). The port was picked free at
# `node init` and stays across restarts, so peers find this node where they last saw it; tcp/0
# takes a new port at every start.
listen = ["/ip4/0.0.0.0/tcp/{port}"]
# peers to join the network through, e.g. "/ip4/203.0.113.5/tcp/4001/p2p/12D3KooW..."
bootstrap = []
# the local HTTP API (control + OpenAI-compatible); loopback only
api = "127.0.0.1:0"
# escrow agents (peer ids) this node's offers accept
accept_escrow = []
"""


class ConfigError(LocalError):
    """The config file is unreadable or holds a value of the wrong shape."""


class HomeInUse(LocalError):
    """Another node (another process) runs on this home.

    Attributes:
        pid: that process's id, when its lock file names one.
    """

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


def resolve_home(explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The node home: ``explicit``, else ``$INFERSWARM_HOME``, else the user data dir."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit).expanduser()
    if env.get(HOME_ENV):
        return Path(env[HOME_ENV]).expanduser()
    return Path(platformdirs.user_data_dir("inferswarm", appauthor=False))


def _chmod(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode, follow_symlinks=False)
    except NotImplementedError:  # a platform that cannot chmod a link itself: links are skipped anyway
        os.chmod(path, mode)


def secure_home(path: Path) -> None:
    """Make the home ``path`` private: it and every folder in it 0700, every file 0600 (links are
    left alone, never followed). A home that does not exist yet is left for ``init_home``; what
    cannot be changed (someone else's file) is logged, not raised, so a read-only look still works."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        return
    todo = [path]
    while todo:
        folder = todo.pop()
        try:
            if stat.S_IMODE(os.lstat(folder).st_mode) != 0o700:
                _chmod(folder, 0o700)
            entries = list(os.scandir(folder))
        except OSError as exc:
            _logger.warning("cannot make %s private: %s", folder, exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and \
                        stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) != 0o600:
                    _chmod(Path(entry.path), 0o600)
            except OSError as exc:
                _logger.warning("cannot make %s private: %s", entry.path, exc)


def private_file(path: str | os.PathLike[str]) -> Path:
    """``path``, created empty with mode 0600 if absent, and made 0600 (with its sqlite ``-wal``,
    ``-shm`` and ``-journal`` companions, where they exist) if not. Call it before sqlite opens a
    database: sqlite creates a new file 0644, and its companions with the database's mode.

    Raises:
        OSError: the file cannot be created or its mode set.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        companion = path.with_name(path.name + suffix)
        if companion.is_file() and not companion.is_symlink():
            _chmod(companion, 0o600)
    return path


@dataclass(frozen=True)
class Home:
    """A node's home folder and the paths of what lives in it (keystore, config, runtime files).
    Constructing one makes an existing home private (``secure_home``)."""

    path: Path

    def __post_init__(self) -> None:
        secure_home(self.path)

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


#: where ``pick_listen_port`` looks: below Linux's ephemeral range (32768-60999), so no outbound
#: connection takes the port while the node is down
_PORT_RANGE = (20000, 32767)


def pick_listen_port(attempts: int = 64) -> int:
    """A TCP port free on every interface now, for the node to keep (``init_home``): a random one of
    ``_PORT_RANGE`` that binds, else one the OS picks."""
    rng = random.SystemRandom()
    for _ in range(attempts):
        port = rng.randint(*_PORT_RANGE)
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def init_home(path: Path, passphrase: str, **keystore_kwargs: Any) -> Keystore:
    """Create the home: directory (0700), a new keystore, and a default config if none (listening
    on a free TCP port picked now and kept across restarts: ``pick_listen_port``).

    Raises:
        wallet.KeystoreExists: the home already holds a keystore.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    home = Home(path)  # 0700 even if it existed with another mode
    ks = Keystore.create(home.keystore, passphrase, **keystore_kwargs)
    if not home.config.exists():
        fd = os.open(home.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_DEFAULT_CONFIG.format(port=pick_listen_port()))
    return ks


@contextmanager
def hold_home(home: Home) -> Iterator[None]:
    """Hold the home's ``node.lock`` (an exclusive ``flock``) for the block: one node per home,
    since two would share one keystore, receipts database and escrow ledger. The lock file holds
    the holder's pid, for the message of the next one to try; it is never deleted (the kernel
    drops the lock when the process ends, however it ends). Not re-entrant: a second node on the
    home in this same process (two ``open_swarm`` of one folder) is refused like another process's
    (each ``open`` is its own open file description, which ``flock`` tells apart).

    Raises:
        HomeInUse: another node holds it ("another node runs on this home (pid N)").
        OSError: the lock file cannot be created.
    """
    path = home.path / "node.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _lock_holder(fd)
        os.close(fd)
        raise HomeInUse(f"another node runs on {home.path}" + (f" (pid {pid})" if pid else "")
                        + ": stop it first, or use another --home", pid) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays


def _lock_holder(fd: int) -> int | None:
    """The pid written in a lock file (None if it holds none yet: its holder is just starting)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
