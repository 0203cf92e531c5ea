"""ChannelBook, the provider's per-channel settlement bookkeeping: pure, time as a parameter."""

from __future__ import annotations

import dataclasses

import protocol
from node.provider._channels import ChannelBook
from tests.support import AGENT, CONSUMER, PROVIDER

NOW = 1_000_000


def grant(cap: int = 60_000, expires_at: int = NOW + 3600, cid: bytes = b"c" * 16) -> protocol.ChannelGrant:
    return protocol.ChannelGrant(agent=AGENT.peer_id, channel_id=cid, consumer=CONSUMER.peer_id,
                                 provider=PROVIDER.peer_id, cap=cap, expires_at=expires_at)


def receipt(sid: bytes, cumulative: int, cid: bytes = b"c" * 16) -> protocol.Receipt:
    return protocol.Receipt(session_id=sid, call_seq=0, model="m", provider=PROVIDER.peer_id, consumer=CONSUMER.peer_id,
                            agent=AGENT.peer_id, channel_id=cid, input_hash=bytes(32), output_hash=bytes(32),
                            tokens_in=1, tokens_out=1, finish_reason="stop",
                            price=protocol.Price(input_per_1k=1, output_per_1k=1), cost=cumulative,
                            cumulative=cumulative, prev_hash=bytes(32), issued_at=NOW)


def test_live_caps_and_unpaid_receipts_count_against_the_channel():
    book = ChannelBook()
    ch = grant()
    assert book.admit(b"a" * 16, ch, 40_000, agent_cap=60_000, agent_claimed=0, now=NOW) is None
    assert "committed" in book.admit(b"b" * 16, ch, 30_000, agent_cap=60_000, agent_claimed=0, now=NOW)
    book.countersigned(receipt(b"a" * 16, 5_000))
    book.end(b"a" * 16)  # now it owes 5,000 only
    assert book.outstanding(ch.channel_id) == 5_000
    assert book.admit(b"b" * 16, ch, 55_000, agent_cap=60_000, agent_claimed=0, now=NOW) is None
    assert [d.session_id for d in book.others(b"b" * 16, ch.channel_id)] == [b"a" * 16]
    book.paid(receipt(b"a" * 16, 5_000))
    assert book.others(b"b" * 16, ch.channel_id) == []  # paid and ended: forgotten


def test_no_session_is_admitted_while_its_channel_is_being_closed():
    book = ChannelBook()
    ch = grant()
    with book.closing_channel(ch.channel_id) as mine:
        assert mine
        with book.closing_channel(ch.channel_id) as second:
            assert not second  # one close at a time
        assert book.admit(b"a" * 16, ch, 1_000, agent_cap=60_000, agent_claimed=0, now=NOW) == \
            "the channel is being closed"
    assert book.admit(b"a" * 16, ch, 1_000, agent_cap=60_000, agent_claimed=0, now=NOW) is None
    book.countersigned(receipt(b"a" * 16, 500))
    book.end(b"a" * 16)
    with book.closing_channel(ch.channel_id):
        assert book.due(NOW) == []  # the close in flight settles it; a claim now would race it
    assert [d.session_id for d in book.due(NOW)] == [b"a" * 16]  # the close failed: claim it


def test_claims_fall_due_periodically_near_expiry_at_the_end_and_after_a_restart():
    book = ChannelBook(interval_s=30, margin_s=30, retry_s=5)
    ch = grant(expires_at=NOW + 200)
    book.admit(b"a" * 16, ch, 10_000, agent_cap=60_000, agent_claimed=0, now=NOW)
    book.countersigned(receipt(b"a" * 16, 100))
    assert book.due(NOW + 10) == []  # live, inside the interval
    (debt,) = book.due(NOW + 30)  # the periodic claim
    book.failed(debt.last, NOW + 30)
    assert book.due(NOW + 31) == []  # retried only after retry_s
    book.countersigned(receipt(b"a" * 16, 200))
    (debt,) = book.due(NOW + 171)  # within the margin of expiry: due whatever the interval
    book.paid(debt.last)
    assert book.due(NOW + 172) == []
    book.countersigned(receipt(b"a" * 16, 300))
    book.end(b"a" * 16)
    (debt,) = book.due(NOW + 172)  # ended owing: due at once
    assert debt.owed == 100
    assert book.due(NOW + 201) == []  # its claim is in flight (past expiry the agent says whether it pays)
    restarted = ChannelBook()
    restarted.load([receipt(b"z" * 16, 700, cid=b"d" * 16)])
    (debt,) = restarted.due(NOW)
    assert dataclasses.astuple(debt)[:2] == (b"z" * 16, AGENT.peer_id) and debt.owed == 700
