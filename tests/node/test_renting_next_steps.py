"""Renting as the README walks it, against real nodes in process (an escrow agent, a provider that
accepts no agent at first, a consumer): each thing missing fails with its own error that says what
to do next — an unknown model names the models known, a provider that does not take your agent
names the agents it does, no credits names your balance and the mint command — and once the
provider accepts the agent on the running node (``POST /api/v1/escrow/accepted``: kept in its
config, republished) and credits are minted, a channel from ``escrow open`` pays ``run`` and held
sessions (``channel``) and stays open, spending only what it has left, and the receipt it paid is
exported (``GET /api/v1/receipts/latest``) as the hex ``escrow claim`` takes, which answers
``already_paid`` for a receipt the provider has claimed on its own."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import httpx
import pytest
import trio

import protocol
import wallet
from node import open_swarm
from node.consumer import Preferences, RentError, _renter
from node.consumer._renter import Renter
from node.consumer._trust import ProviderStats
from node.daemon import serve_node_api
from node.escrow import EscrowRefused, EscrowUnreachable

TOKEN = "test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


async def _api(nursery: trio.Nursery, swarm) -> httpx.AsyncClient:
    await nursery.start(lambda task_status: serve_node_api(swarm.service, "127.0.0.1:0", TOKEN,
                                                           task_status=task_status))
    return httpx.AsyncClient(base_url=swarm.service.api_url, headers=AUTH, timeout=60)


async def _until(predicate, what: str, timeout: float = 30.0):
    with trio.fail_after(timeout):
        while not (value := await predicate()):
            await trio.sleep(0.05)
    return value


async def test_each_missing_step_says_what_to_do_and_a_channel_pays_runs_and_sessions(tmp_path):
    async with open_swarm(tmp_path / "agent", passphrase="pw", escrow=True) as agent, \
            open_swarm(tmp_path / "provider", passphrase="pw", bootstrap=agent.addrs) as provider, \
            open_swarm(tmp_path / "consumer", passphrase="pw", bootstrap=agent.addrs) as consumer, \
            trio.open_nursery() as nursery:
        a = agent.peer_id
        await provider.offer("tiny", input_price=100_000, output_price=200_000)
        await consumer.wait_for("tiny")

        with pytest.raises(RentError, match=r"no provider offers 'nothing' \(known models: tiny\)"):
            await consumer.run("nothing", "hi", max_tokens=4, escrow=a)
        with pytest.raises(RentError, match=f"no provider of 'tiny' accepts your escrow agent {a}; 1 offer"
                                            r"\(s\) it with agents none.*node escrow accept " + a):
            await consumer.run("tiny", "hi", max_tokens=4, escrow=a)

        p_api = await _api(nursery, provider)
        r = await p_api.post("/api/v1/escrow/accepted", json={"agent": a})
        assert r.status_code == 200 and r.json() == {"accepted": [a], "own_agent": None}, r.text
        assert a in (tmp_path / "provider" / "config.toml").read_text()  # kept across restarts
        bad = await p_api.post("/api/v1/escrow/accepted", json={"agent": "garbage"})
        assert bad.status_code == 400 and bad.json()["error"]["code"]
        await _until(lambda: _listed_with(consumer, a), "the republished listing")

        with pytest.raises(EscrowRefused, match=f"your balance at escrow agent {a} is 0.000000 credits.*"
                                                f"mint or deposit first.*node escrow mint --to {consumer.peer_id}"):
            await consumer.run("tiny", "hi", max_tokens=4, escrow=a)

        await agent.mint(consumer.peer_id, 2_000_000)
        opened = await consumer.service.escrow.open(a, provider.peer_id, 1_000_000, 3600)
        cid = opened.grant.channel_id.hex()
        first = await consumer.service.renter.run("tiny", [{"role": "user", "content": "hi"}], max_tokens=4,
                                                  temperature_milli=1000, escrow=a, channel=cid)
        assert first.channel.channel_id.hex() == cid
        held = await consumer.service.sessions.open("tiny", budget=10**9, prefs=Preferences(), escrow=a, channel=cid)
        turn = await consumer.service.sessions.call(held.session_id, [{"role": "user", "content": "again"}],
                                                    max_tokens=4, temperature_milli=1000)
        await consumer.service.sessions.close(held.session_id)
        spent = first.receipt.cumulative + turn.receipt.cumulative

        async def settled():
            ch = (await consumer.service.escrow.channel(a, cid)).to_json()
            return ch if ch["claimed"] == spent else None

        ch = await _until(settled, "the provider's claims")
        assert ch["status"] == "open"  # neither the run nor the session closed it
        _, left = await consumer.service.renter.channel(cid, a)
        assert left == 1_000_000 - spent

        c_api = await _api(nursery, consumer)
        latest = (await c_api.get("/api/v1/receipts/latest")).json()
        receipt = protocol.decode(bytes.fromhex(latest["encoded"]), expect=(protocol.Receipt,))
        assert receipt.channel_id.hex() == cid and latest["receipt_id"] == protocol.receipt_hash(receipt).hex()
        by_prefix = (await c_api.get(f"/api/v1/receipts/{latest['receipt_id'][:12]}")).json()
        assert by_prefix["encoded"] == latest["encoded"]
        assert (await c_api.get("/api/v1/receipts/ffffffffffff")).status_code == 404
        assert (await c_api.get("/api/v1/receipts/not-hex")).status_code == 400

        claim = (await p_api.post("/api/v1/escrow/claim", json={"escrow": a, "receipt": latest["encoded"]})).json()
        assert claim["paid"] == 0 and claim["already_paid"] and claim["channel"]["claimed"] == spent

        r = await p_api.post("/api/v1/escrow/accepted", json={"agent": a, "remove": True})
        assert r.json() == {"accepted": [], "own_agent": None}
        await _until(lambda: _listed_with(consumer, None), "the listing without the agent")
        await p_api.aclose()
        await c_api.aclose()
        nursery.cancel_scope.cancel()


async def _listed_with(consumer, agent: str | None) -> bool:
    rows = await consumer.providers("tiny")
    return bool(rows) and rows[0]["escrows"] == ([agent] if agent else [])


async def test_an_unreachable_agent_says_nothing_was_paid_and_names_another_the_provider_accepts():
    me, provider, down, other = (wallet.Identity.generate() for _ in range(4))
    offer = protocol.ModelOffer(name="tiny", price=protocol.Price(input_per_1k=1000, output_per_1k=1000),
                                max_context=4096)
    listing = protocol.Listing(provider=provider.peer_id, addrs=(), seq=1, issued_at=0, expires_at=2**40,
                               provider_type="self_hosted", models=(offer,),
                               escrow_agents=tuple(sorted((down.peer_id, other.peer_id))), hardware=protocol.Hardware())
    rows = [SimpleNamespace(listing=listing, offer=offer)]
    market = SimpleNamespace(identity=me, host=None, now=lambda: 0, lookup=_nothing,
                             view=SimpleNamespace(rows=lambda now, model: [r for r in rows if model in (None, "tiny")]))

    class Down:
        def agent_id(self, agent):
            return agent

        async def open_grant(self, agent, provider, cap, ttl_s):
            raise EscrowUnreachable(f"escrow agent {agent} unreachable: connection refused")

    renter = Renter(market, Down(), None, None, SimpleNamespace(get=ProviderStats), clock=lambda: 0)
    with mock.patch.object(_renter, "reach", _nothing):
        with pytest.raises(EscrowUnreachable) as caught:
            await renter.run("tiny", [{"role": "user", "content": "hi"}], max_tokens=4, temperature_milli=1000,
                             escrow=down.peer_id)
    assert str(caught.value) == (f"escrow agent {down.peer_id} unreachable: connection refused; nothing was paid. "
                                 f"Try again once the agent is back, or pay through another agent this provider "
                                 f"accepts (--escrow {other.peer_id})")


async def _nothing(*args, **kwargs) -> None:
    pass
