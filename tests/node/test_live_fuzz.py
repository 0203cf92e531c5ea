"""A bounded live fuzz of our own protocols: a hostile in-process host sends random bytes,
mutated valid frames and well-formed messages out of order on ``/inferswarm/session/1.0.0`` and
``/inferswarm/escrow/1.0.0`` to a real provider and a real escrow agent, then an honest consumer
still rents and pays exactly. (Garbage on py-libp2p's own protocols: tests/node/test_garbage.py;
the decoders alone: tests/protocol/test_decoder_fuzz.py.)"""

from __future__ import annotations

import random
import secrets
import time
from typing import Any

import trio

import protocol
from node.net._host import open_host, parse_peer_addr, peer_addrs
from node.provider._offers import Offer
from protocol import ESCROW_PROTOCOL, SESSION_PROTOCOL
from tests.node.helpers import LOOPBACK
from tests.node.session_rig import ScriptedBackend, session_rig
from tests.support import identity

USER = [{"role": "user", "content": "hi"}]
ROUNDS = 120


def samples(rig: Any, attacker: Any, rng: random.Random) -> list[bytes]:
    """Valid messages of every session and escrow kind, signed by the attacker, framed."""
    now = int(time.time())
    sid = secrets.token_bytes(16)
    grant = protocol.sign(protocol.ChannelGrant(agent=attacker.peer_id, channel_id=sid, consumer=attacker.peer_id,
                                                provider=rig.provider_id, cap=1 << 40, expires_at=now + 3600),
                          "sig", attacker)
    price = protocol.Price(input_per_1k=0, output_per_1k=0)
    msgs = [
        protocol.sign(protocol.Open(session_id=sid, consumer=attacker.peer_id, provider=rig.provider_id, model="m",
                                    listing_seq=1, price=price, channel=grant, spend_limit=1 << 40, issued_at=now),
                      "sig", attacker),
        protocol.Request(session_id=sid, call_seq=rng.randrange(3), messages=(protocol.ChatMessage("user", "x"),),
                         max_tokens=rng.randrange(1 << 24)),
        protocol.CounterSign(session_id=sid, call_seq=0, receipt_hash=bytes(32), consumer_sig=bytes(64)),
        protocol.sign(protocol.Close(session_id=sid, by=attacker.peer_id, reason="done", last_receipt_hash=bytes(32),
                                     cumulative=rng.randrange(1 << 30), issued_at=now), "sig", attacker),
        protocol.sign(protocol.EscrowQuery(request_id=secrets.token_bytes(16), party=attacker.peer_id,
                                           issued_at=now, channel_id=sid), "sig", attacker),
        protocol.sign(protocol.EscrowMint(request_id=secrets.token_bytes(16), party=attacker.peer_id,
                                          to=attacker.peer_id, amount=1 << 30, issued_at=now), "sig", attacker),
        protocol.Chunk(session_id=sid, call_seq=0, index=0, text="x" * rng.randrange(4096), tokens=0),
    ]
    return [protocol.frame(protocol.encode(m)) for m in msgs]


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 256))
    if kind == 1:  # flip bits
        b = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:  # cut short
        return data[: rng.randrange(len(data))]
    if kind == 3:  # a huge length prefix, then a little
        return protocol.encode_varint(rng.randrange(1 << 21, 1 << 40)) + rng.randbytes(16)
    return data  # as it is: right bytes, wrong moment


async def test_random_and_out_of_order_frames_leave_provider_and_agent_serving():
    rng = random.Random(11)
    offer = Offer(model="m", backend="builtin", input_price=500_000, output_price=1_500_000, max_context=2048,
                  max_concurrent=4)
    async with session_rig({"m": offer}, {"m": ScriptedBackend()}, tag="livefuzz", open_timeout_s=1.0,
                           session_idle_s=2.0) as rig:
        attacker = identity("livefuzz-attacker")
        async with open_host(attacker, LOOPBACK) as host:
            await host.connect(parse_peer_addr(peer_addrs(rig.provider_host)[0]))
            await host.connect(parse_peer_addr(rig.agent_addr))
            targets = [(rig.provider_host.get_id(), SESSION_PROTOCOL),
                       (parse_peer_addr(rig.agent_addr).peer_id, ESCROW_PROTOCOL)]
            frames = samples(rig, attacker, rng)
            sent = 0
            for i in range(ROUNDS):
                peer, proto = targets[i % 2]
                try:
                    stream = await host.new_stream(peer, [proto])
                except Exception:  # a stream refused now (a per-peer cap) is a fine answer
                    continue
                try:
                    for _ in range(rng.randrange(1, 4)):
                        await stream.write(mutate(rng.choice(frames), rng))
                        sent += 1
                    with trio.move_on_after(0.2):
                        await stream.read(1 << 16)
                    await stream.reset()
                except Exception:  # reset by the node: the right answer to garbage
                    pass
            assert sent >= ROUNDS
        # the honest consumer rents and pays exactly; the fuzz moved no money
        async with rig.session(await rig.open_channel(cap=100_000)) as session:
            r = (await session.call(USER, 8)).receipt
        assert rig.balance(rig.provider_id).available == r.cumulative
        assert rig.balance(rig.consumer_ops.identity.peer_id) == protocol.Balance(available=10_000_000 - r.cumulative,
                                                                                 locked=0)
        assert rig.balance(attacker.peer_id) == protocol.Balance(available=0, locked=0)
        rig.agent.check()
