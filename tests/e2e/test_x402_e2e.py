"""x402 through the whole swarm, across processes: ``node devnet`` serves a shared chain; a consumer
daemon started with ``--chain <it> --x402`` takes payments; a plain HTTP client that runs no node
and holds only a key (its test tokens from the devnet's faucet) gets 402, pays one chat completion
with an EIP-3009 authorization made by the x402 SDK, and is served by a real provider daemon, paid
in turn through the escrow agent. Balances on the chain are exact afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from eth_account import Account
from web3 import Web3
from x402 import x402ClientSync
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.exact import ExactEvmScheme

import protocol
from tests.e2e.daemons import DevnetProcess, start_market
from wallet.chain import Chain, find_deployment

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.mark.slow
def test_a_wallet_pays_one_chat_through_the_swarm_with_x402_on_a_shared_devnet(tmp_path):
    devnet = DevnetProcess()
    started = []
    try:
        agent, provider, consumer, aid = start_market(tmp_path, started, consumer_args=("--chain", devnet.spec, "--x402"))
        assert consumer.info["chain"] == devnet.spec and "anyone who reaches it can mint" in consumer.info["x402"]
        w3 = Web3(Web3.HTTPProvider(devnet.url))
        chain = Chain(w3, find_deployment(w3, devnet.escrow))
        payer = Account.create()
        w3.provider.make_request("inferswarm_faucet", [payer.address, 2_000_000])
        assert chain.token_balance(payer.address) == 2_000_000

        url = consumer.info["api_url"] + "/v1/chat/completions"
        asked = httpx.post(url, json=BODY, timeout=60)
        assert asked.status_code == 402, asked.text
        required = decode_payment_required_header(asked.headers["payment-required"])
        need = required.accepts[0]
        client = x402ClientSync().register(need.network, ExactEvmScheme(payer))
        client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})
        header = encode_payment_signature_header(client.create_payment_payload(required))
        served = httpx.post(url, json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=120)
        assert served.status_code == 200, served.text
        doc = served.json()
        assert doc["provider"] == provider.info["peer_id"] and 0 < doc["cost"] <= int(need.amount)
        settled = decode_payment_response_header(served.headers["payment-response"])
        assert settled.success and settled.payer == payer.address
        assert w3.eth.get_transaction_receipt(settled.transaction)["status"] == 1
        assert chain.token_balance(payer.address) == 2_000_000 - int(need.amount)
        assert chain.token_balance(need.pay_to) == int(need.amount)
        # the provider was paid for the call through the escrow agent, as for any of the node's calls
        (stored,) = json.loads(consumer.cli("receipts", "--json").stdout)["receipts"]
        receipt = protocol.decode(bytes.fromhex(stored["encoded"]), expect=(protocol.Receipt,))
        assert protocol.receipt_hash(receipt).hex() == doc["receipt_id"] and receipt.cost == doc["cost"]
        assert receipt.agent == aid
        again = httpx.post(url, json=BODY, headers={"PAYMENT-SIGNATURE": header}, timeout=60)
        assert again.status_code == 402 and again.json()["error"]["code"] == "nonce_used"
    finally:
        for d in reversed(started):
            d.stop()
        assert devnet.stop() == 0
