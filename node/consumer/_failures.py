"""How renting fails, whose fault each failure is (``fault``), and what it teaches this node's
trust (``learn``): only the provider's own faults lower its score; a capacity refusal lowers it a
little, and only for minutes; our own mistakes and a third party's (the escrow agent, our own
channel or budget) cost it nothing. ``_trust``'s docstring has the table."""

from __future__ import annotations

import protocol

from .._errors import RemoteError
from ._trust import CAPACITY_REASONS, LISTING_REASONS, OURS_REASONS, STALE_REASONS, THIRD_PARTY_REASONS, TrustBook

__all__ = ["SessionError", "SessionRejected", "CallRefused", "ProviderFailed", "ProviderMisbehaved", "fault", "learn",
           "PROVIDER", "VIOLATION", "LISTING", "CAPACITY", "OURS", "THIRD_PARTY", "STALE"]

# whose fault a failure is
PROVIDER, VIOLATION, LISTING, CAPACITY = "provider", "violation", "listing", "capacity"
OURS, THIRD_PARTY, STALE = "ours", "third_party", "stale"


class SessionError(RemoteError):
    """Renting failed; nothing was paid for the call that failed."""


class SessionRejected(SessionError):
    """The provider refused to open the session (its reason code, and when to retry)."""

    def __init__(self, reason: str, detail: str, retry_after_s: int = 0) -> None:
        super().__init__(f"the provider refused the session: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.detail, self.retry_after_s = reason, detail, retry_after_s


class CallRefused(SessionError):
    """The provider refused one call (its reason code); nothing was charged for it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"the provider refused the call: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.detail = reason, detail


class ProviderFailed(SessionError):
    """The provider went away or stopped answering; the unfinished call is not paid."""


class ProviderMisbehaved(SessionError):
    """The provider broke the protocol (a bad receipt, a wrong chunk): it was not counter-signed."""

    def __init__(self, exc: protocol.ProtocolError) -> None:
        super().__init__(f"the provider broke the protocol ({exc.code}): {exc}; nothing was counter-signed for it")
        self.code = exc.code


def fault(exc: SessionError) -> str:
    """Whose fault ``exc`` is: ``violation`` (it broke the protocol), ``provider`` (it went away,
    stalled, or refused for its own trouble), ``listing`` (it listed terms it does not honour),
    ``capacity`` (busy), ``ours`` (our request), ``third_party`` (the escrow agent, our channel),
    ``stale`` (our view of its listing)."""
    if isinstance(exc, ProviderMisbehaved):
        return VIOLATION
    if isinstance(exc, (SessionRejected, CallRefused)):
        for reasons, who in ((CAPACITY_REASONS, CAPACITY), (LISTING_REASONS, LISTING), (OURS_REASONS, OURS),
                             (THIRD_PARTY_REASONS, THIRD_PARTY), (STALE_REASONS, STALE)):
            if exc.reason in reasons:
                return who
    return PROVIDER


def learn(trust: TrustBook | None, provider: str, exc: SessionError) -> None:
    """What a failed open or call teaches this node about ``provider`` (by ``fault``)."""
    if trust is None:
        return
    who = fault(exc)
    if who == VIOLATION:
        trust.violated(provider)
    elif who in (CAPACITY, LISTING):
        trust.refused(provider, exc.reason)  # type: ignore[attr-defined]  # a refusal: it has a reason
    elif who == PROVIDER:
        trust.failed(provider)
