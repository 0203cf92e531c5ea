"""Fix 13: a direct connection that appears beside a relayed one (DCUtR) is kept; py-libp2p's
per-peer trim (max_connections_per_peer=1) closed the newcomer, which had the fewest streams."""

from __future__ import annotations

import types

import pytest
from libp2p.connection_types import ConnectionType
from libp2p.network.swarm import Swarm

from node.net import _libp2p_fixes as fixes
from node.net._host import HostLimits


class Conn:
    def __init__(self, kind: ConnectionType, streams: int, created: float) -> None:
        self.kind, self.streams, self._created_at = kind, [object()] * streams, created
        self.muxed_conn = types.SimpleNamespace(peer_id="peer")

    def get_connection_type(self) -> ConnectionType:
        return self.kind

    def get_streams(self):
        return tuple(self.streams)


def swarm_with(conns):
    closed = []
    swarm = types.SimpleNamespace(
        connections={"peer": list(conns)}, connection_config=HostLimits().connection_config(),
        tag_store=types.SimpleNamespace(is_protected=lambda peer: False),
        manager=types.SimpleNamespace(run_task=lambda fn, conn: closed.append(conn)),
        cleanup_connection_health=lambda peer, conn: None, _close_connection_async=None,
    )
    return swarm, closed


@pytest.mark.parametrize("fixed", [True, False])
def test_a_new_direct_connection_beside_a_busy_relayed_one_is_kept(fixed):
    relayed = Conn(ConnectionType.RELAYED, streams=2, created=1.0)  # carries a session
    direct = Conn(ConnectionType.DIRECT, streams=0, created=2.0)  # DCUtR's, just made
    swarm, closed = swarm_with([relayed, direct])
    trim = fixes._trim_by_kind if fixed else fixes._original_trim
    trim(swarm, "peer")
    if fixed:
        assert closed == [] and swarm.connections["peer"] == [relayed, direct]
    else:  # what py-libp2p 0.8.1 does: the direct one goes
        assert closed == [direct]


def test_extra_connections_of_one_kind_are_still_trimmed():
    fixes.apply()
    assert Swarm._trim_connections is fixes._trim_by_kind
    d1, d2 = Conn(ConnectionType.DIRECT, 1, 1.0), Conn(ConnectionType.DIRECT, 0, 2.0)
    r1, r2 = Conn(ConnectionType.RELAYED, 0, 1.0), Conn(ConnectionType.RELAYED, 3, 2.0)
    swarm, closed = swarm_with([d1, r1, d2, r2])
    fixes._trim_by_kind(swarm, "peer")
    assert set(map(id, closed)) == {id(d2), id(r1)}
    assert swarm.connections["peer"] == [d1, r2]
