# pragma version 0.4.3
# pragma evm-version shanghai
"""
@title Inferswarm escrow: payment channels and funded budgets on a chain
@notice A consumer locks tokens in a channel to one provider until an expiry. For each session
        (a nonce within the channel) it signs EIP-712 vouchers for the cumulative amount it owes;
        the provider claims the latest one (paid the difference to what that nonce was paid
        before), many in one transaction if it likes, and may close the channel as it claims,
        which returns the rest at once. After the expiry, what was never claimed goes back to
        whoever funded the channel. A sponsor's budget lets whitelisted keys open channels from
        its funds, each up to a per-session limit, until the budget's expiry, after which the rest
        returns to the sponsor. Every state change emits an event.
        Invariant: the token this contract holds equals the sum of account balances, budget
        balances and every open channel's cap less what it paid out.
"""

from ethereum.ercs import IERC20

struct Channel:
    consumer: address  # signs the vouchers
    provider: address  # claims them
    budget: uint256  # 0: funded from the consumer's account; else the budget it was opened from
    cap: uint256  # locked in the channel
    claimed: uint256  # paid out of it so far
    expiry: uint256
    closed: bool

struct Budget:
    sponsor: address
    balance: uint256
    session_limit: uint256  # the most one channel opened from it may lock
    expiry: uint256

struct Claim:
    channel: uint256
    nonce: uint256  # the session within the channel
    amount: uint256  # cumulative owed on (channel, nonce)
    signature: Bytes[65]  # the consumer's, over the EIP-712 Voucher
    close: bool  # close the channel after paying this claim

event Deposited:
    account: indexed(address)
    amount: uint256

event Withdrawn:
    account: indexed(address)
    amount: uint256

event ChannelOpened:
    channel: indexed(uint256)
    consumer: indexed(address)
    provider: indexed(address)
    budget: uint256
    cap: uint256
    expiry: uint256

event ChannelExtended:
    channel: indexed(uint256)
    added: uint256
    cap: uint256
    expiry: uint256

event Claimed:
    channel: indexed(uint256)
    nonce: indexed(uint256)
    provider: indexed(address)
    amount: uint256  # the voucher's cumulative amount
    paid: uint256  # what this claim paid
    channel_claimed: uint256  # the channel's total paid out

event ChannelClosed:
    channel: indexed(uint256)
    claimed: uint256
    refunded: uint256

event BudgetCreated:
    budget: indexed(uint256)
    sponsor: indexed(address)
    amount: uint256
    session_limit: uint256
    expiry: uint256

event BudgetFunded:
    budget: indexed(uint256)
    amount: uint256

event BudgetMember:
    budget: indexed(uint256)
    member: indexed(address)
    allowed: bool

event BudgetReclaimed:
    budget: indexed(uint256)
    amount: uint256

MIN_LIFETIME: public(constant(uint256)) = 60  # seconds a channel must live when opened or extended
MAX_CLAIMS: constant(uint256) = 64
MAX_MEMBERS: constant(uint256) = 128
EIP712_DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
VOUCHER_TYPEHASH: constant(bytes32) = keccak256("Voucher(uint256 channel,uint256 nonce,uint256 amount)")
HALF_ORDER: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

token: public(immutable(IERC20))
accounts: public(HashMap[address, uint256])
channels: public(HashMap[uint256, Channel])
channel_count: public(uint256)
claimed: public(HashMap[uint256, HashMap[uint256, uint256]])  # channel -> nonce -> cumulative paid
budgets: public(HashMap[uint256, Budget])
budget_count: public(uint256)
members: public(HashMap[uint256, HashMap[address, bool]])


@deploy
def __init__(_token: IERC20):
    token = _token


@view
@external
def DOMAIN_SEPARATOR() -> bytes32:
    return self._domain_separator()


@external
def deposit(_amount: uint256):
    """@notice Move `_amount` of the caller's tokens (approved to this contract) into its account."""
    assert _amount > 0, "nothing to deposit"
    assert extcall token.transferFrom(msg.sender, self, _amount), "transfer failed"
    self.accounts[msg.sender] += _amount
    log Deposited(account=msg.sender, amount=_amount)


@external
def withdraw(_amount: uint256):
    assert self.accounts[msg.sender] >= _amount, "insufficient funds"
    self.accounts[msg.sender] -= _amount
    assert extcall token.transfer(msg.sender, _amount), "transfer failed"
    log Withdrawn(account=msg.sender, amount=_amount)


@external
def open_channel(_provider: address, _cap: uint256, _expiry: uint256) -> uint256:
    """@notice Lock `_cap` of the caller's account for `_provider` until `_expiry` (unix seconds)."""
    self._check_new(_provider, _cap, _expiry)
    assert self.accounts[msg.sender] >= _cap, "insufficient funds"
    self.accounts[msg.sender] -= _cap
    return self._open(_provider, 0, _cap, _expiry)


