"""An x402 facilitator of our own for the "exact" scheme on the test stablecoin: verify an EIP-3009
payment authorization against what was asked, then settle it on the chain.

``verify`` decides everything it can without a transaction — the payee, the amount, the validity
window, the signature (recovered here, as the token does), that the nonce was never used and that
the payer holds the amount — so a bad payment costs the server a signature check and two reads,
never gas. ``settle`` submits ``transferWithAuthorization`` from the server's own key (it pays the
gas) and returns only once it is mined: the token refuses a second use of the same authorization,
so two requests carrying one payment are paid once, and at most one of them is served.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import BadVoucher, ChainReverted
from ._contracts import Chain, Sent
from ._vouchers import TransferAuthorization, authorization_signer

__all__ = ["PaymentAsked", "PaymentRefused", "verify_payment", "settle_payment", "VALID_MARGIN_S"]

# an authorization must stay valid this long after it is checked: time to wait for the send lock and
# a block on a real chain (x402's reference takes 6 s; its clients sign for max_timeout_seconds, 300)
VALID_MARGIN_S = 30


class PaymentRefused(BadVoucher):
    """The payment does not pay for what was asked; nothing was settled.

    Attributes:
        reason: a stable code (``invalid_payee``, ``insufficient_amount``, ``expired``, ``not_yet_valid``,
            ``invalid_signature``, ``nonce_used``, ``insufficient_funds``, ``wrong_asset``,
            ``settlement_failed``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PaymentAsked:
    """What the server asked for: this much of this token, to this address, on this chain."""

    chain_id: int
    token: str
    token_name: str
    pay_to: str
    amount: int


def verify_payment(chain: Chain, asked: PaymentAsked, authorization: TransferAuthorization, signature: bytes,
                   now: int) -> None:
    """Check that ``authorization`` (signed ``signature``) pays ``asked`` and can settle now.

    Raises:
        PaymentRefused: it does not (``reason`` says why); ChainUnreachable: the chain did not answer.
    """
    if (authorization.chain_id, authorization.token.lower()) != (asked.chain_id, asked.token.lower()):
        raise PaymentRefused("wrong_asset", "the authorization is for another token or chain than asked")
    if authorization.receiver.lower() != asked.pay_to.lower():
        raise PaymentRefused("invalid_payee", f"the authorization pays {authorization.receiver}, not {asked.pay_to}")
    if authorization.value < asked.amount:
        raise PaymentRefused("insufficient_amount", f"the authorization pays {authorization.value} µc; this request "
                                                    f"costs {asked.amount} µc")
    if authorization.valid_before < now + VALID_MARGIN_S:
        raise PaymentRefused("expired", "the authorization expires too soon to settle")
    if authorization.valid_after >= now:
        raise PaymentRefused("not_yet_valid", "the authorization is not valid yet")
    try:
        signer = authorization_signer(authorization, signature)
    except BadVoucher as exc:
        raise PaymentRefused("invalid_signature", str(exc)) from exc
    if signer.lower() != authorization.sender.lower():
        raise PaymentRefused("invalid_signature", "the authorization is not signed by its payer")
    if chain.authorization_used(authorization.sender, authorization.nonce):
        raise PaymentRefused("nonce_used", "this authorization was used already")
    if chain.token_balance(authorization.sender) < authorization.value:
        raise PaymentRefused("insufficient_funds", "the payer does not hold the amount")


def settle_payment(chain: Chain, submitter_key: bytes, authorization: TransferAuthorization,
                   signature: bytes) -> Sent:
    """Submit the (verified) authorization; returns the mined transaction.

    Raises:
        PaymentRefused: the token refused it (a use in between, an expiry): ``nonce_used`` or
            ``settlement_failed``; ChainUnreachable: the chain did not answer.
    """
    a = authorization
    try:
        return chain.transfer_with_authorization(submitter_key, a.sender, a.receiver, a.value, a.valid_after,
                                                 a.valid_before, a.nonce, signature)
    except ChainReverted as exc:
        reason = "nonce_used" if exc.reason == "authorization used" else "settlement_failed"
        raise PaymentRefused(reason, f"the token refused the payment: {exc.reason}") from exc
