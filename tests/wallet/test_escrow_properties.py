"""Property: random sequences of escrow operations, legal and illegal, with a controllable clock,
keep the invariant after every step, and no party ever holds more than it is owed."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    EscrowBudgetCreate,
    EscrowBudgetRefund,
    EscrowClaim,
    EscrowMint,
    EscrowOpen,
    EscrowRefund,
    EscrowTopUp,
    EscrowWithdraw,
)
from tests.support import identity
from tests.wallet.escrow_support import AGENT, close_request, new_agent, receipt, signed

CONSUMERS = [identity("pc-0"), identity("pc-1")]
PROVIDERS = [identity("pp-0"), identity("pp-1")]
FUNDER = identity("pf")
PARTIES = CONSUMERS + PROVIDERS + [FUNDER]
START = 1_000_000

idx = st.integers(0, 7)
amount = st.integers(0, 3_000)
op = st.one_of(
    st.tuples(st.just("mint"), st.integers(0, len(PARTIES) - 1), amount, st.booleans()),
    # channel lives around the agent's 60 s minimum: most are granted, the shorter ones refused
    st.tuples(st.just("open"), st.integers(0, 1), st.integers(0, 1), amount, st.integers(1, 240), st.booleans()),
    st.tuples(st.just("claim"), idx, st.integers(0, 2), amount, st.integers(0, 1), st.booleans()),
    st.tuples(st.just("close"), idx, st.integers(0, 2), amount, st.booleans()),
    st.tuples(st.just("refund"), idx, st.booleans()),
    st.tuples(st.just("topup"), idx, amount, st.integers(0, 60)),
    st.tuples(st.just("withdraw"), st.integers(0, len(PARTIES) - 1), amount),
    st.tuples(st.just("budget"), amount, st.integers(1, 2_000), st.integers(1, 120), st.booleans()),
    st.tuples(st.just("budget_refund"), idx, st.booleans()),
    st.tuples(st.just("tick"), st.integers(1, 90)),
    st.tuples(st.just("sweep"),),
    st.tuples(st.just("replay"), idx),
)


class World:
    def __init__(self, agent, grouped: bool = False):
        self.agent = agent
        self.grouped = grouped  # each request goes through group commit (``apply_many``), with company
        self.now = START
        self.channels: list[protocol.ChannelGrant] = []
        self.budgets: list[bytes] = []
        self.sent: list[object] = []
        self.minted = collections.Counter()
        self.withdrawn = collections.Counter()
        self.signed_for = collections.Counter()  # (channel, session) -> highest cumulative a consumer signed

    def send(self, request):
        self.sent.append(request)
        response = self._grouped(request) if self.grouped else self.agent.handle(request, self.now)
        protocol.verify(response, "sig", AGENT.public_key)
        if response.ok and isinstance(request, EscrowMint):
            self.minted[request.to] += request.amount
        if response.ok and isinstance(request, EscrowWithdraw):
            self.withdrawn[request.party] += request.amount
        return response

    def _grouped(self, request):
        """``request`` in one group commit with itself again and the two requests sent before it:
        the copy and the earlier ones are answered as replays, and nothing applies twice."""
        prepared = self.agent.prepare(request, self.now)
        if isinstance(prepared, protocol.EscrowResponse):
            return prepared
        company = [p for p in (self.agent.prepare(r, self.now) for r in self.sent[-3:-1])
                   if not isinstance(p, protocol.EscrowResponse)]
        first, again, *earlier = self.agent.apply_many([prepared, prepared, *company])
        assert not again.ok and again.error in ("replayed", "stale_request", first.error), again.error
        for answer in earlier:
            assert not answer.ok and answer.error in ("replayed", "stale_request"), answer.error
        return first

    def check(self):
        self.agent.check()
        with self.agent.ledger.reading() as db:
            acc = dict(db.execute("SELECT name, balance FROM accounts").fetchall())
            chans = db.execute("SELECT channel_id, consumer, provider, cap, claimed, budget_id FROM channels").fetchall()
            funders = dict((bytes(b), f) for b, f in db.execute("SELECT budget_id, funder FROM budgets"))
            sessions = db.execute("SELECT channel_id, session_id, claimed FROM channel_sessions").fetchall()
        owner_of = {}
        received, paid_from, held = collections.Counter(), collections.Counter(), collections.Counter()
        for cid, consumer, provider, cap, claimed, budget in chans:
            cid = bytes(cid)
            assert claimed <= cap
            owner = funders[bytes(budget)] if budget is not None else consumer
            owner_of[cid] = owner
            received[provider] += claimed
            paid_from[owner] += claimed
            held[owner] += acc.get(f"channel:{cid.hex()}", 0)
        for bid, funder in funders.items():
            held[funder] += acc.get(f"budget:{bid.hex()}", 0)
        for cid, session, claimed in sessions:
            assert claimed <= self.signed_for[(bytes(cid), bytes(session))], "paid more than the consumer signed for"
        for p in PARTIES:
            pid = p.peer_id
            mine = acc.get(f"peer:{pid}", 0) + held[pid]
            owed = self.minted[pid] - self.withdrawn[pid] + received[pid] - paid_from[pid]
            assert mine == owed, f"{pid[-6:]} holds {mine}, is owed {owed}"


def _pick(items, i):
    return items[i % len(items)] if items else None


def run_sequence(world: World, sequence) -> None:
    for step in sequence:
        kind, now = step[0], world.now
        if kind == "mint":
            _, who, amt, legit = step
            world.send(signed(EscrowMint, AGENT if legit else PARTIES[who], now, to=PARTIES[who].peer_id, amount=amt))
        elif kind == "open":
            _, c, p, cap, ttl, use_budget = step
            budget = _pick(world.budgets, c) if use_budget else None
            r = world.send(signed(EscrowOpen, CONSUMERS[c], now, provider=PROVIDERS[p].peer_id, cap=cap,
                                  expires_at=now + ttl, budget_id=budget))
            if r.ok:
                world.channels.append(r.channels[0].channel)
        elif kind == "claim":
            _, i, session, cumulative, who, honest = step
            ch = _pick(world.channels, i)
            if ch is None:
                continue
            consumer = next(c for c in CONSUMERS if c.peer_id == ch.consumer)
            provider = next(p for p in PROVIDERS if p.peer_id == ch.provider) if honest else PROVIDERS[who]
            sid = bytes([session]) * 16
            world.signed_for[(ch.channel_id, sid)] = max(world.signed_for[(ch.channel_id, sid)], cumulative)
            world.send(signed(EscrowClaim, provider, now,
                              receipt=receipt(ch, consumer, provider, cumulative, session=sid)))
        elif kind == "close":
            _, i, session, cumulative, with_receipt = step
            ch = _pick(world.channels, i)
            if ch is None:
                continue
            consumer = next(c for c in CONSUMERS if c.peer_id == ch.consumer)
            provider = next(p for p in PROVIDERS if p.peer_id == ch.provider)
            final = None
            if with_receipt:
                sid = bytes([session]) * 16
                world.signed_for[(ch.channel_id, sid)] = max(world.signed_for[(ch.channel_id, sid)], cumulative)
                final = receipt(ch, consumer, provider, cumulative, session=sid)
            world.send(close_request(ch.channel_id, consumer, provider, now, final))
        elif kind == "refund":
            _, i, by_consumer = step
            ch = _pick(world.channels, i)
            if ch is not None:
                who = ch.consumer if by_consumer else ch.provider
                world.send(signed(EscrowRefund, next(p for p in PARTIES if p.peer_id == who), now, channel_id=ch.channel_id))
        elif kind == "topup":
            _, i, add, extend = step
            ch = _pick(world.channels, i)
            if ch is not None:
                consumer = next(c for c in CONSUMERS if c.peer_id == ch.consumer)
                world.send(signed(EscrowTopUp, consumer, now, channel_id=ch.channel_id, add=add,
                                  expires_at=ch.expires_at + extend))
        elif kind == "withdraw":
            _, who, amt = step
            world.send(signed(EscrowWithdraw, PARTIES[who], now, amount=amt))
        elif kind == "budget":
            _, amt, limit, ttl, both = step
            whitelist = tuple(c.peer_id for c in (CONSUMERS if both else CONSUMERS[:1]))
            r = world.send(signed(EscrowBudgetCreate, FUNDER, now, amount=amt, whitelist=whitelist,
                                  per_session_limit=limit, expires_at=now + ttl))
            if r.ok:
                world.budgets.append(r.budget_id)
        elif kind == "budget_refund":
            _, i, by_funder = step
            bid = _pick(world.budgets, i)
            if bid is not None:
                world.send(signed(EscrowBudgetRefund, FUNDER if by_funder else CONSUMERS[0], now, budget_id=bid))
        elif kind == "tick":
            world.now += step[1]
        elif kind == "sweep":
            world.agent.sweep(world.now)
        elif kind == "replay":
            previous = _pick(world.sent, step[1])
            if previous is not None:
                response = world.agent.handle(previous, world.now)
                assert not response.ok and response.error in ("replayed", "stale_request"), response.error
        world.check()


@settings(max_examples=100)
@given(st.lists(op, min_size=20, max_size=60))
def test_random_escrow_sequences_keep_the_invariant_and_pay_no_one_too_much(sequence):
    _run(sequence, grouped=False)


@settings(max_examples=50)
@given(st.lists(op, min_size=20, max_size=60))
def test_the_same_sequences_through_group_commit_apply_each_request_at_most_once(sequence):
    _run(sequence, grouped=True)


def _run(sequence, grouped: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        agent = new_agent(Path(tmp))
        try:
            world = World(agent, grouped)
            for p in PARTIES[:2] + [FUNDER]:  # a little money to start with, so opens can succeed
                world.send(signed(EscrowMint, AGENT, world.now, to=p.peer_id, amount=5_000))
            run_sequence(world, sequence)
        finally:
            agent.ledger.close()