@external
def open_budget_channel(_budget: uint256, _provider: address, _cap: uint256, _expiry: uint256) -> uint256:
    """@notice Lock `_cap` of a budget whose whitelist holds the caller, within its limits."""
    self._check_new(_provider, _cap, _expiry)
    b: Budget = self._usable_budget(_budget, _cap, _expiry)
    self.budgets[_budget].balance = b.balance - _cap
    return self._open(_provider, _budget, _cap, _expiry)


@external
def extend(_channel: uint256, _added: uint256, _expiry: uint256):
    """@notice Add `_added` to an open, live channel of the caller's and move its expiry to `_expiry`
    (never earlier), from wherever the channel was funded."""
    ch: Channel = self.channels[_channel]
    assert ch.consumer == msg.sender, "not the consumer"
    assert not ch.closed, "channel closed"
    assert block.timestamp < ch.expiry, "channel expired"
    assert _expiry >= ch.expiry and _expiry >= block.timestamp + MIN_LIFETIME, "bad expiry"
    if ch.budget == 0:
        assert self.accounts[msg.sender] >= _added, "insufficient funds"
        self.accounts[msg.sender] -= _added
    else:
        b: Budget = self._usable_budget(ch.budget, ch.cap + _added, _expiry)
        assert b.balance >= _added, "insufficient funds"
        self.budgets[ch.budget].balance = b.balance - _added
    self.channels[_channel].cap = ch.cap + _added
    self.channels[_channel].expiry = _expiry
    log ChannelExtended(channel=_channel, added=_added, cap=ch.cap + _added, expiry=_expiry)


@external
def claim(_channel: uint256, _nonce: uint256, _amount: uint256, _signature: Bytes[65], _close: bool) -> uint256:
    """@notice Pay the caller (the channel's provider) what the voucher for cumulative `_amount` on
    session `_nonce` adds to what that session was paid; returns what it paid."""
    paid: uint256 = self._claim(Claim(channel=_channel, nonce=_nonce, amount=_amount, signature=_signature,
                                      close=_close))
    if paid > 0:
        assert extcall token.transfer(msg.sender, paid), "transfer failed"
    return paid


@external
def claim_many(_claims: DynArray[Claim, MAX_CLAIMS]) -> uint256:
    """@notice Several claims of the caller's in one transaction (one token transfer); all or none."""
    paid: uint256 = 0
    for c: Claim in _claims:
        paid += self._claim(c)
    if paid > 0:
        assert extcall token.transfer(msg.sender, paid), "transfer failed"
    return paid


@external
def refund(_channel: uint256):
    """@notice After its expiry, close a channel: what it never paid out returns to its funder.
    Anyone may call it; the money goes to the same place whoever does."""
    ch: Channel = self.channels[_channel]
    assert ch.provider != empty(address), "no such channel"
    assert not ch.closed, "channel closed"
    assert block.timestamp >= ch.expiry, "channel not expired"
    self._close(_channel, ch)


@external
def create_budget(_amount: uint256, _session_limit: uint256, _expiry: uint256,
                  _members: DynArray[address, MAX_MEMBERS]) -> uint256:
    """@notice Move `_amount` of the caller's account into a budget that `_members` may open channels
    from, each locking at most `_session_limit`, until `_expiry`."""
    assert _session_limit > 0, "bad limit"
    assert _expiry >= block.timestamp + MIN_LIFETIME, "bad expiry"
    assert self.accounts[msg.sender] >= _amount, "insufficient funds"
    self.accounts[msg.sender] -= _amount
    self.budget_count += 1
    budget: uint256 = self.budget_count
    self.budgets[budget] = Budget(sponsor=msg.sender, balance=_amount, session_limit=_session_limit,
                                  expiry=_expiry)
    log BudgetCreated(budget=budget, sponsor=msg.sender, amount=_amount, session_limit=_session_limit,
                      expiry=_expiry)
    for member: address in _members:
        self.members[budget][member] = True
        log BudgetMember(budget=budget, member=member, allowed=True)
    return budget


@external
def fund_budget(_budget: uint256, _amount: uint256):
    b: Budget = self.budgets[_budget]
    assert b.sponsor == msg.sender, "not the sponsor"
    assert block.timestamp < b.expiry, "budget expired"
    assert self.accounts[msg.sender] >= _amount, "insufficient funds"
    self.accounts[msg.sender] -= _amount
    self.budgets[_budget].balance = b.balance + _amount
    log BudgetFunded(budget=_budget, amount=_amount)


