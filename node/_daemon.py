"""The daemon: ``run_daemon`` runs the node and its HTTP API until cancelled.

Lifecycle: the home's ``node.lock`` is taken (one daemon per home: a second start fails with
``HomeInUse`` naming the first one's pid, and touches nothing of the first's), the host listens, the market starts, offers from the config are published, the API
binds, then ``daemon.json`` ({peer_id, addrs, api_url, pid}) is written — its presence means
"ready". The API binds to loopback only (keyless or not), and answers only to a ``Host`` naming
loopback or the host it was told to bind (``node.api``'s guard). Cancelling ``run_daemon``
(SIGINT/SIGTERM in ``node start``) closes the API, the market's tasks, the DHT and gossip services
and the host with its connections, removes ``daemon.json`` if it is still the one this daemon
wrote, and releases the lock (the lock file stays).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Callable

import trio

from ._daemon_files import api_token, daemon_info_path, write_private
from ._home import Home

if TYPE_CHECKING:
    from wallet import Identity

    from ._node import Node

__all__ = ["run_daemon", "serve_node_api"]

_logger = logging.getLogger(__name__)


async def _serve_api(service: "Node", api: str, token: str, openai_keyless: bool = False, *,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    import hypercorn.config
    import hypercorn.trio

    from .api import build_app

    config = hypercorn.config.Config()
    config.bind = [api]
    config.accesslog = None
    config.errorlog = logging.getLogger("node.api")
    config.graceful_timeout = 1.0
    config.backlog = 1024  # hypercorn's 100 reset connections of a 1,000-call burst before any was read
    app = build_app(service, token, openai_keyless=openai_keyless, hosts=(_api_host(api),),
                    x402=service.config.x402 and service.chain is not None and not openai_keyless)
    await hypercorn.trio.serve(app, config, task_status=task_status)


def _api_host(api: str) -> str:
    """The host part of ``HOST:PORT`` (an IPv6 literal without its brackets)."""
    return api.rsplit(":", 1)[0].strip("[]")


def _check_loopback_api(api: str) -> None:
    """Raises ValueError unless ``api`` is ``HOST:PORT`` with a port (0 to 65535) on a loopback
    address or ``localhost``."""
    port = api.rsplit(":", 1)[1] if ":" in api else ""
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"the API address must be HOST:PORT on loopback (e.g. 127.0.0.1:8080), not {api!r}")
    host = _api_host(api)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"the API listens on loopback only, not {api!r}")


async def run_daemon(
    home: Home,
    identity: "Identity",
    *,
    listen: tuple[str, ...] | None = None,
    bootstrap: tuple[str, ...] = (),
    api: str | None = None,
    accept_escrow: tuple[str, ...] = (),
    escrow: bool = False,
    announce: tuple[str, ...] = (),
    relay: bool = False,
    api_key: Callable[[str], str] | None = None,
    openai_keyless: bool = False,
    mdns: bool = False,
    chain: str | None = None,
    x402: bool = False,
    devnet: bool = False,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the node and its HTTP API until cancelled. ``task_status.started`` receives the daemon info.

    Raises:
        ConfigError: a bad config file. ValueError: a bad address. OSError: cannot listen.
        HomeInUse: another node runs on this home (its pid in the message).
        wallet.LedgerError: with ``escrow``, the ledger cannot be opened (not a database, damaged
            where opening reads, a disk that refuses its first writes): one line, ``node start``
            prints it as its error. A ledger that opens but fails its integrity check does not
            stop the node: its agent refuses money operations (``ledger_damaged``).
    """
    from ._node import open_node, resolve_config

    if devnet and chain:
        raise ValueError("--devnet runs the chain this node settles on: it cannot go with --chain")
    config = resolve_config(home, listen, bootstrap, api, accept_escrow, announce, relay,
                            chain or ("evm:embedded" if devnet else None), x402)
    _check_loopback_api(config.api)
    if openai_keyless and config.x402:
        raise ValueError("--openai-keyless serves every call without payment: it cannot go with --x402 "
                         "(x402 is for callers without the token)")
    async with trio.open_nursery() as nursery:
        if devnet:  # a JSON-RPC chain for other daemons and wallets to share; this node settles on it too
            from .chain import Devnet, serve_devnet

            shared = await trio.to_thread.run_sync(Devnet, identity)
            await nursery.start(serve_devnet, shared)
            config = dataclasses.replace(config, chain=shared.spec)
        async with open_node(home, identity, config, escrow=escrow, api_key=api_key, mdns=mdns) as service:
            token = api_token(home, create=True)  # under open_node's hold of the home's lock
            await serve_node_api(service, config.api, token, openai_keyless=openai_keyless, info_file=True,
                                 task_status=task_status)


async def serve_node_api(service: "Node", api: str, token: str, *, openai_keyless: bool = False,
                         info_file: bool = False, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the node's HTTP API until cancelled; ``task_status.started`` gets the node's info.

    Raises:
        ValueError: ``api`` is not a loopback address (keyless or not, the API is loopback only).
    """
    from .net import peer_addrs

    _check_loopback_api(api)
    info_path = daemon_info_path(service.home)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(_serve_api, service, api, token, openai_keyless)
        service.api.url = binds[0]
        info = {"peer_id": service.identity.peer_id, "addrs": peer_addrs(service.host), "api_url": service.api_url,
                "pid": os.getpid()}
        if service.chain is not None:
            info["chain"] = str(service.chain.spec)
        if service.config.x402 and service.chain is not None and not openai_keyless:
            info["x402"] = f"{service.chain.network} (token {service.chain.chain.deployment.token}, paid to " \
                           f"{service.chain.address})"
            if service.chain.faucet:
                info["x402"] += "; a devnet: anyone who reaches it can mint the tokens that pay you"
        if info_file:
            write_private(info_path, json.dumps(info, indent=2).encode() + b"\n")
        try:
            task_status.started(info)
            await trio.sleep_forever()
        finally:
            if info_file:
                _remove_if_ours(info_path)
            nursery.cancel_scope.cancel()


def _remove_if_ours(info_path: Any) -> None:
    """Remove ``daemon.json`` if it still names this process: never another daemon's."""
    try:
        if json.loads(info_path.read_text()).get("pid") != os.getpid():
            return
    except (OSError, ValueError, AttributeError):
        return
    info_path.unlink(missing_ok=True)

