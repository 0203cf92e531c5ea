"""The escrow and token contracts on an in-process EVM: the paid flow, batched claims, budgets,
EIP-3009, and every refusal (each a revert that changes nothing)."""

from __future__ import annotations

import os

import pytest
from eth_account import Account

from tests.wallet.chain_rig import address, chain_rig, key
from wallet import BadVoucher, ChainReverted
from wallet.chain import (
    Chain,
    ClaimItem,
    TransferAuthorization,
    Voucher,
    deploy,
    sign_authorization,
    sign_voucher,
    voucher_signer,
)

HOUR = 3600


@pytest.fixture(scope="module")
def base():
    rig = chain_rig()
    rig.fund("alice", tokens=10_000_000, deposit=8_000_000)
    rig.fund("bob")
    rig.fund("carol")
    rig.fund("sponsor", tokens=5_000_000, deposit=5_000_000)
    return rig


@pytest.fixture
def rig(base):
    snapshot = base.snapshot()
    yield base
    base.revert(snapshot)


def _open(rig, cap=1_000_000, provider="bob", consumer="alice", life=HOUR) -> int:
    channel, _ = rig.chain.open_channel(key(consumer), address(provider), cap, rig.chain.now() + life)
    return channel


def _held_matches(rig) -> None:
    c = rig.chain
    open_channels = sum(ch.remaining for ch in (c.channel(i) for i in range(1, c.channel_count() + 1)))
    budgets = sum(c.budget(i).balance for i in range(1, c.budget_count() + 1))
    accounts = sum(c.account(address(n)) for n in ("alice", "bob", "carol", "sponsor"))
    assert c.held() == accounts + open_channels + budgets


def _refused(reason: str, call) -> None:
    with pytest.raises(ChainReverted) as caught:
        call()
    assert caught.value.reason == reason, caught.value.reason


def test_a_provider_is_paid_the_sum_of_its_latest_vouchers_and_the_rest_refunds(rig):
    c = rig.chain
    channel = _open(rig, cap=1_000_000)
    assert c.account(address("alice")) == 7_000_000
    paid, sent = c.claim(key("bob"), [rig.voucher("alice", channel, 1, 1_200)])
    assert paid == 1_200 and sent.tx_hash.startswith("0x") and sent.gas_used > 0
    # one transaction covers many calls: the latest cumulative voucher of each session
    paid, _ = c.claim(key("bob"), [rig.voucher("alice", channel, 1, 5_000), rig.voucher("alice", channel, 2, 700)])
    assert paid == 3_800 + 700
    assert c.token_balance(address("bob")) == 5_700 and c.claimed(channel, 1) == 5_000
    _held_matches(rig)
    _refused("channel not expired", lambda: c.refund(key("carol"), channel))
    rig.advance(HOUR + 1)
    c.refund(key("carol"), channel)  # anyone may: the rest goes to the consumer whoever calls
    assert c.channel(channel).closed and c.account(address("alice")) == 8_000_000 - 5_700
    _held_matches(rig)


def test_a_claim_may_close_the_channel_and_return_the_rest_at_once(rig):
    c = rig.chain
    channel = _open(rig, cap=100_000)
    paid, _ = c.claim(key("bob"), [rig.voucher("alice", channel, 7, 2_500, close=True)])
    assert paid == 2_500 and c.channel(channel).closed
    assert c.account(address("alice")) == 8_000_000 - 2_500
    _refused("channel closed", lambda: c.claim(key("bob"), [rig.voucher("alice", channel, 8, 1)]))
    _held_matches(rig)


def test_replayed_and_reordered_vouchers_revert(rig):
    c = rig.chain
    channel = _open(rig)
    old, new = rig.voucher("alice", channel, 1, 1_000), rig.voucher("alice", channel, 1, 3_000)
    c.claim(key("bob"), [new])
    _refused("voucher already claimed", lambda: c.claim(key("bob"), [new]))
    _refused("voucher already claimed", lambda: c.claim(key("bob"), [old]))
    assert c.token_balance(address("bob")) == 3_000


def test_a_voucher_for_another_channel_contract_or_chain_reverts(rig):
    c = rig.chain
    channel, other = _open(rig), _open(rig)
    elsewhere = deploy(rig.w3, rig.minter)
    signed_for_other = rig.voucher("alice", other, 1, 500)
    wrong_channel = ClaimItem(channel, 1, 500, signed_for_other.signature)
    for item in (wrong_channel,
                 rig.voucher("alice", channel, 1, 500, contract=elsewhere.escrow),
                 rig.voucher("alice", channel, 1, 500, chain_id=rig.deployment.chain_id + 1),
                 rig.voucher("carol", channel, 1, 500)):  # not the channel's consumer
        _refused("bad voucher", lambda item=item: c.claim(key("bob"), [item]))
    assert c.token_balance(address("bob")) == 0