@external
def set_member(_budget: uint256, _member: address, _allowed: bool):
    assert self.budgets[_budget].sponsor == msg.sender, "not the sponsor"
    self.members[_budget][_member] = _allowed
    log BudgetMember(budget=_budget, member=_member, allowed=_allowed)


@external
def reclaim_budget(_budget: uint256):
    """@notice After its expiry, return what a budget holds to its sponsor's account (again later
    for what channels opened from it refund). Anyone may call it."""
    b: Budget = self.budgets[_budget]
    assert b.sponsor != empty(address), "no such budget"
    assert block.timestamp >= b.expiry, "budget not expired"
    self.budgets[_budget].balance = 0
    self.accounts[b.sponsor] += b.balance
    log BudgetReclaimed(budget=_budget, amount=b.balance)


@view
@external
def voucher_signer(_channel: uint256, _nonce: uint256, _amount: uint256, _signature: Bytes[65]) -> address:
    """@notice Who signed this voucher (empty if no one could have): what a provider may check."""
    return self._signer(_channel, _nonce, _amount, _signature)


@view
@internal
def _domain_separator() -> bytes32:
    return keccak256(abi_encode(EIP712_DOMAIN_TYPEHASH, keccak256("InferswarmEscrow"), keccak256("1"), chain.id,
                                self))


@view
@internal
def _signer(_channel: uint256, _nonce: uint256, _amount: uint256, _signature: Bytes[65]) -> address:
    if len(_signature) != 65:
        return empty(address)
    r: bytes32 = extract32(_signature, 0)
    s: bytes32 = extract32(_signature, 32)
    v: uint8 = convert(slice(_signature, 64, 1), uint8)
    if convert(s, uint256) > HALF_ORDER or (v != 27 and v != 28):
        return empty(address)
    digest: bytes32 = keccak256(concat(
        b"\x19\x01",
        self._domain_separator(),
        keccak256(abi_encode(VOUCHER_TYPEHASH, _channel, _nonce, _amount)),
    ))
    return ecrecover(digest, v, r, s)


@view
@internal
def _check_new(_provider: address, _cap: uint256, _expiry: uint256):
    assert _provider != empty(address) and _provider != msg.sender, "bad provider"
    assert _cap > 0, "nothing to lock"
    assert _expiry >= block.timestamp + MIN_LIFETIME, "bad expiry"


@view
@internal
def _usable_budget(_budget: uint256, _cap: uint256, _expiry: uint256) -> Budget:
    b: Budget = self.budgets[_budget]
    assert b.sponsor != empty(address), "no such budget"
    assert self.members[_budget][msg.sender], "not whitelisted"
    assert block.timestamp < b.expiry and _expiry <= b.expiry, "budget expires first"
    assert _cap <= b.session_limit, "over the session limit"
    return b


@internal
def _open(_provider: address, _budget: uint256, _cap: uint256, _expiry: uint256) -> uint256:
    self.channel_count += 1
    channel: uint256 = self.channel_count
    self.channels[channel] = Channel(consumer=msg.sender, provider=_provider, budget=_budget, cap=_cap, claimed=0,
                                     expiry=_expiry, closed=False)
    log ChannelOpened(channel=channel, consumer=msg.sender, provider=_provider, budget=_budget, cap=_cap,
                      expiry=_expiry)
    return channel


@internal
def _claim(c: Claim) -> uint256:
    ch: Channel = self.channels[c.channel]
    assert ch.provider == msg.sender, "not the provider"
    assert not ch.closed, "channel closed"
    assert block.timestamp < ch.expiry, "channel expired"
    signer: address = self._signer(c.channel, c.nonce, c.amount, c.signature)
    assert signer != empty(address) and signer == ch.consumer, "bad voucher"
    before: uint256 = self.claimed[c.channel][c.nonce]
    assert c.amount > before or (c.close and c.amount == before), "voucher already claimed"
    due: uint256 = c.amount - before
    assert ch.claimed + due <= ch.cap, "over cap"
    self.claimed[c.channel][c.nonce] = c.amount
    ch.claimed += due
    self.channels[c.channel].claimed = ch.claimed
    log Claimed(channel=c.channel, nonce=c.nonce, provider=msg.sender, amount=c.amount, paid=due,
                channel_claimed=ch.claimed)
    if c.close:
        self._close(c.channel, ch)
    return due


@internal
def _close(_channel: uint256, ch: Channel):
    rest: uint256 = ch.cap - ch.claimed
    self.channels[_channel].closed = True
    if ch.budget == 0:
        self.accounts[ch.consumer] += rest
    else:
        self.budgets[ch.budget].balance += rest
    log ChannelClosed(channel=_channel, claimed=ch.claimed, refunded=rest)
