"""The consumer role: renting inference from the market.

    _trust            TrustBook: this node's own scores and speed figures per provider (sqlite)
    _routing          which providers to try, in which order (pure: rows, stats and rng come in)
    _failures         SessionError and its kinds; learn: what each failure teaches trust
    _reach            reach: dial a provider before money is locked for it
    _session_client   the consumer's side of ``protocol.SESSION_PROTOCOL``: one session on one stream
    _renter           Renter: rank, open an escrow channel, run the session with failover, settle
    _results          Completion (with its Attempts), SessionInfo, SessionSummary, ProviderRow: what
                      renting gives back, typed
    _held_sessions    sessions held open across API calls (``node chat``), expired when idle
    _request_check    check_call: a call fits the wire's Request and one frame (pure), before money moves

Imports ``net`` and ``escrow`` (to pay), never ``provider`` or ``api``.
"""

from ._held_sessions import HeldSessions, UnknownSession
from ._renter import Renter, RentError, estimate_prompt_tokens
from ._results import Attempt, Completion, ProviderRow, SessionInfo, SessionSummary
from ._routing import SORTS, Candidate, Preferences, rank
from ._session_client import (
    CallRefused,
    CallResult,
    ConsumerSessionHandle,
    ProviderFailed,
    ProviderMisbehaved,
    SessionError,
    SessionRejected,
    open_session,
    open_session_on,
)
from ._trust import ProviderStats, TrustBook

__all__ = [
    "Attempt",
    "CallRefused",
    "CallResult",
    "Candidate",
    "Completion",
    "ConsumerSessionHandle",
    "estimate_prompt_tokens",
    "HeldSessions",
    "open_session",
    "open_session_on",
    "Preferences",
    "ProviderFailed",
    "ProviderMisbehaved",
    "ProviderRow",
    "ProviderStats",
    "rank",
    "Renter",
    "RentError",
    "SessionError",
    "SessionInfo",
    "SessionRejected",
    "SessionSummary",
    "SORTS",
    "TrustBook",
    "UnknownSession",
]
