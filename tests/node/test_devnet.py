"""``node devnet``'s JSON-RPC endpoint: the wire's encoding for real clients, and what a web page or
a greedy caller could send it refused."""

from __future__ import annotations

import httpx
import trio

from node.chain import Devnet, serve_devnet
from tests.support import identity
from wallet.chain import Chain, find_deployment

CALL = {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}


async def _served():
    devnet = await trio.to_thread.run_sync(Devnet, identity("devnet-test"))
    return devnet


async def test_what_a_web_page_or_a_greedy_caller_sends_is_refused_and_real_calls_answered():
    devnet = await _served()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_devnet, devnet)
        async with httpx.AsyncClient(timeout=30) as http:
            ok = await http.post(url, json=CALL)
            assert ok.status_code == 200 and ok.json()["result"].startswith("0x")
            page = await http.post(url, json=CALL, headers={"Origin": "https://evil.example"})
            assert page.status_code == 403
            form = await http.post(url, content=b'{"jsonrpc":"2.0"}', headers={"content-type": "text/plain"})
            assert form.status_code == 415
            rebound = await http.post(url, json=CALL, headers={"Host": "evil.example"})
            assert rebound.status_code == 421
            try:  # read no further than the limit: answered 413, or cut off mid-upload
                huge = await http.post(url, content=b"[" + b" " * (2 << 20) + b"]",
                                       headers={"content-type": "application/json"})
                assert huge.status_code == 413
            except httpx.RemoteProtocolError:
                pass
        async with httpx.AsyncClient(timeout=30) as http:  # a new connection: the last one was cut
            assert (await http.post(url, json=CALL)).status_code == 200  # and it still serves
            batch = await http.post(url, json=[CALL] * 101)
            assert "error" in batch.json()
            # a call that would loop forever burns its bounded gas and ends
            loop = await http.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "eth_estimateGas",
                                              "params": [{"data": "0x5b600056"}]})
            assert "error" in loop.json()

            def wire_shapes():
                from web3 import Web3

                w3 = Web3(Web3.HTTPProvider(url))
                chain = Chain(w3, find_deployment(w3, devnet.chain.deployment.escrow))
                block = w3.provider.make_request("eth_getBlockByNumber", ["0x2", True])["result"]  # the token's creation
                tx = block["transactions"][0]
                receipt = w3.provider.make_request("eth_getTransactionReceipt", [tx["hash"]])["result"]
                return chain, tx, receipt, block

            chain, tx, receipt, block = await trio.to_thread.run_sync(wire_shapes)
            assert "blockNumber" in tx and "block_number" not in tx
            assert receipt["to"] is None and receipt["contractAddress"]  # a contract creation
            assert len(block["logsBloom"]) == 2 + 512
        nursery.cancel_scope.cancel()
