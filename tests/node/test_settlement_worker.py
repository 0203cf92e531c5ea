"""The provider's settlement worker (issue #12, findings 1, 2 and 8): every counter-signed receipt is
paid by its agent — across its channel's expiry, an agent outage at the session's end, a lost
answer and a provider restart — with no manual command, and ``node earnings`` equals what the agent
paid. Exact balances, the agent's ledger checked. Also receipts paging and storage faults."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import types
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio

import protocol
from node._receipts import FORFEITED, ReceiptStore, ReceiptStoreError
from node.api._reports import earnings
from node.consumer._delivery import SettlementUnconfirmed
from node.consumer._session_client import CallRefused
from node.escrow._client import EscrowClient, EscrowUnreachable
from node.provider import ProviderService
from node.provider._channels import ChannelBook
from tests.node.helpers import wait_until
from tests.node.session_rig import Rig, ScriptedBackend, session_rig
from tests.node.test_channels import NOW, grant, receipt
from tests.node.test_hostile_sessions import MINTED, USER, consumer_of, offer

TOKEN = "t0ken"


class Agent:
    """What the provider's settlement worker sees of the agent: the real one, or down (unreachable),
    or answering but with the answer lost on the way back (``lose_answers``)."""

    def __init__(self, real: EscrowClient) -> None:
        self.real = real
        self.down = False
        self.lose_answers = 0
        self.refused: list[float] = []  # when a call found it down (trio time)
        self.answers: list[protocol.EscrowResponse] = []

    async def call(self, agent: str | None, request: Any, timeout: float = 30.0) -> protocol.EscrowResponse:
        if self.down:
            self.refused.append(trio.current_time())
            raise EscrowUnreachable("escrow agent down (test)")
        r = await self.real.call(agent, request, timeout)
        self.answers.append(r)
        if self.lose_answers and isinstance(request, protocol.EscrowClaim):
            self.lose_answers -= 1
            raise EscrowUnreachable("the answer was lost (test)")
        return r


def faulty_agent(rig: Rig) -> Agent:
    agent = Agent(rig.provider_service.settlement.escrow)
    rig.provider_service.settlement.escrow = agent  # type: ignore[assignment]
    return agent


def report(store: ReceiptStore) -> dict[str, Any]:
    return earnings(types.SimpleNamespace(receipts=store), "30d", "model")


def assert_books_agree(rig: Rig, store: ReceiptStore, signed: int) -> None:
    """The agent paid everything counter-signed, the consumer got the rest back, and the provider's
    report says exactly what the agent paid."""
    paid = rig.balance(rig.provider_id).available
    assert paid == signed
    assert rig.balance(consumer_of(rig)) == protocol.Balance(available=MINTED - signed, locked=0)
    doc = report(store)
    assert (doc["claimed"], doc["pending"], doc["forfeited"]) == (paid, 0, 0)
    rig.agent.check()


async def test_a_session_running_across_its_channels_expiry_has_every_receipt_paid():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw1", claim_interval_s=60,
                           claim_margin_s=50) as rig:
        channel = await rig.open_channel(cap=200_000, ttl=200)
        async with rig.session(channel) as session:
            first = [(await session.call(USER, 8)).receipt for _ in range(2)]
            rig.clock.offset += 61  # the periodic claim while the session runs
            await wait_until(lambda: rig.balance(rig.provider_id).available == first[-1].cumulative,
                             what="the periodic claim")
            later = [(await session.call(USER, 8)).receipt for _ in range(2)]  # after the last periodic claim
            assert rig.balance(rig.provider_id).available == first[-1].cumulative
            rig.clock.offset += 200 - 61 - 45  # 45 s before expiry: inside the configured 50 s margin, not 30
            await wait_until(lambda: rig.balance(rig.provider_id).available == later[-1].cumulative,
                             what="the claim inside the margin")
            with pytest.raises(CallRefused, match="expired"):  # no call starts that could not be paid
                await session.call(USER, 8)
            await session.close(settle_escrow=False)
        rig.clock.offset += 60  # past the expiry: the agent refunds the rest
        await wait_until(lambda: rig.balance(consumer_of(rig)).locked == 0, what="the refund")
        assert_books_agree(rig, rig.provider_service.receipts, later[-1].cumulative)


async def test_an_agent_down_at_the_sessions_end_is_paid_once_back_with_no_command():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw2", claim_interval_s=3600,
                           claim_retry_s=1, claim_retry_max_s=2) as rig:
        agent = faulty_agent(rig)
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            owed = (await session.call(USER, 8)).receipt.cumulative
            agent.down = True  # the agent goes away before the session ends
            await session.close(settle_escrow=False)
        await wait_until(lambda: len(agent.refused) >= 3, what="the worker retrying while the agent is down")
        elapsed = trio.current_time() - agent.refused[0]
        assert len(agent.refused) <= elapsed + 2  # backed off (whole seconds: 1, then 2), never a busy loop
        debt = rig.provider_service.book.session(session.machine.session_id)
        assert debt is not None and debt.failures >= 3 and debt.retry_at - rig.provider_service.now() <= 2
        assert rig.balance(rig.provider_id).available == 0
        assert report(rig.provider_service.receipts)["pending"] == owed
        agent.down = False  # back: nobody runs `node escrow claim`
        took = await wait_until(lambda: rig.balance(rig.provider_id).available == owed, timeout=10,
                                what="the retried claim")
        assert took <= 3  # within the capped backoff
        rig.clock.offset += 3600  # the channel expires; the rest goes back
        await wait_until(lambda: rig.balance(consumer_of(rig)).locked == 0, what="the refund")
        assert_books_agree(rig, rig.provider_service.receipts, owed)


async def test_a_lost_answer_is_recovered_by_replaying_the_claim_and_by_reconciling():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw3", claim_interval_s=3600,
                           claim_retry_s=1, claim_retry_max_s=1) as rig:
        agent = faulty_agent(rig)
        worker = rig.provider_service.settlement
        channel = await rig.open_channel(cap=200_000)
        # 1: the agent paid, its answer was lost; the retry sends the same signed claim and the
        # agent replays its first answer, with what it paid
        agent.lose_answers = 1
        async with rig.session(channel, spend_limit=100_000) as session:
            one = (await session.call(USER, 8)).receipt
            await session.close(settle_escrow=False)
        await wait_until(lambda: rig.provider_service.book.session(one.session_id) is None, what="the replay")
        assert [a.error for a in agent.answers] == ["", "replayed"]
        # 2: the answer is lost and the claim is signed anew (its request no longer fresh): the agent
        # says already_claimed, and the worker asks it what the channel paid
        agent.lose_answers, agent.answers = 1, []
        real_request = worker._request

        def fresh_every_time(r: protocol.Receipt) -> protocol.EscrowClaim:
            worker._requests.clear()
            return real_request(r)

        worker._request = fresh_every_time  # type: ignore[method-assign]
        async with rig.session(channel, spend_limit=100_000) as session:
            two = (await session.call(USER, 8)).receipt
            await session.close(settle_escrow=False)
        await wait_until(lambda: rig.provider_service.book.session(two.session_id) is None, what="the reconciliation")
        assert [a.error for a in agent.answers] == ["", "already_claimed", ""]  # the claim, its retry, the query
        hows = [c["how"] for c in rig.provider_service.receipts.claims()]
        assert hows[:2] == ["reconciled", "claim"]  # the lost payment, recorded from the agent's channel total
        rig.clock.offset += 3600
        await wait_until(lambda: rig.balance(consumer_of(rig)).locked == 0, what="the refund")
        assert_books_agree(rig, rig.provider_service.receipts, one.cumulative + two.cumulative)


async def test_a_cooperative_close_waits_for_a_claim_in_flight_on_its_channel_then_settles_it():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw7", claim_interval_s=1) as rig:
        agent = faulty_agent(rig)
        gate, entered = trio.Event(), trio.Event()
        real_call = agent.call

        async def slow_claims(who: str | None, request: Any, timeout: float = 30.0) -> Any:
            if isinstance(request, protocol.EscrowClaim):
                entered.set()
                await gate.wait()
            return await real_call(who, request, timeout)

        agent.call = slow_claims  # type: ignore[method-assign]
        channel = await rig.open_channel(cap=100_000)
        async with rig.session(channel) as session:
            owed = (await session.call(USER, 8)).receipt.cumulative
            rig.clock.offset += 2  # the periodic claim starts, and hangs at the agent
            rig.provider_service.wake_settlement()
            with trio.fail_after(10):
                await entered.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.close)  # the consumer's half of a cooperative close
                await wait_until(lambda: channel.channel_id in rig.provider_service.book._closing,
                                 what="the close to wait on the claim")
                gate.set()
        # the close went through after the claim: paid exactly once, the rest refunded at once
        assert rig.balance(rig.provider_id).available == owed
        assert rig.balance(consumer_of(rig)) == protocol.Balance(available=MINTED - owed, locked=0)
        assert report(rig.provider_service.receipts)["claimed"] == owed
        rig.agent.check()


@asynccontextmanager
async def restarted(rig: Rig) -> AsyncIterator[ProviderService]:
    """A second provider process on the same identity and receipts.db (the first one crashed)."""
    old = rig.provider_service
    store = ReceiptStore(old.receipts.path)
    service = ProviderService(old.identity, old.storefront, EscrowClient(rig.provider_host), store,
                              wall_clock=rig.clock)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve_settlement)
            yield service
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_restarted_provider_collects_the_receipts_it_had_not_claimed():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw4", claim_interval_s=3600) as rig:
        crashed = faulty_agent(rig)
        crashed.down = True  # the first process never gets a claim through
        channel = await rig.open_channel(cap=200_000, ttl=600)
        owed = 0
        for _ in range(2):
            async with rig.session(channel, spend_limit=100_000) as session:
                owed += (await session.call(USER, 8)).receipt.cumulative
                await session.close(settle_escrow=False)
        assert rig.balance(rig.provider_id).available == 0
        async with restarted(rig) as service:
            await wait_until(lambda: rig.balance(rig.provider_id).available == owed, what="the claims after restart")
            await wait_until(lambda: len(service.book) == 0, what="the book emptied")
            assert report(service.receipts)["claimed"] == owed
        rig.clock.offset += 600
        await wait_until(lambda: rig.balance(consumer_of(rig)).locked == 0, what="the refund")
        assert_books_agree(rig, rig.provider_service.receipts, owed)


async def test_after_a_restart_the_agent_is_asked_each_channels_expiry_so_the_margin_applies():
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw5", claim_interval_s=3600) as rig:
        channel = await rig.open_channel(cap=200_000, ttl=600)
        crashed = faulty_agent(rig)
        crashed.down = True
        async with rig.session(channel, spend_limit=100_000) as session:
            owed = (await session.call(USER, 8)).receipt.cumulative
            await session.close(settle_escrow=False)
        restart_agent_down = True

        class Flaky(EscrowClient):
            async def call(self, agent: str | None, request: Any, timeout: float = 30.0) -> Any:
                if restart_agent_down and isinstance(request, protocol.EscrowClaim):
                    raise EscrowUnreachable("claims fail (test)")
                return await super().call(agent, request, timeout)

        old = rig.provider_service
        store = ReceiptStore(old.receipts.path)
        service = ProviderService(old.identity, old.storefront, Flaky(rig.provider_host), store, wall_clock=rig.clock,
                                  claim_retry_s=300, claim_retry_max_s=300)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve_settlement)
            await wait_until(lambda: (d := service.book.session(session.machine.session_id)) is not None
                             and d.expires_at == channel.expires_at and d.failures >= 1, what="the expiry learnt")
            debt = service.book.session(session.machine.session_id)
            assert debt is not None and debt.retry_at <= channel.expires_at - service.book.margin_s
            restart_agent_down = False
            rig.clock.offset += channel.expires_at - service.book.margin_s + 1 - int(rig.clock())
            await wait_until(lambda: rig.balance(rig.provider_id).available == owed, what="the claim before expiry")
            nursery.cancel_scope.cancel()
        store.close()
        rig.agent.check()


def test_the_backoff_doubles_up_to_its_cap_and_never_sleeps_through_the_margin():
    book = ChannelBook(interval_s=30, margin_s=30, retry_s=5, retry_max_s=300)
    ch = grant(expires_at=NOW + 10_000)
    book.admit(b"a" * 16, ch, 10_000, agent_cap=60_000, agent_claimed=0, now=NOW)
    book.countersigned(receipt(b"a" * 16, 100))
    book.end(b"a" * 16)
    delays, now = [], NOW
    for _ in range(9):
        (debt,) = book.due(now)
        assert book.due(now) == []  # marked as being claimed
        retry_at = book.failed(debt.last, now)
        assert book.due(retry_at - 1) == []
        delays.append(retry_at - now)
        now = retry_at
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    (debt,) = book.due(now)
    book.paid(debt.last)
    assert len(book) == 0  # paid and ended: gone
    near = ChannelBook(interval_s=30, margin_s=30, retry_s=5, retry_max_s=300)
    near.admit(b"b" * 16, grant(expires_at=NOW + 100, cid=b"n" * 16), 10_000, agent_cap=60_000, agent_claimed=0,
               now=NOW)
    near.countersigned(receipt(b"b" * 16, 100, cid=b"n" * 16))
    near.end(b"b" * 16)
    debt = near.session(b"b" * 16)
    debt.failures = 6  # a long outage: the next backoff would be 300 s
    (debt,) = near.due(NOW)
    assert near.failed(debt.last, NOW) == NOW + 70  # the channel's margin, not 300 s later
    (debt,) = near.due(NOW + 70)
    assert near.failed(debt.last, NOW + 70) == NOW + 75  # inside the margin: every retry_s
    (debt,) = near.due(NOW + 200)  # past expiry by this clock: still claimed (the agent's clock decides)
    near.failed(debt.last, NOW + 200, final=True)
    assert near.session(b"b" * 16) is None


def test_one_claim_per_channel_is_in_flight():
    book = ChannelBook()
    ch = grant()
    for sid in (b"a" * 16, b"b" * 16):
        book.admit(sid, ch, 1_000, agent_cap=60_000, agent_claimed=0, now=NOW)
        book.countersigned(receipt(sid, 100))
        book.end(sid)
    (first,) = book.due(NOW)
    assert book.due(NOW) == []  # the other waits for this answer
    book.paid(first.last)
    (second,) = book.due(NOW)
    assert second.session_id != first.session_id


# ---- receipts.db: paging, claims, storage faults -------------------------------------------------


def test_receipts_page_newest_first_and_say_when_there_are_more(tmp_path):
    store = ReceiptStore(tmp_path / "r.db")
    for i in range(7):
        store._put(receipt(bytes([i]) * 16, 100 + i), "provider", None)
    page = store.page(limit=3)
    assert [r["cumulative"] for r in page.receipts] == [106, 105, 104]
    assert (page.total, page.has_more) == (7, True)
    last = store.page(limit=3, offset=6).to_json()
    assert [r["cumulative"] for r in last["receipts"]] == [100]
    assert (last["total"], last["has_more"], last["offset"], last["limit"]) == (7, False, 6, 3)
    one = store.page(session_id=bytes([2]) * 16)
    assert [r["cumulative"] for r in one.receipts] == [102] and not one.has_more
    store.close()


def test_the_receipts_endpoint_pages_and_refuses_bad_bounds(tmp_path):
    from starlette.testclient import TestClient

    from node.api import build_app

    store = ReceiptStore(tmp_path / "r.db")
    for i in range(60):
        store._put(receipt(bytes([i]) * 16, 1000 + i), "provider", None)
    client = TestClient(build_app(types.SimpleNamespace(receipts=store, escrow=None), TOKEN), backend="trio",
                        base_url="http://127.0.0.1")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    doc = client.get("/api/v1/receipts", headers=auth).json()
    assert (len(doc["receipts"]), doc["total"], doc["has_more"], doc["limit"]) == (50, 60, True, 50)  # default 50
    assert doc["receipts"][0]["cumulative"] == 1059  # newest first
    tail = client.get("/api/v1/receipts", params={"limit": 20, "offset": 50}, headers=auth).json()
    assert [r["cumulative"] for r in tail["receipts"]] == list(range(1009, 999, -1)) and not tail["has_more"]
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}):
        r = client.get("/api/v1/receipts", params=bad, headers=auth)
        field = next(iter(bad))
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"{field} must be a whole number")
    store.close()


def test_the_claims_of_a_channel_add_up_to_what_its_agent_paid(tmp_path):
    store = ReceiptStore(tmp_path / "r.db")
    cid = b"c" * 16
    for sid, cum in ((b"a" * 16, 300), (b"b" * 16, 500), (b"d" * 16, 200)):
        store._put(receipt(sid, cum), "provider", None)
    assert store.record_claim("A", cid, b"a" * 16, 300, 300, channel_claimed=300) == 0
    # a claim made by hand (not recorded here) paid 500 on the channel: the next answer shows it
    assert store.record_claim("A", cid, b"d" * 16, 200, 200, channel_claimed=1000) == 500
    assert store.paid_on_channel(cid) == 1000 == store.signed_on_channel(cid)
    store.record_claim("A", cid, None, 0, 0, channel_claimed=1000, how="reconciled")  # nothing more to add
    assert store.paid_on_channel(cid) == 1000
    e = store.earnings()
    assert (e.signed, e.paid, e.forfeited, e.pending) == (1000, 1000, 0, 0)
    store._put(receipt(b"x" * 16, 70, cid=b"e" * 16), "provider", None)
    store.record_claim("A", b"e" * 16, b"x" * 16, 70, 0, how="forfeited", forfeited=70)
    store.mark_claimed(receipt(b"x" * 16, 70, cid=b"e" * 16), FORFEITED)
    e = store.earnings()
    assert (e.signed, e.paid, e.forfeited, e.pending) == (1070, 1000, 70, 0)
    assert store.unclaimed("provider") != [] and all(r.session_id != b"x" * 16 for r in store.unclaimed("provider"))
    store.close()


def test_a_store_from_before_claims_were_recorded_keeps_what_it_had_marked_paid(tmp_path):
    store = ReceiptStore(tmp_path / "r.db")
    for sid, cum in ((b"a" * 16, 300), (b"b" * 16, 500)):
        store._put(receipt(sid, cum - 100), "provider", None)
        store._put(dataclasses.replace(receipt(sid, cum), call_seq=1), "provider", None)
    store.mark_claimed(receipt(b"a" * 16, 300))  # the old books: session a paid, b not
    store.db.execute("DELETE FROM claims")  # as the file was before this version
    store.close()
    store = ReceiptStore(tmp_path / "r.db")
    e = store.earnings()
    assert (e.signed, e.paid, e.pending) == (800, 300, 500)
    assert [c["how"] for c in store.claims()] == ["migrated"]
    store.close()
    again = ReceiptStore(tmp_path / "r.db")
    assert again.earnings().paid == 300  # migrated once
    again.close()


def test_a_full_or_read_only_receipts_db_is_a_clear_error_logged_once(tmp_path, caplog):
    store = ReceiptStore(tmp_path / "r.db")
    (pages,), = store.query("PRAGMA page_count")
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL
    caplog.set_level(logging.INFO, logger="node._receipts")
    with pytest.raises(ReceiptStoreError, match="database or disk is full") as full:
        for i in range(500):
            store._put(receipt(i.to_bytes(16, "big"), 100 + i), "provider", None)
    assert str(tmp_path / "r.db") in str(full.value)
    with pytest.raises(ReceiptStoreError, match="database or disk is full"):
        store._put(receipt(b"z" * 16, 1), "provider", None)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "database or disk is full" in errors[0].getMessage()
    store.db.execute("PRAGMA max_page_count = 1000000")
    store.db.execute("PRAGMA query_only = ON")  # now a read-only database
    with pytest.raises(ReceiptStoreError, match="readonly"):
        store.mark_claimed(receipt(b"z" * 16, 1))
    store.close()
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(ReceiptStoreError, match="cannot open the receipt store"):
        ReceiptStore(tmp_path / "dir.db")


async def test_a_receipt_the_provider_cannot_store_is_still_claimed_but_never_acknowledged(caplog):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw6", claim_interval_s=3600) as rig:
        channel = await rig.open_channel(cap=100_000)
        store = rig.provider_service.receipts
        caplog.set_level(logging.INFO, logger="node._receipts")
        store.db.execute("PRAGMA query_only = ON")  # the provider's receipts.db turns read-only
        with pytest.raises(SettlementUnconfirmed):  # served and counter-signed, but never a success in doubt
            async with rig.session(channel) as session:
                await session.call(USER, 8)
        (kept,) = rig.consumer_receipts.list()  # the consumer's copy, counter-signed
        owed = kept["cumulative"]
        with trio.fail_after(5):
            await wait_until(lambda: rig.balance(rig.provider_id).available == owed, what="the claim from memory")
        assert rig.provider_service.receipts.list() == []  # nothing was stored on the provider's side
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "readonly" in errors[0]
        store.db.execute("PRAGMA query_only = OFF")
        rig.agent.check()


def test_sqlite_errors_are_translated_at_the_store(tmp_path):
    store = ReceiptStore(tmp_path / "r.db")
    store.db.close()
    with pytest.raises(ReceiptStoreError, match="cannot read") as raised:
        store.query("SELECT 1")
    assert isinstance(raised.value.__cause__, sqlite3.Error)


async def test_a_consumer_that_cannot_store_its_copy_gets_a_storage_error_from_the_call(caplog):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw8", claim_interval_s=3600) as rig:
        channel = await rig.open_channel(cap=100_000)
        caplog.set_level(logging.INFO, logger="node._receipts")
        rig.consumer_receipts.db.execute("PRAGMA query_only = ON")
        with pytest.raises(ReceiptStoreError, match="readonly"):
            async with rig.session(channel) as session:
                await session.call(USER, 8)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "readonly" in errors[0]
        rig.consumer_receipts.db.execute("PRAGMA query_only = OFF")


async def test_a_receipt_its_channel_can_no_longer_pay_is_forfeited_logged_once_with_the_amount(caplog):
    async with session_rig({"m": offer()}, {"m": ScriptedBackend()}, tag="sw9", claim_interval_s=3600,
                           claim_retry_s=1, claim_retry_max_s=1) as rig:
        agent = faulty_agent(rig)
        channel = await rig.open_channel(cap=100_000, ttl=200)
        async with rig.session(channel) as session:
            owed = (await session.call(USER, 8)).receipt.cumulative
            agent.down = True  # down until after the channel expired: the agent refunds it
            await session.close(settle_escrow=False)
        rig.clock.offset += 201
        await wait_until(lambda: rig.balance(consumer_of(rig)).locked == 0, what="the refund")
        caplog.set_level(logging.INFO, logger="node.provider._settlement")
        agent.down = False
        await wait_until(lambda: len(rig.provider_service.book) == 0, what="the debt given up")
        forfeits = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(forfeits) == 1 and f"{owed} µc of session" in forfeits[0] and "forfeited" in forfeits[0]
        doc = report(rig.provider_service.receipts)
        assert (doc["claimed"], doc["pending"], doc["forfeited"]) == (0, 0, owed)
        assert rig.balance(rig.provider_id).available == 0
        assert rig.balance(consumer_of(rig)) == protocol.Balance(available=MINTED, locked=0)
        assert rig.provider_service.receipts.unclaimed("provider") == []  # not claimed again after a restart
        rig.agent.check()
