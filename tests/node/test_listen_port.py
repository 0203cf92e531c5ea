"""A listen port is never shared: a second host on a taken port fails with a clear OSError
(fix 11 in node/net/_libp2p_fixes.py: no SO_REUSEPORT), and a bad listen address is a ValueError."""

from __future__ import annotations

import socket

import pytest
import trio

from node.net import _host
from node.net._host import open_host, peer_addrs
from tests.node.helpers import LOOPBACK
from tests.support import identity


def _port(host) -> int:
    return int(peer_addrs(host)[0].split("/tcp/")[1].split("/")[0])


async def test_listen_sockets_do_not_set_so_reuseport():
    async with open_host(identity("a"), LOOPBACK) as host:
        listener = next(iter(host.get_network().listeners.values()))
        for sock_listener in listener.listeners:
            assert sock_listener.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


async def test_a_second_host_on_a_taken_port_fails_even_past_the_probe(monkeypatch):
    # the probe bind (_check_bindable) races with another process: the listener's own bind must refuse
    monkeypatch.setattr(_host, "_check_bindable", lambda addr: None)
    async with open_host(identity("first"), LOOPBACK) as first:
        taken = f"/ip4/127.0.0.1/tcp/{_port(first)}"
        with pytest.raises(OSError, match="cannot listen on /ip4/127.0.0.1/tcp/"):
            async with open_host(identity("second"), [taken]):
                pass  # pragma: no cover - the port is taken


async def test_a_port_taken_by_another_program_is_named():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError) as caught:
            async with open_host(identity("late"), [f"/ip4/127.0.0.1/tcp/{port}"]):
                pass  # pragma: no cover
    assert f"/tcp/{port}" in caught.value.strerror and "another process" in caught.value.strerror


@pytest.mark.parametrize("addr", ["garbage", "/ip4/127.0.0.1/udp/4001", "/dns4/example.com/tcp/1"])
async def test_a_bad_listen_address_is_a_value_error(addr):
    with pytest.raises(ValueError, match="not a listen address"):
        async with open_host(identity("bad"), [addr]):
            pass  # pragma: no cover
    await trio.lowlevel.checkpoint()
