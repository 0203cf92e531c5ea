"""The escrow client every node uses: ``EscrowClient.call`` sends one signed request to an
agent — this node's own when it is one, without a stream — and checks that the answer is signed
by that agent and answers that request. Dial failures of every kind become ``EscrowUnreachable``,
naming their cause. The agent is dialled through the host's dialer (``node.net._dial``): an explicit
address first, then the peerstore's, then fresh ones from the DHT, within the call's timeout, so an
agent restarted (on its port or a new one) is reached again in seconds.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

import protocol
from protocol import ESCROW_PROTOCOL
from wallet import EscrowAgent

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from .._errors import RemoteError
from ..net._dial import DialFailed, describe, dialer
from ..net._host import ESCROW_STREAMS_PER_PEER, parse_peer_addr
from ..net._streams import FramedStream, StreamClosed

__all__ = ["EscrowClient", "EscrowUnreachable", "REQUESTS_PER_AGENT"]

#: requests this node has in flight to one agent at once; the rest wait their turn (inside their
#: timeout). Below the agent's per-peer stream cap, which resets the streams past it: a burst of
#: channel opens or claims queues here instead of failing there (a closed stream is counted by the
#: agent until it sees the close).
REQUESTS_PER_AGENT = ESCROW_STREAMS_PER_PEER - 2
_MAX_AGENT_GATES = 256


class EscrowUnreachable(RemoteError):
    """The escrow agent could not be reached or gave no valid answer."""


class EscrowClient:
    """Sends this node's signed escrow requests to agents."""

    def __init__(self, host: IHost, local_agent: EscrowAgent | None = None, dht: Any = None,
                 clock: WallClock = SYSTEM_WALL_CLOCK) -> None:
        self.host = host
        self.local_agent = local_agent
        self.dht = dht
        self.clock = clock
        self._local_lock = trio.Lock()
        self._gates: dict[str, trio.CapacityLimiter] = {}

    def _gate(self, peer_id: str) -> trio.CapacityLimiter:
        gate = self._gates.get(peer_id)
        if gate is None:
            if len(self._gates) >= _MAX_AGENT_GATES:  # forget idle ones: agents come and go
                for key in [k for k, g in self._gates.items() if g.borrowed_tokens == 0]:
                    del self._gates[key]
            gate = self._gates[peer_id] = trio.CapacityLimiter(REQUESTS_PER_AGENT)
        return gate

    def resolve(self, agent: str | None) -> tuple[str, PeerInfo | None]:
        """``(peer id, dialable info or None)`` of an agent given as a peer id or a …/p2p/ address;
        ``None`` means this node's own agent.

        Raises:
            ValueError: no agent named and this node runs none; or a malformed peer.
        """
        if agent is None:
            if self.local_agent is None:
                raise ValueError("name the escrow agent (--escrow PEER): this node does not run one")
            return self.local_agent.identity.peer_id, None
        if agent.startswith("/"):
            info = parse_peer_addr(agent)
            return info.peer_id.to_base58(), info
        protocol.public_key_from_peer_id(agent)
        return agent, None

    async def call(self, agent: str | None, request: Any, timeout: float = 30.0) -> protocol.EscrowResponse:
        """Send ``request`` to ``agent`` and return its verified answer.

        Raises:
            EscrowUnreachable: no route, no answer, or an answer that is not the agent's.
            ValueError: a malformed agent name.
        """
        peer_id, info = self.resolve(agent)
        if self.local_agent is not None and peer_id == self.local_agent.identity.peer_id:
            async with self._local_lock:
                response = await trio.to_thread.run_sync(self.local_agent.handle, request, int(self.clock()))
        else:
            response = await self._remote(peer_id, info, request, timeout)
        if response.request_id != request.request_id or response.agent != peer_id:
            raise EscrowUnreachable("the answer is not for this request or not from this agent")
        try:
            protocol.verify(response, "sig", protocol.public_key_from_peer_id(peer_id))
        except protocol.BadSignature as exc:
            raise EscrowUnreachable("the answer is not signed by the agent") from exc
        return response

    async def _remote(self, peer_id: str, info: PeerInfo | None, request: Any, timeout: float) -> protocol.EscrowResponse:
        pid = ID.from_base58(peer_id)
        addrs = list(info.addrs) if info is not None else []  # an explicit address is tried first
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_after(timeout):
                async with self._gate(peer_id):
                    try:
                        return await self._exchange(pid, addrs, request, deadline)
                    except (StreamClosed, protocol.ProtocolError, DialFailed):
                        raise
                    except Exception:  # a connection that died under us (the agent restarted): dial afresh, once
                        await self.host.disconnect(pid)
                        return await self._exchange(pid, addrs, request, deadline)
        except trio.TooSlowError as exc:
            cause = dialer(self.host).last_failure.get(peer_id)
            raise EscrowUnreachable(f"escrow agent {peer_id} did not answer within {timeout:.0f}s"
                                    + (f" (dialling it: {cause})" if cause else "")) from exc
        except DialFailed as exc:
            raise EscrowUnreachable(f"escrow agent {peer_id} unreachable: {exc}") from exc
        except (StreamClosed, protocol.ProtocolError) as exc:
            raise EscrowUnreachable(f"escrow agent {peer_id} gave no valid answer: {describe(exc)}") from exc
        except Exception as exc:  # libp2p stream errors come in many types
            raise EscrowUnreachable(f"escrow agent {peer_id} unreachable: {describe(exc)}") from exc

    async def _exchange(self, pid: ID, addrs: list, request: Any, deadline: float) -> protocol.EscrowResponse:
        await dialer(self.host).dial(pid, addrs, deadline=deadline)  # at once when connected
        framed = FramedStream(await self.host.new_stream(pid, [ESCROW_PROTOCOL]))
        try:
            await framed.send(request)
            return await framed.receive(expect=(protocol.EscrowResponse,))
        finally:
            await framed.close()
