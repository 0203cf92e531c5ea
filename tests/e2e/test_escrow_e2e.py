"""Two real daemons: a consumer that also runs the escrow agent, and a provider. Credits are
minted, a channel opened, the provider claims with receipts built by protocol/, and a
cooperative close refunds the rest; balances match to the micro-credit."""

from __future__ import annotations

import json

import protocol
import wallet
from tests.e2e.daemons import PASSPHRASE, Daemon, poll


def _identity(home) -> wallet.Identity:
    return wallet.Keystore.open(home / "keystore.json", PASSPHRASE).identity


def _receipt(channel_id: bytes, consumer, provider, agent: str, cumulative: int, seq: int, prev: bytes):
    r = protocol.Receipt(
        session_id=b"e" * 16, call_seq=seq, model="tiny", provider=provider.peer_id, consumer=consumer.peer_id,
        agent=agent, channel_id=channel_id, input_hash=b"i" * 32, output_hash=b"o" * 32, tokens_in=10,
        tokens_out=10, finish_reason="stop", price=protocol.Price(input_per_1k=0, output_per_1k=0),
        cost=0, cumulative=cumulative, prev_hash=prev, issued_at=0)
    return protocol.sign(protocol.sign(r, "provider_sig", provider), "consumer_sig", consumer)


def test_mint_open_claim_close_between_two_daemons(daemons):
    tmp_path, started = daemons
    consumer = Daemon(tmp_path / "consumer", "--escrow")
    started.append(consumer)
    provider = Daemon(tmp_path / "provider", "--bootstrap", consumer.addr)
    started.append(provider)
    agent = consumer.info["peer_id"]
    poll(lambda: json.loads(provider.cli("status", "--json").stdout)["connected_peers"] >= 1, 20, "connection")

    consumer.cli("escrow", "mint", "--to", agent, "--amount", "10")
    opened = json.loads(consumer.cli("escrow", "open", "--provider", provider.info["peer_id"], "--amount", "4",
                                     "--expires", "1h", "--json").stdout)
    assert opened["cap"] == 4_000_000 and set(opened) == {"channel_id", "cap", "expires_at"}
    before = json.loads(consumer.cli("wallet", "balance", "--json").stdout)
    assert (before["available"], before["locked"]) == (6_000_000, 4_000_000)

    c_id, p_id = _identity(tmp_path / "consumer"), _identity(tmp_path / "provider")
    cid = bytes.fromhex(opened["channel_id"])
    first = _receipt(cid, c_id, p_id, agent, 1_250_000, 0, protocol.ZERO_HASH)
    final = _receipt(cid, c_id, p_id, agent, 2_500_001, 1, protocol.receipt_hash(first))
    (tmp_path / "r1.hex").write_text(protocol.encode(first).hex())
    (tmp_path / "r2.hex").write_text(protocol.encode(final).hex())

    claimed = json.loads(provider.cli("escrow", "claim", "--escrow", agent, "--receipt", str(tmp_path / "r1.hex"),
                                      "--json").stdout)
    assert claimed["paid"] == 1_250_000
    again = json.loads(provider.cli("escrow", "claim", "--escrow", agent, "--receipt", str(tmp_path / "r1.hex"),
                                    "--json").stdout)
    assert again["paid"] == 0 and again["already_paid"] and again["channel"]["claimed"] == 1_250_000

    half = consumer.cli("escrow", "close", "--channel", opened["channel_id"], "--receipt", str(tmp_path / "r2.hex"),
                        "--sign-only").stdout.strip()
    (tmp_path / "half.hex").write_text(half)
    closed = json.loads(provider.cli("escrow", "close", "--escrow", agent, "--channel", opened["channel_id"],
                                     "--with", str(tmp_path / "half.hex"), "--json").stdout)
    assert closed["paid"] == 1_250_001 and closed["channel"]["status"] == "closed"

    c_after = json.loads(consumer.cli("wallet", "balance", "--json").stdout)
    p_after = json.loads(provider.cli("wallet", "balance", "--escrow", agent, "--json").stdout)
    assert (c_after["available"], c_after["locked"]) == (10_000_000 - 2_500_001, 0)
    assert (p_after["available"], p_after["locked"]) == (2_500_001, 0)
    assert c_after["channels"][0]["claimed"] == 2_500_001

    not_operator = provider.cli("escrow", "mint", "--escrow", agent, "--to", provider.info["peer_id"],
                                "--amount", "1", check=False)
    assert not_operator.returncode == 1 and "not_operator" in not_operator.stderr
    for d in started:
        assert d.stop() == 0
    ledger = wallet.Ledger(tmp_path / "consumer" / "escrow.db")
    try:
        assert ledger.check() == {"minted": 10_000_000, "withdrawn": 0, "available": 10_000_000, "locked": 0}
    finally:
        ledger.close()
