"""The consumer role: renting inference from the market.

    _trust            TrustBook: this node's own scores and speed figures per provider (sqlite)
    _routing          which providers to try, in which order (pure: rows, stats and rng come in)
    _failures         SessionError and its kinds; fault: whose fault a failure is; learn: what it teaches trust
    _pacing           Pacing: this node's own bound on sessions at once per provider, the rest queued (Busy)
    _reach            reach: dial a provider before money is locked for it
    _session_client   the consumer's side of ``protocol.SESSION_PROTOCOL``: one session on one stream
    _renter           Renter: rank, open an escrow channel, run the session with failover, settle
    _results          Completion (with its Attempts, tool calls, logprobs), Delta, Embeddings, SessionInfo, SessionSummary, ProviderRow: what
                      renting gives back, typed; CancelledCall: what a cancelled call cost
    _held_sessions    sessions held open across API calls (``node chat``), expired when idle
    _standing         StandingSessions: one-shot calls reuse an open session and its many-call channel
    _request_check    check_call: a call fits the wire's Request (v1 or v2) and one frame; embed_batches:
                      an embeddings request's calls (pure), before money moves

Imports ``net`` and ``escrow`` (to pay), never ``provider`` or ``api``.
"""

from ._held_sessions import HeldSessions, UnknownSession
from ._pacing import Busy, Pacing
from ._renter import AtCapacity, Renter, RentError, estimate_prompt_tokens
from ._results import (
    Attempt,
    CancelledCall,
    Completion,
    Delta,
    Embeddings,
    ProviderRow,
    SessionInfo,
    SessionSummary,
    cancelled_calls,
)
from ._routing import SORTS, Candidate, Preferences, UnsupportedFeature, rank
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
    "AtCapacity",
    "Attempt",
    "Busy",
    "CallRefused",
    "CallResult",
    "cancelled_calls",
    "CancelledCall",
    "Candidate",
    "Completion",
    "ConsumerSessionHandle",
    "Delta",
    "Embeddings",
    "estimate_prompt_tokens",
    "HeldSessions",
    "open_session",
    "open_session_on",
    "Pacing",
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
    "UnsupportedFeature",
]
