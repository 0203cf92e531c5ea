"""x402 on the OpenAI face: a caller that runs no node and holds no token pays for each request
on the chain of ``[node] chain`` (``[node] x402 = true`` / ``node start --x402``).

A chat completion sent without ``Authorization`` is answered ``402 Payment Required`` with x402
version 2 payment requirements in the ``PAYMENT-REQUIRED`` header (base64 JSON): scheme ``exact``,
the test stablecoin (with its EIP-712 name and version), this node's chain account as payee, and
the amount: the most this very request may cost at any provider the node would try
(``Renter.quote``: its whole prompt and a full ``max_tokens`` answer), since the payment is taken
before the call. The client signs an EIP-3009 authorization for it and sends the request again
with ``PAYMENT-SIGNATURE``; the node verifies it (``wallet.chain.verify_payment``: payee, amount,
validity, signature, unused nonce, the payer's balance — no gas spent on a bad one), settles it
with its own facilitator code (``settle_payment``: ``transferWithAuthorization``, mined), serves
the call through the swarm with that amount as its budget, and answers with ``PAYMENT-RESPONSE``
(the settlement: transaction hash, payer, network, amount). The node keeps what the swarm call
cost less than the quote: it sells at the worst case, as "exact" asks.

One payment pays one request: the token refuses a second use of an authorization, and while one
settles, the same authorization on another request is refused at once. A call that fails after its
payment settled with an error proving this node paid nothing for it (``refundable``: no provider
could serve it, nothing streamed) is refunded by a token transfer (this node pays that gas); one
that was answered and counter-signed is not, acknowledged or not, nor one the caller abandons (it
closed the connection): it was served as far as the caller read. A call that would cost nothing
(free providers) is served without payment. With x402 on, ``GET /v1/models`` needs no token either:
what is for sale is public.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import InvalidRequest, LocalError

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..chain import ChainLink

__all__ = ["PaymentRequired", "Paid", "X402Gate", "PAYMENT_HEADER", "PAYMENT_RESPONSE_HEADER", "refundable"]

PAYMENT_HEADER = "payment-signature"
REQUIRED_HEADER = "payment-required"
PAYMENT_RESPONSE_HEADER = "payment-response"
MAX_TIMEOUT_S = 300  # how long an authorization for a quote may stay valid
_MAX_HEADER = 8192  # bytes: a payment header is ~1 KiB
_logger = logging.getLogger(__name__)


def refundable(exc: BaseException) -> bool:
    """Whether a failed call's error proves this node counter-signed nothing for it, so the x402
    payment goes back: no provider could serve it (each failure of a session is unpaid), the escrow
    agent or this node's own bounds refused it first. Never a call that was answered and
    counter-signed (``SettlementUnconfirmed``: its provider may claim it, acknowledged or not), a
    receipt this node could not store, or an error it does not know (a bug: the operator decides)."""
    import protocol

    from ..consumer import RentError
    from ..consumer._delivery import SettlementUnconfirmed
    from ..consumer._pacing import Busy
    from ..consumer._session_client import SessionError
    from ..escrow import EscrowRefused, EscrowUnreachable

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, SettlementUnconfirmed):
        return False
    return isinstance(exc, RentError | SessionError | EscrowRefused | EscrowUnreachable | Busy | InvalidRequest
                      | protocol.SpendLimitReached | protocol.MessageTooLarge)


class PaymentRequired(LocalError):
    """The caller showed no token: pay for this request with x402 (``header``: the requirements).

    Attributes:
        reason: ``payment_required`` (no payment sent), ``invalid_payment`` (not an x402 v2 exact
            payment), or the facilitator's refusal (``insufficient_amount``, ``nonce_used``, …).
        header: the ``PAYMENT-REQUIRED`` header's value (base64 JSON).
    """

    def __init__(self, message: str, reason: str, header: str) -> None:
        super().__init__(message)
        self.reason, self.header = reason, header


@dataclass(frozen=True)
class Paid:
    """A settled x402 payment."""

    tx_hash: str
    payer: str
    amount: int
    header: str  # the PAYMENT-RESPONSE header's value


class X402Gate:
    """Asks for, verifies and settles x402 payments on this node's chain."""

    def __init__(self, link: "ChainLink", now: Any) -> None:
        self.link = link
        self.now = now  # the node's wall clock
        self._settling: set[tuple[str, bytes]] = set()  # (payer, nonce) being settled now

    def _required(self, request: "Request", amount: int, reason: str, message: str) -> PaymentRequired:
        from x402.http.utils import encode_payment_required_header
        from x402.schemas import PaymentRequired as Required
        from x402.schemas import PaymentRequirements, ResourceInfo

        required = Required(
            error=message,
            resource=ResourceInfo(url=str(request.url), description="one chat completion through the Inferswarm market",
                                  mime_type="application/json"),
            accepts=[PaymentRequirements(
                scheme="exact", network=self.link.network, asset=self.link.chain.deployment.token,
                amount=str(amount), pay_to=self.link.address, max_timeout_seconds=MAX_TIMEOUT_S,
                extra={"name": self.link.token_name, "version": "2"})])
        return PaymentRequired(message, reason, encode_payment_required_header(required))

    async def collect(self, request: "Request", amount: int) -> Paid:
        """Settle the request's payment of ``amount`` µc, or raise what to answer.

        Raises:
            PaymentRequired: no payment, or one that does not pay for this request (nothing settled).
            ChainUnreachable: the chain did not answer (nothing settled, or the transaction's fate unknown).
        """
        from wallet.chain import PaymentAsked, PaymentRefused, settle_payment, verify_payment

        raw = request.headers.get(PAYMENT_HEADER)
        if not raw:
            raise self._required(request, amount, "payment_required",
                                 f"this request costs {amount} µc: pay it with x402 (send it again with a "
                                 f"PAYMENT-SIGNATURE header) or send the node's API token")
        try:
            authorization, signature, payer = self._parse(raw)
        except ValueError as exc:
            raise self._required(request, amount, "invalid_payment", f"not an x402 v2 exact payment: {exc}") from exc
        link = self.link
        asked = PaymentAsked(chain_id=link.chain_id, token=link.chain.deployment.token, token_name=link.token_name,
                             pay_to=link.address, amount=amount)
        key = (payer.lower(), authorization.nonce)
        if key in self._settling:
            raise self._required(request, amount, "nonce_used", "this payment is being settled for another request")
        self._settling.add(key)
        try:
            await link.run(verify_payment, link.chain, asked, authorization, signature, int(self.now()))
            sent = await link.run(settle_payment, link.chain, link.key, authorization, signature)
        except PaymentRefused as exc:
            raise self._required(request, amount, exc.reason, f"payment refused: {exc}") from exc
        finally:
            self._settling.discard(key)
        _logger.info("x402: %s paid %d µc (transaction %s)", payer, authorization.value, sent.tx_hash)
        return Paid(sent.tx_hash, payer, authorization.value, self._response(sent.tx_hash, payer, authorization.value))

    async def refund(self, paid: Paid) -> str | None:
        """Send ``paid`` back to its payer (the call it paid for failed); the transaction hash, or None
        when the chain would not take it (logged: the operator owes it)."""
        from wallet import ChainError

        try:
            sent = await self.link.run(self.link.chain.transfer, self.link.key, paid.payer, paid.amount)
        except ChainError as exc:
            _logger.error("x402: refunding %d µc to %s (payment %s) failed: %s", paid.amount, paid.payer,
                          paid.tx_hash, exc)
            return None
        _logger.info("x402: refunded %d µc to %s (transaction %s)", paid.amount, paid.payer, sent.tx_hash)
        return sent.tx_hash

    def _response(self, tx_hash: str, payer: str, amount: int) -> str:
        from x402.http.utils import encode_payment_response_header
        from x402.schemas import SettleResponse

        return encode_payment_response_header(SettleResponse(success=True, transaction=tx_hash,
                                                             network=self.link.network, payer=payer,
                                                             amount=str(amount)))

    def _parse(self, raw: str) -> tuple[Any, bytes, str]:
        """(authorization, signature, payer) of a PAYMENT-SIGNATURE header.

        Raises:
            ValueError: not base64 JSON of an x402 v2 exact EVM payment for this network.
        """
        from x402.http.utils import decode_payment_signature_header

        from wallet.chain import TransferAuthorization

        if len(raw) > _MAX_HEADER:
            raise ValueError("the header is too long")
        try:
            payload = decode_payment_signature_header(raw)
        except Exception as exc:  # base64, JSON or pydantic: all mean the same to the caller
            raise ValueError("the header is not base64 JSON of a payment payload") from exc
        if getattr(payload, "x402_version", None) != 2:
            raise ValueError("only x402 version 2 is served here")
        accepted = payload.accepted
        if accepted.scheme != "exact" or accepted.network != self.link.network:
            raise ValueError(f"this node takes the exact scheme on {self.link.network}")
        try:
            auth, signature = payload.payload["authorization"], payload.payload["signature"]
            nonce = bytes.fromhex(_hex(auth["nonce"]))
            authorization = TransferAuthorization(
                chain_id=self.link.chain_id, token=accepted.asset, token_name=self.link.token_name,
                sender=str(auth["from"]), receiver=str(auth["to"]), value=int(auth["value"]),
                valid_after=int(auth["validAfter"]), valid_before=int(auth["validBefore"]), nonce=nonce)
            sig = bytes.fromhex(_hex(signature))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the payload lacks a well-formed EIP-3009 authorization ({exc})") from exc
        if len(nonce) != 32 or len(sig) != 65:
            raise ValueError("an authorization's nonce is 32 bytes and its signature 65")
        return authorization, sig, authorization.sender


def _hex(value: Any) -> str:
    text = str(value)
    return text[2:] if text.startswith(("0x", "0X")) else text
