"""A development chain other processes can reach: the in-process EVM (eth-tester on py-evm) behind
a JSON-RPC endpoint on loopback, with our contracts deployed (``node devnet``; ``node start
--devnet`` runs one inside the daemon and settles on it).

The endpoint speaks Ethereum JSON-RPC 2.0 over HTTP POST (one call or a batch of at most
``MAX_BATCH``; bodies of at most ``MAX_BODY`` bytes, read no further; ``application/json`` only,
and only to a loopback ``Host`` with no foreign ``Origin``: a web page cannot use it; an
``eth_call`` or estimate burns at most ``CALL_GAS_MAX``): what eth-tester answers, in the wire's
encoding (quantities and data as 0x-hex, camelCase keys, a creation's ``to`` null, blooms
whole), and a contract's refusal as error code 3
``execution reverted: <reason>`` with the ABI-encoded ``Error(string)`` as data, as geth and
ganache send it; ``evm_increaseTime`` and ``evm_mine`` move its clock as on ganache and hardhat.
Two methods of its own:

- ``inferswarm_deployment`` → ``{chainId, token, escrow, spec}``: where the contracts are, and the
  ``evm:URL#ESCROW`` to give ``node start --chain``;
- ``inferswarm_faucet(address, amount)`` → the mint's transaction hash: ``amount`` µc of the test
  stablecoin (at most ``FAUCET_MAX`` a call) and ether for gas, for a key that holds nothing yet.

A devnet is a toy chain: it lives as long as its process, and anyone who reaches the port can
mint. It listens on loopback only. eth-tester is not thread-safe: calls run one at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any

import trio

from wallet import Identity

__all__ = ["Devnet", "serve_devnet", "CALL_GAS_MAX", "FAUCET_MAX", "MAX_BATCH", "MAX_BODY"]

FAUCET_MAX = 10**9  # µc a faucet call may mint: a thousand credits
CALL_GAS_MAX = 6_000_000  # gas an eth_call or estimate may burn (a batch of 64 claims takes 2.4 M)
MAX_BATCH = 100
MAX_BODY = 1 << 20
_ERROR_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
_logger = logging.getLogger(__name__)


def _wire(value: Any, key: str = "") -> Any:
    """A result of eth-tester's in the JSON-RPC encoding: integers as 0x-hex quantities, bytes as
    0x-hex data, a bloom as its 256 bytes, a contract creation's ``to`` as null."""
    if key == "to" and value == "":
        return None
    if key == "logsBloom" and isinstance(value, int):
        return "0x" + value.to_bytes(256, "big").hex()
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict):
        return {k: _wire(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire(v) for v in value]
    return str(value)


class Devnet:
    """The chain and its contracts; ``handle`` answers one JSON-RPC call (from any thread, one at a time)."""

    def __init__(self, deployer: Identity) -> None:
        from web3.providers.eth_tester import middleware

        from wallet.chain import Chain, deploy, fund_gas, in_process_web3

        self.w3 = in_process_web3()
        self.deployer = deployer
        fund_gas(self.w3, deployer.eth_address)
        self.chain = Chain(self.w3, deploy(self.w3, deployer.eth_key))
        self.url = ""  # set once served
        self._caller = self.w3.eth.accounts[0]
        self._lock = threading.Lock()
        self._requests = middleware.request_formatters
        self._results = middleware.result_formatters or {}

    @property
    def spec(self) -> str:
        return f"evm:{self.url}#{self.chain.deployment.escrow}"

    def handle(self, call: Any) -> dict[str, Any]:
        """The JSON-RPC response to ``call`` (a dict with ``method`` and ``params``)."""
        if not isinstance(call, dict) or not isinstance(call.get("method"), str):
            return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "not a JSON-RPC request"}}
        cid, method, params = call.get("id"), call["method"], call.get("params") or []
        if not isinstance(params, list):
            return {"jsonrpc": "2.0", "id": cid, "error": {"code": -32602, "message": "params must be a list"}}
        with self._lock:
            try:
                result = self._call(method, params)
            except _RpcError as exc:
                return {"jsonrpc": "2.0", "id": cid, "error": exc.error}
            except Exception as exc:  # eth-tester's refusals: a revert, a bad transaction, a bad argument
                return {"jsonrpc": "2.0", "id": cid, "error": _error_of(exc)}
        return {"jsonrpc": "2.0", "id": cid, "result": result}

    def _call(self, method: str, params: list[Any]) -> Any:
        if method == "inferswarm_deployment":
            d = self.chain.deployment
            return {"chainId": hex(d.chain_id), "token": d.token, "escrow": d.escrow, "spec": self.spec}
        if method == "inferswarm_faucet":
            return self._faucet(params)
        if method == "evm_increaseTime":  # as ganache and hardhat: move the chain's clock on (and mine)
            seconds = int(params[0], 16) if params and isinstance(params[0], str) else int(params[0] if params else 0)
            if not 0 <= seconds <= 10 * 365 * 86_400:
                raise _RpcError({"code": -32602, "message": "evm_increaseTime takes 0 to ten years of seconds"})
            if seconds:
                self.w3.provider.ethereum_tester.time_travel(self.chain.now() + seconds)
            return hex(seconds)
        if method == "evm_mine":
            self.w3.provider.ethereum_tester.mine_blocks(1)
            return "0x0"
        if method in ("eth_call", "eth_estimateGas", "eth_createAccessList") and params and isinstance(params[0], dict):
            call = dict(params[0])
            call.setdefault("from", self._caller)  # eth-tester needs a sender; calls may omit it
            gas = call.get("gas")
            limit = int(gas, 16) if isinstance(gas, str) else int(gas or 0)
            if not 0 < limit <= CALL_GAS_MAX:
                call["gas"] = hex(CALL_GAS_MAX)  # one call holds the chain: a bounded run (about a second)
            params = [call, *params[1:]]
        formatter = self._requests.get(method)
        if formatter is not None:
            params = formatter(params)
        response = self.w3.provider.make_request(method, params)
        if "error" in response:
            raise _RpcError(response["error"])
        result = response.get("result")
        formatter = self._results.get(method)
        result = formatter(result) if formatter is not None else result
        if method in ("eth_getBlockByNumber", "eth_getBlockByHash") and isinstance(result, dict):
            result = {**result, "transactions": [self._transaction(t) if isinstance(t, dict) else t
                                                 for t in result.get("transactions", [])]}
        return _wire(result)

    def _transaction(self, tx: dict[str, Any]) -> dict[str, Any]:
        """A block's full transaction as eth_getTransactionByHash words it (camelCase keys)."""
        return self._results["eth_getTransactionByHash"](tx)

    def _faucet(self, params: list[Any]) -> str:
        from web3 import Web3

        from wallet.chain import fund_gas

        if len(params) != 2:
            raise _RpcError({"code": -32602, "message": "inferswarm_faucet takes [address, amount]"})
        try:
            address = Web3.to_checksum_address(params[0])
            amount = int(params[1], 16) if isinstance(params[1], str) else int(params[1])
        except (TypeError, ValueError) as exc:
            raise _RpcError({"code": -32602, "message": f"inferswarm_faucet: {exc}"}) from exc
        if not 0 < amount <= FAUCET_MAX:
            raise _RpcError({"code": -32602, "message": f"inferswarm_faucet mints 1 to {FAUCET_MAX} µc a call"})
        if self.w3.eth.get_balance(address) < 10**18:
            fund_gas(self.w3, address)
        return self.chain.mint(self.deployer.eth_key, address, amount).tx_hash