def test_claims_above_the_cap_by_a_stranger_after_expiry_or_after_refund_revert(rig):
    c = rig.chain
    channel = _open(rig, cap=10_000)
    _refused("over cap", lambda: c.claim(key("bob"), [rig.voucher("alice", channel, 1, 10_001)]))
    c.claim(key("bob"), [rig.voucher("alice", channel, 1, 6_000)])
    _refused("over cap", lambda: c.claim(key("bob"), [rig.voucher("alice", channel, 2, 4_001)]))  # across sessions
    _refused("not the provider", lambda: c.claim(key("carol"), [rig.voucher("alice", channel, 3, 10)]))
    rig.advance(HOUR + 1)
    _refused("channel expired", lambda: c.claim(key("bob"), [rig.voucher("alice", channel, 3, 10)]))
    c.refund(key("alice"), channel)
    _refused("channel closed", lambda: c.claim(key("bob"), [rig.voucher("alice", channel, 3, 10)]))
    _refused("channel closed", lambda: c.refund(key("alice"), channel))
    assert c.token_balance(address("bob")) == 6_000
    _held_matches(rig)


def test_a_batch_is_all_or_none(rig):
    c = rig.chain
    channel = _open(rig, cap=10_000)
    good, bad = rig.voucher("alice", channel, 1, 3_000), rig.voucher("carol", channel, 2, 1_000)
    _refused("bad voucher", lambda: c.claim(key("bob"), [good, bad]))
    assert c.claimed(channel, 1) == 0 and c.token_balance(address("bob")) == 0
    assert c.claim(key("bob"), [good])[0] == 3_000


def test_opening_and_extending_check_funds_expiry_and_the_consumer(rig):
    c = rig.chain
    now = c.now()
    _refused("insufficient funds", lambda: c.open_channel(key("alice"), address("bob"), 8_000_001, now + HOUR))
    _refused("bad expiry", lambda: c.open_channel(key("alice"), address("bob"), 5, now + 30))
    _refused("bad provider", lambda: c.open_channel(key("alice"), address("alice"), 5, now + HOUR))
    _refused("nothing to lock", lambda: c.open_channel(key("alice"), address("bob"), 0, now + HOUR))
    channel = _open(rig, cap=1_000)
    expiry = c.channel(channel).expiry
    _refused("not the consumer", lambda: c.extend(key("carol"), channel, 10, expiry + HOUR))
    _refused("bad expiry", lambda: c.extend(key("alice"), channel, 10, expiry - 1))
    c.extend(key("alice"), channel, 500, expiry + HOUR)
    state = c.channel(channel)
    assert (state.cap, state.expiry) == (1_500, expiry + HOUR)
    assert c.claim(key("bob"), [rig.voucher("alice", channel, 1, 1_500)])[0] == 1_500
    _refused("insufficient funds", lambda: c.withdraw(key("alice"), 8_000_000))
    c.withdraw(key("alice"), 1_000_000)
    assert c.token_balance(address("alice")) == 3_000_000
    _held_matches(rig)


def test_a_budget_funds_whitelisted_keys_within_its_limits_and_returns_the_rest(rig):
    c = rig.chain
    now = c.now()
    budget, _ = c.create_budget(key("sponsor"), 1_000_000, 300_000, now + 2 * HOUR, [address("alice")])
    _refused("not whitelisted", lambda: c.open_budget_channel(key("carol"), budget, address("bob"), 1_000,
                                                              now + HOUR))
    _refused("over the session limit", lambda: c.open_budget_channel(key("alice"), budget, address("bob"),
                                                                     300_001, now + HOUR))
    _refused("budget expires first", lambda: c.open_budget_channel(key("alice"), budget, address("bob"), 1_000,
                                                                   now + 3 * HOUR))
    channel, _ = c.open_budget_channel(key("alice"), budget, address("bob"), 300_000, now + HOUR)
    assert c.budget(budget).balance == 700_000
    _refused("over the session limit", lambda: c.extend(key("alice"), channel, 1, now + HOUR))
    assert c.claim(key("bob"), [rig.voucher("alice", channel, 1, 120_000, close=True)])[0] == 120_000
    assert c.budget(budget).balance == 880_000  # the channel's rest went back to the budget
    c.set_member(key("sponsor"), budget, address("alice"), False)
    _refused("not whitelisted", lambda: c.open_budget_channel(key("alice"), budget, address("bob"), 1_000,
                                                              now + HOUR))
    _refused("not the sponsor", lambda: c.set_member(key("alice"), budget, address("alice"), True))
    _refused("budget not expired", lambda: c.reclaim_budget(key("sponsor"), budget))
    rig.advance(2 * HOUR)
    c.reclaim_budget(key("carol"), budget)
    assert c.budget(budget).balance == 0 and c.account(address("sponsor")) == 5_000_000 - 120_000
    _held_matches(rig)


