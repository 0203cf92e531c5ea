"""Random opens, extensions, claims (replayed and reordered ones too), refunds, budgets and expiries
against the escrow contract, checked step by step against a model: the token the contract holds
always equals the sum of account, budget and open-channel balances, each claim pays exactly what the
model says, and every step the model refuses reverts and changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.wallet.chain_rig import address, chain_rig, key
from wallet import ChainReverted

CONSUMERS = ("alice", "carol")
PROVIDERS = ("bob", "dave")
SPONSOR = "sponsor"
PARTIES = CONSUMERS + PROVIDERS + (SPONSOR,)
DEPOSIT = 1_000_000
_RIG = None
# amounts are drawn at the edges the contract decides on as often as anywhere else
EDGE = st.sampled_from(["all", "over", "some", "none"])


def _edge(data, mode: str, limit: int, top: int) -> int:
    """``limit`` itself, one past it, something at most it, or zero."""
    if mode == "all":
        return limit
    if mode == "over":
        return limit + 1
    if mode == "none":
        return 0
    return data.draw(st.integers(0, max(0, min(limit, top))))


def _rig():
    global _RIG
    if _RIG is None:
        rig = chain_rig()
        for name in CONSUMERS + (SPONSOR,):
            rig.fund(name, tokens=DEPOSIT, deposit=DEPOSIT)
        for name in PROVIDERS:
            rig.fund(name)
        # far past the wall clock, blocks take exact timestamps: each transaction mines one second
        # after the latest block, so the model knows the time each step runs at
        rig.w3.provider.ethereum_tester.time_travel(rig.chain.now() + 10 * 365 * 86_400)
        _RIG = rig, rig.snapshot()
    return _RIG


@dataclass
class _Channel:
    consumer: str
    provider: str
    budget: int
    cap: int
    expiry: int
    claimed: int = 0
    closed: bool = False
    sessions: dict[int, int] = field(default_factory=dict)  # nonce -> cumulative paid


@dataclass
class _Budget:
    balance: int
    limit: int
    expiry: int
    members: set[str]


class EscrowMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.rig, snapshot = _rig()
        self.rig.revert(snapshot)
        self.chain = self.rig.chain
        self.accounts = {n: (DEPOSIT if n in CONSUMERS + (SPONSOR,) else 0) for n in PARTIES}
        self.wallets = {n: 0 for n in PARTIES}  # tokens paid out of the escrow to each
        self.channels: dict[int, _Channel] = {}
        self.budgets: dict[int, _Budget] = {}
        self.spent: list[tuple[int, int, int]] = []  # vouchers already claimed: (channel, nonce, amount)

    def _expect(self, ok: bool, call):
        """Run ``call``: it must succeed exactly when the model says so; a refusal changes nothing."""
        before = self.chain.held()
        try:
            result = call()
        except ChainReverted:
            assert not ok, "the contract refused what the model allows"
            assert self.chain.held() == before
            return None
        assert ok, "the contract allowed what the model refuses"
        return result

    def _now(self) -> int:
        """The timestamp the next transaction mines at."""
        return self.chain.now() + 1

    @rule(data=st.data(), consumer=st.sampled_from(CONSUMERS), provider=st.sampled_from(PROVIDERS), mode=EDGE,
          life=st.integers(55, 7_200))
    def open_channel(self, data, consumer, provider, mode, life):
        cap = _edge(data, mode, self.accounts[consumer], 400_000)
        expiry = self._now() + life
        ok = 0 < cap <= self.accounts[consumer] and life >= 60
        got = self._expect(ok, lambda: self.chain.open_channel(key(consumer), address(provider), cap, expiry))
        if got:
            self.accounts[consumer] -= cap
            self.channels[got[0]] = _Channel(consumer, provider, 0, cap, expiry)

    @precondition(lambda self: len(self.budgets) < 3)
    @rule(data=st.data(), consumer=st.sampled_from(CONSUMERS), mode=EDGE, limit=st.integers(1, 300_000),
          life=st.integers(200, 7_200))
    def create_budget(self, data, consumer, mode, limit, life):
        amount = _edge(data, mode, self.accounts[SPONSOR], 600_000)
        ok = amount <= self.accounts[SPONSOR]
        expiry = self._now() + life
        got = self._expect(ok, lambda: self.chain.create_budget(key(SPONSOR), amount, limit, expiry,
                                                                [address(consumer)]))
        if got:
            self.accounts[SPONSOR] -= amount
            self.budgets[got[0]] = _Budget(amount, limit, expiry, {consumer})

    @precondition(lambda self: self.budgets)
    @rule(data=st.data(), consumer=st.sampled_from(CONSUMERS), provider=st.sampled_from(PROVIDERS), mode=EDGE,
          life=st.integers(100, 7_200))
    def open_budget_channel(self, data, consumer, provider, mode, life):
        budget_id = data.draw(st.sampled_from(sorted(self.budgets)))
        b = self.budgets[budget_id]
        cap = _edge(data, mode, min(b.limit, b.balance), 400_000)
        now = self._now()
        expiry = now + life
        ok = (0 < cap and consumer in b.members and now < b.expiry and expiry <= b.expiry and cap <= b.limit
              and cap <= b.balance)
        got = self._expect(ok, lambda: self.chain.open_budget_channel(key(consumer), budget_id, address(provider),
                                                                      cap, expiry))
        if got:
            b.balance -= cap
            self.channels[got[0]] = _Channel(consumer, provider, budget_id, cap, expiry)

    @precondition(lambda self: self.channels)
    @rule(data=st.data(), nonce=st.integers(1, 3), mode=EDGE, close=st.booleans(),
          stranger=st.sampled_from([False, False, False, True]))
    def claim(self, data, nonce, mode, close, stranger):
        channel_id = data.draw(st.sampled_from(sorted(self.channels)))
        ch = self.channels[channel_id]
        delta = _edge(data, mode, ch.cap - ch.claimed, 300_000)
        now = self._now()
        before = ch.sessions.get(nonce, 0)
        amount = before + delta
        claimer = next(p for p in PROVIDERS if p != ch.provider) if stranger else ch.provider
        ok = (not stranger and not ch.closed and now < ch.expiry and (delta > 0 or close)
              and ch.claimed + delta <= ch.cap)
        item = self.rig.voucher(ch.consumer, channel_id, nonce, amount, close=close)
        got = self._expect(ok, lambda: self.chain.claim(key(claimer), [item]))
        if got:
            assert got[0] == delta
            ch.sessions[nonce] = amount
            ch.claimed += delta
            self.wallets[ch.provider] += delta
            self.spent.append((channel_id, nonce, amount))
            if close:
                self._closed(ch)

    # claims are what the contract is for: a second rule draws them twice as often
    @precondition(lambda self: self.channels)
    @rule(data=st.data(), nonce=st.integers(1, 3), mode=EDGE, close=st.sampled_from([False, False, True]))
    def claim_again(self, data, nonce, mode, close):
        self.claim(data, nonce, mode, close, False)

    @precondition(lambda self: self.channels)
    @rule(data=st.data(), nonce=st.integers(1, 3), mode=EDGE)
    def claim_more(self, data, nonce, mode):
        self.claim(data, nonce, mode, False, False)

    @precondition(lambda self: self.spent)
    @rule(data=st.data())
    def replay(self, data):
        """A voucher claimed before, sent again (a replay, or older than the session's latest)."""
        channel_id, nonce, amount = data.draw(st.sampled_from(self.spent))
        ch = self.channels[channel_id]
        item = self.rig.voucher(ch.consumer, channel_id, nonce, amount)
        self._expect(False, lambda: self.chain.claim(key(ch.provider), [item]))

    @precondition(lambda self: self.channels)
    @rule(data=st.data(), added=st.integers(0, 200_000), more=st.integers(0, 3_600))
    def extend(self, data, added, more):
        channel_id = data.draw(st.sampled_from(sorted(self.channels)))
        ch = self.channels[channel_id]
        now = self._now()
        expiry = ch.expiry + more
        ok = not ch.closed and now < ch.expiry and expiry >= now + 60
        if ch.budget:
            b = self.budgets[ch.budget]
            ok = ok and (ch.consumer in b.members and now < b.expiry and expiry <= b.expiry
                         and ch.cap + added <= b.limit and added <= b.balance)
        else:
            ok = ok and added <= self.accounts[ch.consumer]
        got = self._expect(ok, lambda: self.chain.extend(key(ch.consumer), channel_id, added, expiry))
        if got:
            if ch.budget:
                self.budgets[ch.budget].balance -= added
            else:
                self.accounts[ch.consumer] -= added
            ch.cap += added
            ch.expiry = expiry

    @precondition(lambda self: self.channels)
    @rule(data=st.data())
    def refund(self, data):
        channel_id = data.draw(st.sampled_from(sorted(self.channels)))
        ch = self.channels[channel_id]
        now = self._now()
        got = self._expect(not ch.closed and now >= ch.expiry, lambda: self.chain.refund(key("dave"), channel_id))
        if got:
            self._closed(ch)

    @precondition(lambda self: self.budgets)
    @rule(data=st.data())
    def reclaim_budget(self, data):
        budget_id = data.draw(st.sampled_from(sorted(self.budgets)))
        b = self.budgets[budget_id]
        now = self._now()
        if self._expect(now >= b.expiry, lambda: self.chain.reclaim_budget(key("bob"), budget_id)):
            self.accounts[SPONSOR] += b.balance
            b.balance = 0

    @rule(data=st.data(), who=st.sampled_from(CONSUMERS + (SPONSOR,)), mode=st.sampled_from(["over", "some"]))
    def withdraw(self, data, who, mode):  # never all of it: the account funds the other steps
        amount = _edge(data, mode, self.accounts[who], 500_000)
        if self._expect(amount <= self.accounts[who], lambda: self.chain.withdraw(key(who), amount)):
            self.accounts[who] -= amount
            self.wallets[who] += amount

    @rule(seconds=st.sampled_from([1, 2, 50, 400, 1_800, 3_700]))
    def advance(self, seconds):
        self.rig.advance(seconds)

    def _closed(self, ch: _Channel) -> None:
        ch.closed = True
        rest = ch.cap - ch.claimed
        if ch.budget:
            self.budgets[ch.budget].balance += rest
        else:
            self.accounts[ch.consumer] += rest

    @invariant()
    def the_token_held_is_every_balance(self):
        if not hasattr(self, "chain"):
            return
        c = self.chain
        locked = sum(ch.cap - ch.claimed for ch in self.channels.values() if not ch.closed)
        budgets = sum(b.balance for b in self.budgets.values())
        assert c.held() == sum(self.accounts.values()) + locked + budgets
        for name in PARTIES:
            assert c.account(address(name)) == self.accounts[name], name
        for name in PROVIDERS:
            assert c.token_balance(address(name)) == self.wallets[name], name
        for channel_id, ch in self.channels.items():
            state = c.channel(channel_id)
            assert (state.cap, state.claimed, state.closed, state.expiry) == (ch.cap, ch.claimed, ch.closed, ch.expiry)


EscrowMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=25, deadline=None)
test_the_escrow_contract_keeps_its_books = EscrowMachine.TestCase
