"""Fixed-rate contracts: the agreed rate for the named client, and slots others cannot take."""

from __future__ import annotations

import datetime as dt

import pytest

import protocol
from node import open_swarm
from node._contracts import active_contract, parse_contracts, reserved_slots
from node.consumer._renter import RentError
from node.consumer._session_client import SessionRejected
from tests.support import identity

CLIENT, OTHER = identity("contract-client"), identity("contract-other")
NOW = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)


def test_parse_and_lookup():
    raw = [{"client": CLIENT.peer_id, "model": "tiny", "input_price": 10, "output_price": 20,
            "until": "2027-01-01T00:00:00+00:00", "reserved_slots": 2}]
    (c,) = parse_contracts(raw, "provider")
    assert c.price == protocol.Price(input_per_1k=10, output_per_1k=20) and c.reserved_slots == 2
    assert active_contract((c,), CLIENT.peer_id, "tiny", NOW) == c
    assert active_contract((c,), OTHER.peer_id, "tiny", NOW) is None
    assert active_contract((c,), CLIENT.peer_id, "tiny", dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)) is None
    assert reserved_slots((c,), "tiny", NOW) == 2 and reserved_slots((c,), "tiny", NOW, CLIENT.peer_id) == 0
    for bad in ({**raw[0], "until": "2027-01-01T00:00:00"}, {**raw[0], "input_price": 1.5},
                {**raw[0], "client": "nobody"}, {k: v for k, v in raw[0].items() if k != "model"}):
        with pytest.raises(ValueError):
            parse_contracts([bad], "provider")


def _config(home, text):
    path = home / "config.toml"
    path.write_text(path.read_text() + text)


async def test_contract_rate_and_reserved_slots(tmp_path):
    until = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat()
    # create the homes, then write the contract on both sides
    async with open_swarm(tmp_path / "p", passphrase="pw", escrow=True) as provider:
        pid = provider.peer_id
    async with open_swarm(tmp_path / "c", passphrase="pw") as client:
        cid = client.peer_id
    _config(tmp_path / "p", f'''
[[contracts]]
client = "{cid}"
model = "tiny"
input_price = 50000
output_price = 70000
until = "{until}"
reserved_slots = 1
''')
    _config(tmp_path / "c", f'''
[[contracts]]
provider = "{pid}"
model = "tiny"
input_price = 50000
output_price = 70000
until = "{until}"
''')
    async with open_swarm(tmp_path / "p", passphrase="pw", escrow=True) as provider:
        await provider.offer("tiny", input_price=500_000, output_price=900_000, max_concurrent=2)
        async with open_swarm(tmp_path / "c", passphrase="pw", bootstrap=provider.addrs) as client, \
                open_swarm(tmp_path / "o", passphrase="pw", bootstrap=provider.addrs) as other:
            for s in (client, other):
                await provider.mint(s.peer_id, 5_000_000)
                await s.wait_for("tiny")
            async with other.session("tiny", budget=100_000, escrow=pid) as first:
                assert first.info["price"] == {"input": 500_000, "output": 900_000}  # the listed rate
                # two slots, one reserved for the client: the other consumer cannot take a second
                with pytest.raises((SessionRejected, RentError), match="capacity"):
                    async with other.session("tiny", budget=100_000, escrow=pid):
                        pass
                async with client.session("tiny", budget=100_000, escrow=pid) as contracted:
                    assert contracted.info["price"] == {"input": 50_000, "output": 70_000}  # the agreed rate
                    reply = await contracted.call("hi", max_tokens=4)
                    assert reply["cost"]["amount"] == protocol.call_cost(
                        protocol.Price(input_per_1k=50_000, output_per_1k=70_000),
                        reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"])
