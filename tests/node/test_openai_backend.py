"""The openai: backend against a real OpenAI-compatible server (`transformers serve` on the
builtin model's folder, loopback); its API key never leaves the provider's backend."""

from __future__ import annotations

import logging

import pytest

import protocol
from node.provider._offers import Offer
from node.provider.backends._openai import OpenAIBackend
from tests.node.session_rig import session_rig
from tests.node.upstream import transformers_serve

SECRET = "sk-test-1f8e1d2c3b4a59687766554433221100"


@pytest.fixture
def upstream():
    with transformers_serve() as server:
        yield server


async def test_openai_backend_meters_from_upstream_and_keeps_its_key(upstream, caplog):
    base_url, model = upstream
    caplog.set_level(logging.DEBUG)
    spec = f"openai:{base_url}#upstream"
    backend = OpenAIBackend.from_spec(spec, lambda name: {"upstream": SECRET}[name], model=model)
    assert SECRET not in repr(backend)
    the_offer = Offer(model=model, backend=spec, input_price=1_000_000, output_price=2_000_000, max_context=4096)
    listing_bytes = protocol.encode(protocol.sign(protocol.Listing(
        provider=protocol.peer_id_from_public_key(b"\x01" * 32), addrs=(), seq=1, issued_at=1, expires_at=2,
        provider_type="cloud", models=(the_offer.to_model_offer(),), escrow_agents=(), hardware=protocol.Hardware()),
        "sig", _Signer()))
    assert SECRET.encode() not in listing_bytes
    async with session_rig({model: the_offer}, {model: backend}, tag="openai") as rig:
        channel = await rig.open_channel(cap=1_000_000)
        seen: list[bytes] = []
        async with rig.session(channel, model=model) as session:
            receive = session._framed.receive

            async def recording_receive(expect=None):
                msg = await receive(expect)
                seen.append(protocol.encode(msg))
                return msg

            session._framed.receive = recording_receive
            result = await session.call([{"role": "user", "content": "Hello upstream"}], 12)
        r = result.receipt
        assert 0 < r.tokens_out <= 12 and r.output_hash == protocol.output_hash(result.text)
        assert r.cost == protocol.call_cost(the_offer.to_model_offer().price, r.tokens_in, r.tokens_out)
        assert seen and all(SECRET.encode() not in m for m in seen)
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    await backend.aclose()


class _Signer:
    public_key = b"\x01" * 32

    def sign_bytes(self, data: bytes) -> bytes:
        return b"\x00" * 64
