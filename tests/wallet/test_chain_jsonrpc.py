"""The whole paid flow on a real JSON-RPC node started by the test, through web3.py's HTTP
provider: ganache (an EVM of its own, from the npm registry: ``make test`` installs it) and our
``node devnet``. Deploy, fund, deposit, open, claim two sessions' vouchers in one transaction,
refuse a replay, refund after expiry, pay with an EIP-3009 authorization: balances exact."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from web3 import Web3

from tests.e2e.daemons import ROOT, DevnetProcess
from tests.wallet.chain_rig import address, key
from wallet import ChainReverted
from wallet.chain import (
    Chain,
    ClaimItem,
    TransferAuthorization,
    Voucher,
    deploy,
    fund_gas,
    sign_authorization,
    sign_voucher,
)

GANACHE = ROOT / ".venv" / "npm" / "node_modules"


def _ganache():
    if not (GANACHE / "ganache").is_dir() or shutil.which("node") is None:
        pytest.skip("ganache is not installed (make test installs it with npm) or node is missing")
    proc = subprocess.Popen(["node", str(Path(__file__).with_name("ganache_on_port_0.js"))], cwd=ROOT,
                            env={**os.environ, "NODE_PATH": str(GANACHE)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("port "):
        proc.kill()
        raise AssertionError(f"ganache did not start: {line}{proc.stdout.read()[-2000:]}")
    return f"http://127.0.0.1:{int(line.split()[1])}", proc


@pytest.fixture(params=["ganache", "devnet"])
def rpc_url(request):
    if request.param == "ganache":
        url, proc = _ganache()
        yield url
        proc.kill()
        proc.wait()
        proc.stdout.close()
    else:
        devnet = DevnetProcess()
        yield devnet.url
        assert devnet.stop() == 0


@pytest.mark.slow
def test_the_paid_flow_on_a_json_rpc_node(rpc_url):
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 60}))
    for name in ("minter", "alice", "bob", "carol"):
        fund_gas(w3, address(name))
    chain = Chain(w3, deploy(w3, key("minter")))
    chain.check()
    c = chain
    c.mint(key("minter"), address("alice"), 5_000_000)
    c.deposit(key("alice"), 4_000_000)
    channel, _ = c.open_channel(key("alice"), address("bob"), 1_000_000, c.now() + 3600)

    def voucher(nonce: int, amount: int) -> ClaimItem:
        v = Voucher(chain.deployment.chain_id, chain.deployment.escrow, channel, nonce, amount)
        return ClaimItem(channel, nonce, amount, sign_voucher(key("alice"), v))

    paid, sent = c.claim(key("bob"), [voucher(1, 1_500), voucher(2, 700)])  # two sessions, one transaction
    assert paid == 2_200 and w3.eth.get_transaction_receipt(sent.tx_hash)["status"] == 1
    with pytest.raises(ChainReverted, match="voucher already claimed"):
        c.claim(key("bob"), [voucher(1, 1_500)])
    with pytest.raises(ChainReverted, match="channel not expired"):
        c.refund(key("carol"), channel)
    w3.provider.make_request("evm_increaseTime", [3601])
    w3.provider.make_request("evm_mine", [])
    c.refund(key("carol"), channel)
    assert c.token_balance(address("bob")) == 2_200
    assert c.account(address("alice")) == 4_000_000 - 2_200
    assert c.held() == c.account(address("alice"))

    now = c.now()
    auth = TransferAuthorization(chain_id=chain.deployment.chain_id, token=chain.deployment.token,
                                 token_name=c.token_name(), sender=address("alice"), receiver=address("carol"),
                                 value=300, valid_after=0, valid_before=now + 600, nonce=os.urandom(32))
    sig = sign_authorization(key("alice"), auth)
    c.transfer_with_authorization(key("carol"), auth.sender, auth.receiver, auth.value, auth.valid_after,
                                  auth.valid_before, auth.nonce, sig)
    assert c.token_balance(address("carol")) == 300 and c.token_balance(address("alice")) == 1_000_000 - 300
    with pytest.raises(ChainReverted, match="authorization used"):
        c.transfer_with_authorization(key("carol"), auth.sender, auth.receiver, auth.value, auth.valid_after,
                                      auth.valid_before, auth.nonce, sig)
