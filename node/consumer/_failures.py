"""How renting fails, and what each failure teaches this node's trust (``learn``)."""

from __future__ import annotations

import protocol

from .._errors import RemoteError
from ._trust import TrustBook

__all__ = ["SessionError", "SessionRejected", "CallRefused", "ProviderFailed", "ProviderMisbehaved", "learn"]


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


def learn(trust: TrustBook | None, provider: str, exc: SessionError) -> None:
    """What a failed open or call teaches this node about ``provider``."""
    if trust is None:
        return
    if isinstance(exc, ProviderMisbehaved):
        trust.violated(provider)
    elif isinstance(exc, (SessionRejected, CallRefused)):
        trust.refused(provider, exc.reason)
    else:
        trust.failed(provider)
