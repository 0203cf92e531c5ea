"""EIP-712 messages the contracts check: the escrow's Voucher and the token's EIP-3009 transfer
authorization. Each is signed and recovered here the way the contract does it, so a node can refuse a
bad one before it ever reaches a chain.

A **Voucher** ``(channel, nonce, amount)`` is the consumer's promise that it owes ``amount`` in all
(cumulative) for session ``nonce`` of ``channel``, under the domain ``InferswarmEscrow`` version 1
of one escrow contract on one chain: a voucher for another channel, contract or chain recovers to
another address. The provider claims the latest; the contract pays the difference to what that
session was paid, so an older or replayed voucher pays nothing (it reverts).

Signatures are 65 bytes ``r || s || v`` with ``v`` in {27, 28} and ``s`` in the lower half of the
curve order (no malleated twin), as the contracts require.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data

from .._errors import BadVoucher

__all__ = ["Voucher", "TransferAuthorization", "sign_voucher", "voucher_signer", "sign_authorization",
           "authorization_signer", "ESCROW_DOMAIN_NAME", "ESCROW_DOMAIN_VERSION"]

ESCROW_DOMAIN_NAME = "InferswarmEscrow"
ESCROW_DOMAIN_VERSION = "1"
_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
_UINT256 = 1 << 256
_DOMAIN_TYPE = [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}]


@dataclass(frozen=True)
class Voucher:
    """What a consumer signs for a session of a channel: the cumulative amount owed (µc = token units)."""

    chain_id: int
    contract: str  # the escrow contract's address
    channel: int
    nonce: int
    amount: int

    def typed_data(self) -> dict[str, Any]:
        for field in ("chain_id", "channel", "nonce", "amount"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _UINT256:
                raise BadVoucher(f"voucher {field} must be an integer in [0, 2**256), got {value!r}")
        return {
            "types": {"EIP712Domain": _DOMAIN_TYPE,
                      "Voucher": [{"name": "channel", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
                                  {"name": "amount", "type": "uint256"}]},
            "primaryType": "Voucher",
            "domain": {"name": ESCROW_DOMAIN_NAME, "version": ESCROW_DOMAIN_VERSION, "chainId": self.chain_id,
                       "verifyingContract": self.contract},
            "message": {"channel": self.channel, "nonce": self.nonce, "amount": self.amount},
        }


@dataclass(frozen=True)
class TransferAuthorization:
    """An EIP-3009 ``TransferWithAuthorization`` of the test stablecoin (what x402's exact scheme pays with)."""

    chain_id: int
    token: str  # the token contract's address
    token_name: str  # its EIP-712 domain name (the token's ``name()``); version is "2", as USDC
    sender: str
    receiver: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes  # 32 random bytes, never reused by the sender

    def typed_data(self) -> dict[str, Any]:
        if len(self.nonce) != 32:
            raise BadVoucher("an authorization's nonce is 32 bytes")
        return {
            "types": {"EIP712Domain": _DOMAIN_TYPE,
                      "TransferWithAuthorization": [
                          {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
                          {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
                          {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}]},
            "primaryType": "TransferWithAuthorization",
            "domain": {"name": self.token_name, "version": "2", "chainId": self.chain_id,
                       "verifyingContract": self.token},
            "message": {"from": self.sender, "to": self.receiver, "value": self.value,
                        "validAfter": self.valid_after, "validBefore": self.valid_before, "nonce": self.nonce},
        }


def _sign(private_key: bytes, data: dict[str, Any]) -> bytes:
    signed = Account.sign_message(encode_typed_data(full_message=data), private_key)
    return bytes(signed.signature)


def _recover(data: dict[str, Any], signature: bytes) -> str:
    if not isinstance(signature, bytes | bytearray) or len(signature) != 65:
        raise BadVoucher("a signature is 65 bytes (r, s, v)")
    if int.from_bytes(signature[32:64], "big") > _HALF_ORDER or signature[64] not in (27, 28):
        raise BadVoucher("a malleable or malformed signature (high s, or v not 27/28)")
    try:
        return Account.recover_message(encode_typed_data(full_message=data), signature=bytes(signature))
    except Exception as exc:  # eth-keys' BadSignature, ValueError: no address recovers
        raise BadVoucher(f"the signature recovers no address: {exc}") from exc


def sign_voucher(private_key: bytes, voucher: Voucher) -> bytes:
    """The 65-byte signature of ``voucher`` by the secp256k1 key ``private_key``."""
    return _sign(private_key, voucher.typed_data())


def voucher_signer(voucher: Voucher, signature: bytes) -> str:
    """The (checksummed) address that signed ``voucher``: the contract pays only if it is the consumer's.

    Raises:
        BadVoucher: a malformed voucher or signature.
    """
    return _recover(voucher.typed_data(), signature)


def sign_authorization(private_key: bytes, authorization: TransferAuthorization) -> bytes:
    return _sign(private_key, authorization.typed_data())


def authorization_signer(authorization: TransferAuthorization, signature: bytes) -> str:
    """Raises:
        BadVoucher: a malformed authorization or signature.
    """
    return _recover(authorization.typed_data(), signature)