class _RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.error = error


def _error_of(exc: Exception) -> dict[str, Any]:
    from eth_abi import encode
    from eth_tester.exceptions import TransactionFailed

    if isinstance(exc, TransactionFailed):
        text = str(exc.args[0] if exc.args else exc)
        reason = text.split("execution reverted", 1)[1].lstrip(": ").strip("'\" ") if "execution reverted" in text \
            else text
        data = "0x" + (_ERROR_SELECTOR + encode(["string"], [reason])).hex() if reason else "0x"
        return {"code": 3, "message": f"execution reverted: {reason}" if reason else "execution reverted",
                "data": data}
    return {"code": -32000, "message": f"{type(exc).__name__}: {exc}"}


async def serve_devnet(devnet: Devnet, bind: str = "127.0.0.1:0", *,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``devnet`` on ``bind`` (loopback) until cancelled; ``task_status.started`` gets its URL.

    Raises:
        ValueError: ``bind`` is not HOST:PORT on loopback.
    """
    import hypercorn.config
    import hypercorn.trio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .._daemon import _check_loopback_api

    _check_loopback_api(bind)
    limiter = trio.CapacityLimiter(1)

    def refused(status: int, message: str) -> Response:
        return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}},
                            status_code=status)

    async def rpc(request: Request) -> Response:
        # what a web page could send it: another Host (DNS rebinding), another Origin, a form's body
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            return refused(421, "this devnet answers only to 127.0.0.1, localhost or [::1]")
        origin = request.headers.get("origin")
        if origin is not None and origin.rsplit(":", 1)[0] not in ("http://127.0.0.1", "http://localhost",
                                                                     "http://[::1]"):
            return refused(403, "requests from web pages are refused")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return refused(415, "JSON-RPC bodies are application/json")
        body = b""
        async with contextlib.aclosing(request.stream()) as pieces:
            async for piece in pieces:
                body += piece
                if len(body) > MAX_BODY:
                    return refused(413, f"a body holds at most {MAX_BODY} bytes")
        try:
            doc = json.loads(body)
        except ValueError:
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}})
        if isinstance(doc, list):
            if not 0 < len(doc) <= MAX_BATCH:
                return JSONResponse({"jsonrpc": "2.0", "id": None,
                                     "error": {"code": -32600, "message": f"a batch holds 1 to {MAX_BATCH} calls"}})
            return JSONResponse(await trio.to_thread.run_sync(lambda: [devnet.handle(c) for c in doc],
                                                              limiter=limiter))
        return JSONResponse(await trio.to_thread.run_sync(devnet.handle, doc, limiter=limiter))

    config = hypercorn.config.Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("node.devnet")
    config.graceful_timeout = 1.0
    app = Starlette(routes=[Route("/", rpc, methods=["POST"])])

    class _Status:
        def started(self, binds: Any = None) -> None:
            devnet.url = binds[0]
            _logger.info("devnet chain %d on %s (escrow %s)", devnet.chain.deployment.chain_id, devnet.url,
                         devnet.chain.deployment.escrow)
            task_status.started(devnet.url)

    await hypercorn.trio.serve(app, config, task_status=_Status())
