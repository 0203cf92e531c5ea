"""In-process hostile peers for the resource-bound tests: throwaway identities dialled straight
through py-libp2p's transport and upgrader (no host, no identify, no DHT of their own), raw DHT
messages, half-open TCP sockets, and what a victim holds (RSS, its sockets)."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

import multiaddr
import trio
import varint
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader

KAD = "/ipfs/kad/1.0.0"


def rss_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def sockets_on_port(port: int) -> int:
    """Open fds of this process that are TCP sockets with local ``port`` (a listener's accepted sockets)."""
    inodes = set()
    for name in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except FileNotFoundError:
            continue
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            n += 1
    return n - 1  # the listener itself


def port_of(host) -> int:
    return int(host.get_addrs()[0].value_for_protocol("tcp"))


class Hostile:
    """Dials a victim under fresh identities; everything it opens is closed when its block ends."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.conns: list[Yamux] = []
        self.ids: dict[int, ID] = {}  # id(connection) -> the throwaway identity it speaks as
        self.sockets: list[trio.SocketStream] = []

    async def connect(self, victim, key_pair=None) -> Yamux:
        """One authenticated Noise + Yamux connection from a new throwaway identity (or ``key_pair``'s)."""
        key_pair = key_pair or create_new_key_pair()
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        upgrader = TransportUpgrader({NOISE_PROTOCOL_ID: noise}, {YAMUX_PROTOCOL_ID: Yamux})
        addr = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port_of(victim)}")
        raw = await TCP().dial(addr)
        secured = await upgrader.upgrade_security(raw, True, victim.get_id())
        muxed = await upgrader.upgrade_connection(secured, victim.get_id())
        self._nursery.start_soon(muxed.start)
        self._nursery.start_soon(self._refuse_streams, muxed)
        await muxed.event_started.wait()
        self.conns.append(muxed)
        self.ids[id(muxed)] = ID.from_pubkey(key_pair.public_key)
        return muxed

    async def _refuse_streams(self, muxed: Yamux) -> None:
        """Reset whatever the victim opens to us (identify, gossip): we speak nothing back."""
        try:
            while True:
                stream = await muxed.accept_stream()
                await stream.reset()
        except Exception:
            return

    @staticmethod
    async def open(muxed: Yamux, protocol: str):
        """A stream on ``muxed`` with ``protocol`` negotiated."""
        stream = await muxed.open_stream()
        await MultiselectClient().select_one_of([protocol], MultiselectCommunicator(stream))
        return stream

    async def half_open(self, victim, n: int) -> None:
        """``n`` TCP connections that never start a handshake."""
        for _ in range(n):
            self.sockets.append(await trio.open_tcp_stream("127.0.0.1", port_of(victim)))

    async def close(self) -> None:
        async def close_one(conn: Yamux) -> None:
            try:
                await conn.close()
            except Exception:  # the victim closed it already
                pass

        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for s in self.sockets:
                await s.aclose()
            async with trio.open_nursery() as nursery:  # each Yamux close idles 0.1 s
                for c in self.conns:
                    nursery.start_soon(close_one, c)


@asynccontextmanager
async def hostile() -> AsyncIterator[Hostile]:
    async with trio.open_nursery() as nursery:
        peer = Hostile(nursery)
        try:
            yield peer
        finally:
            await peer.close()
            nursery.cancel_scope.cancel()


async def send_kad(stream, message: Message) -> bytes | None:
    """Write one varint-prefixed DHT message; return the reply's bytes if one comes within 2 s."""
    data = message.SerializeToString()
    try:
        await stream.write(varint.encode(len(data)) + data)
    except Exception:  # the victim reset the stream before reading it all: the answer to a refusal
        return None
    with trio.move_on_after(2):
        try:
            return await stream.read(1 << 16)
        except Exception:
            return None
    return None


def put_value(key: bytes, value: bytes) -> Message:
    msg = Message()
    msg.type = Message.MessageType.PUT_VALUE
    msg.key = key
    msg.record.key = key
    msg.record.value = value
    return msg


def add_provider(key: bytes, peer: ID) -> Message:
    msg = Message()
    msg.type = Message.MessageType.ADD_PROVIDER
    msg.key = key
    provider = msg.providerPeers.add()
    provider.id = peer.to_bytes()
    provider.addrs.append(multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9").to_bytes())
    return msg
