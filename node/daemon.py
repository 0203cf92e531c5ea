"""The daemon, as the CLI drives it — the one public module of ``node`` besides the package.

    run_daemon(home, identity, …)   the node and its HTTP API until cancelled (``node start``)
    run_demo(base, …)               a local market in one process (``node demo``, ``make run``)
    serve_node_api(node, …)         the HTTP API over a running node
    read_daemon_info(home)          {peer_id, addrs, api_url, pid} of the ready daemon of a home
    api_token(home)                 the control API's bearer token
    DaemonNotRunning                no ready daemon for the home (what the readers raise)
    HomeInUse                       another node runs on the home (``run_daemon`` raises it, naming the pid)

Light to import (every CLI command does): the networking stack loads when a daemon starts.
"""

from __future__ import annotations

from pathlib import Path as _Path
from typing import Any as _Any

from ._daemon import run_daemon, serve_node_api
from ._daemon_files import DaemonNotRunning, api_token, read_daemon_info
from ._home import HomeInUse

__all__ = ["api_token", "DaemonNotRunning", "HomeInUse", "read_daemon_info", "run_daemon", "run_demo", "serve_node_api"]


async def run_demo(base: _Path, providers: int = 3, once: bool = False, console: _Any = None
                   ) -> dict[str, _Any]:
    """``node demo``: a local market in one process, a paid chat, then the OpenAI API until cancelled."""
    from ._demo import run_demo as demo

    return await demo(base, providers, once, console)
