"""The daemon's runtime files in the home: ``daemon.json`` (present while a daemon is ready)
and ``api.token`` (the control API's bearer token). Light to import: the CLI reads them."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ._errors import LocalError
from ._home import Home

__all__ = ["DaemonNotRunning", "write_private", "api_token", "read_daemon_info", "daemon_info_path"]


class DaemonNotRunning(LocalError):
    """No ready daemon for this home."""


def write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def api_token(home: Home, create: bool = False) -> str:
    """The control API's bearer token (created on first daemon start).

    Raises:
        DaemonNotRunning: no token yet and ``create`` is false.
    """
    path = home.path / "api.token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if not create:
            raise DaemonNotRunning(f"no API token in {home.path} (start the node with `node start`)") from None
    token = secrets.token_urlsafe(32)
    write_private(path, token.encode() + b"\n")
    return token


def read_daemon_info(home: Home) -> dict[str, Any]:
    """The running daemon's ``daemon.json``.

    Raises:
        DaemonNotRunning: absent, unreadable, or its process is gone.
    """
    path = home.path / "daemon.json"
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (FileNotFoundError, ValueError, KeyError, TypeError, ProcessLookupError) as exc:
        raise DaemonNotRunning(f"no running node for {home.path} (start one with `node start`)") from exc
    except PermissionError:
        pass  # the process exists under another user
    return info


def daemon_info_path(home: Home) -> Path:
    return home.path / "daemon.json"
