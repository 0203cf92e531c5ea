"""The node package's errors: one root, Local vs Remote, and which of them are refusals,
closings or breakages.

    NodeError                        root of everything node/ raises on purpose
    ├── LocalError                   the fault is on this side: the caller's request, this node's config or state
    │   ├── InvalidRequest           a request field is missing, malformed or out of range (.field, .code)
    │   │   └── UnsupportedFeature   no offer of the model lists a feature the call needs (.field; code unsupported_feature)
    │   ├── NotAuthorized            the caller did not show this node's API token
    │   ├── PaymentRequired          a caller without the token must pay this request with x402 (.reason, .header)
    │   ├── NotFound                 the request names something this node does not hold (an offer)
    │   │   └── UnknownSession       [closed] no open session with that id: never opened, or closed since
    │   ├── ConfigError              the config file is unreadable or holds a value of the wrong shape
    │   ├── HomeInUse                another process runs a node on this home (.pid)
    │   ├── DaemonNotRunning         no ready daemon for this home
    │   ├── QueueFull                this provider has no room for another job of that model
    │   ├── QueueTimeout             a job waited past its deadline for a slot
    │   ├── Busy                     [refused] this node runs all a provider serves at once; no slot came in time
    │   ├── BackendError             this node's model backend could not serve (load failure, upstream error)
    │   │   ├── OfferUnloadable      an offer's model could not be loaded or benchmarked; nothing changed (.upstream)
    │   │   └── BackendUnsupported   the backend cannot serve an option the call asks for (logprobs, a format)
    │   ├── DemoError                a step of ``node demo`` failed (the message names it and the cause)
    │   └── ReceiptStoreError        receipts.db could not be opened, read or written (full disk, read-only file)
    └── RemoteError                  the fault is on the far side: a peer refused, or it (or the network) broke
        ├── RentError                no provider could be rented: none offers the model, or all failed (.attempts)
        │   └── AtCapacity           [refused] every provider tried was at capacity, ours or theirs (.retry_after_s)
        ├── SessionError             a session with a provider failed; the failing call is not paid
        │   ├── SessionRejected      [refused] the provider said no to the session (.reason, .retry_after_s)
        │   ├── CallRefused          [refused] the provider said no to the call (.reason)
        │   ├── ProviderFailed       [broken] the provider went away or stopped answering
        │   │   └── SettlementUnconfirmed  [broken] a counter-signed call's acknowledgement never came (.receipt)
        │   └── ProviderMisbehaved   [broken] the provider broke the protocol (.code); nothing counter-signed
        ├── EscrowRefused            [refused] the escrow agent said no (.code, e.g. insufficient_funds)
        ├── EscrowUnreachable        [broken] no route to the agent, no answer, or an answer that is not its own
        └── StreamClosed             [broken] the peer closed or reset a stream before a whole message arrived
            └── StreamTimeout        [broken] the peer sent no whole message within the read deadline

[refused]: the peer answered, validly, no; asking again later may work. [closed]: this side ended
it. [broken]: the peer or the network ended it mid-way. Nothing else is either.

The first six classes and ``DemoError`` live here. Every other one lives beside the code that raises it
(``api/_x402``, ``consumer/_failures``, ``consumer/_renter``, ``consumer/_routing``, ``consumer/_pacing``, ``consumer/_held_sessions``, ``escrow/_ops``,
``escrow/_client``, ``net/_streams``, ``provider/_queue``, ``provider/_storefront``, ``provider/backends/_base``,
``_home``, ``_daemon_files``, ``_receipts``) and only its base comes from here, so this module imports nothing: ``node.net``
and the light ``node/__init__`` may both use it.

Rules: a lower-layer exception (trio, libp2p, sqlite, pydantic, a ValueError from parsing a
caller's value) is translated into one of these once, at the edge where it enters node/, with
``raise … from exc``. A plain ValueError or TypeError that escapes to an edge is a bug, not the
caller's fault. How each error reaches an HTTP client is ``node/api/_http.py``'s table.
"""

from __future__ import annotations

__all__ = ["NodeError", "LocalError", "RemoteError", "InvalidRequest", "NotAuthorized", "NotFound", "DemoError"]


class NodeError(Exception):
    """Root of every error ``node`` raises on purpose."""


class LocalError(NodeError):
    """The fault is on this side: the caller asked for something the rules forbid, or this node's
    own config, state or backend cannot do it."""


class RemoteError(NodeError):
    """The fault is on the far side: a peer (provider, escrow agent) refused, or it or the network
    broke."""


class InvalidRequest(LocalError):
    """A request's field is missing, malformed or out of range: the one error an HTTP client
    hears as 400.

    Attributes:
        field: the offending field as a dotted path (``messages.0.role``), or None for the body
            as a whole.
        code: ``invalid_json``, ``missing_field`` or ``invalid_field``.
    """

    def __init__(self, message: str, field: str | None = None, code: str = "invalid_field") -> None:
        super().__init__(message)
        self.message, self.field, self.code = message, field, code


class NotAuthorized(LocalError):
    """The caller did not show this node's API token."""


class NotFound(LocalError):
    """The request names something this node does not hold."""


class DemoError(LocalError):
    """A step of ``node demo`` failed; the message names the step and the cause (``__cause__`` is it)."""