def test_vouchers_are_recovered_here_as_the_contract_does_and_malleable_ones_refused(rig):
    channel = _open(rig)
    v = Voucher(rig.deployment.chain_id, rig.deployment.escrow, channel, 3, 42)
    sig = sign_voucher(key("alice"), v)
    assert voucher_signer(v, sig) == address("alice")
    assert rig.chain.escrow.functions.voucher_signer(channel, 3, 42, sig).call() == address("alice")
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(sig[32:64], "big")
    twin = sig[:32] + (n - s).to_bytes(32, "big") + bytes([55 - sig[64]])  # the same signature, malleated
    with pytest.raises(BadVoucher, match="malleable"):
        voucher_signer(v, twin)
    assert rig.chain.escrow.functions.voucher_signer(channel, 3, 42, twin).call() == "0x" + "00" * 20
    _refused("bad voucher", lambda: rig.chain.claim(key("bob"), [ClaimItem(channel, 3, 42, twin)]))
    with pytest.raises(BadVoucher):
        voucher_signer(v, sig[:64])
    with pytest.raises(BadVoucher):
        voucher_signer(Voucher(rig.deployment.chain_id, rig.deployment.escrow, channel, -1, 42), sig)


def test_a_transfer_authorization_pays_once_and_only_for_its_signer(rig):
    c = rig.chain
    now = c.now()
    auth = TransferAuthorization(chain_id=rig.deployment.chain_id, token=rig.deployment.token,
                                 token_name="Inferswarm USD", sender=address("alice"), receiver=address("bob"),
                                 value=250, valid_after=now - 10, valid_before=now + HOUR, nonce=os.urandom(32))
    sig = sign_authorization(key("alice"), auth)
    args = (auth.sender, auth.receiver, auth.value, auth.valid_after, auth.valid_before, auth.nonce)
    forged = sign_authorization(key("carol"), auth)
    _refused("bad signature", lambda: c.transfer_with_authorization(key("carol"), *args, forged))
    _refused("bad signature", lambda: c.transfer_with_authorization(key("carol"), args[0], args[1], 251,
                                                                    *args[3:], sig))
    c.transfer_with_authorization(key("carol"), *args, sig)  # anyone submits; the signer pays
    assert c.token_balance(address("bob")) == 250 and c.authorization_used(auth.sender, auth.nonce)
    _refused("authorization used", lambda: c.transfer_with_authorization(key("carol"), *args, sig))
    late = TransferAuthorization(**{**auth.__dict__, "nonce": os.urandom(32), "valid_before": now + 5})
    rig.advance(60)
    _refused("authorization expired", lambda: c.transfer_with_authorization(
        key("carol"), late.sender, late.receiver, late.value, late.valid_after, late.valid_before, late.nonce,
        sign_authorization(key("alice"), late)))


def test_only_the_minter_mints_and_a_wrong_chain_is_reported(rig):
    _refused("minter only", lambda: rig.chain.mint(key("alice"), address("alice"), 1))
    from wallet import ChainUnreachable
    from wallet.chain import Deployment

    wrong = Chain(rig.w3, Deployment(rig.deployment.chain_id + 1, rig.deployment.token, rig.deployment.escrow))
    with pytest.raises(ChainUnreachable, match="on chain"):
        wrong.check()
    rig.chain.check()
    assert Account.from_key(key("alice")).address == address("alice")


def test_a_look_alike_deployment_is_refused(rig):
    """An escrow of ours over a token that is not ours (any code answering like one could "pay"
    without moving value) is no deployment to settle on; neither is an address with no escrow."""
    from wallet import ChainUnreachable
    from wallet.chain import find_deployment, load_artifact

    assert find_deployment(rig.w3, rig.deployment.escrow) == rig.deployment
    artifact = load_artifact("Escrow")
    factory = rig.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    fake_token = rig.deployment.escrow  # code that is not the stablecoin's
    tx = factory.constructor(fake_token).build_transaction({
        "from": address("alice"), "nonce": rig.w3.eth.get_transaction_count(address("alice"))})
    signed = Account.from_key(key("alice")).sign_transaction(tx)
    escrow = rig.w3.eth.wait_for_transaction_receipt(rig.w3.eth.send_raw_transaction(signed.raw_transaction))
    with pytest.raises(ChainUnreachable, match="not Inferswarm's Stablecoin"):
        find_deployment(rig.w3, escrow["contractAddress"])
    with pytest.raises(ChainUnreachable, match="no Inferswarm escrow"):
        find_deployment(rig.w3, rig.deployment.token)
