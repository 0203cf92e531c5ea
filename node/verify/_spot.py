"""Spot checks: a consumer re-runs a sampled share of its paid calls on weights it holds.

- **What is checked**: a settled, greedy plain-chat call (``_rerun.checkable``) whose listing
  commits to weights this node holds (``hold``: a backend whose own commitment has the same id).
- **Sampling**: each checkable call is checked with probability ``rate_permille``/1000, drawn
  from the OS's random source after the call is paid, so nothing the provider sees tells a
  checked call from another. Checks cost this node compute, never the provider's time, and are
  bounded: at most ``tokens_per_hour`` re-run tokens (a token bucket holding one hour's worth),
  at most ``queue`` calls waiting (a full queue or an empty bucket skips the check, counted).
- **A failed check** signs an ``Evidence`` bundle (``protocol.check_evidence`` re-checks it),
  stores it (``EvidenceBook``), marks the provider caught in the trust book (score to 0, never
  probed for ``CAUGHT_MEMORY_S``) and hands it to ``on_evidence`` (gossip).
- A backend failure during a re-run is no verdict: logged and counted, the provider untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any, Awaitable, Callable

import trio

import protocol
from wallet import Identity

from .._clock import SYSTEM_WALL_CLOCK, WallClock
from ..provider.backends import Backend, BackendError
from ._evidence_book import EvidenceBook
from ._rerun import DEFAULT_THRESHOLD_PERMILLE, DEFAULT_TOPK, Verdict, checkable, rerun

__all__ = ["SpotCheckConfig", "CheckedCall", "SpotChecker", "parse_spot_checks", "SPOT_CHECK_KEYS"]

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpotCheckConfig:
    """``[spot_checks]``: the share of checkable calls re-run, the re-run budget, the top-k
    comparison's knobs, and the backend specs held for checking (e.g. ``builtin``)."""

    rate_permille: int = 100
    tokens_per_hour: int = 100_000
    topk: int = DEFAULT_TOPK
    threshold_permille: int = DEFAULT_THRESHOLD_PERMILLE
    backends: tuple[str, ...] = ()
    queue: int = 32

    def __post_init__(self) -> None:
        if not (0 <= self.rate_permille <= 1000 and 0 <= self.threshold_permille <= 1000):
            raise ValueError("rate_permille and threshold_permille are 0..1000")
        if self.tokens_per_hour < 0 or not 1 <= self.topk <= 1000 or not 1 <= self.queue <= 4096:
            raise ValueError("tokens_per_hour >= 0, topk 1..1000, queue 1..4096")


#: the ``[spot_checks]`` keys and their TOML types
SPOT_CHECK_KEYS: dict[str, Any] = {"rate_permille": int, "tokens_per_hour": int, "topk": int,
                                   "threshold_permille": int, "backends": list, "queue": int}


def parse_spot_checks(raw: dict[str, Any] | None) -> SpotCheckConfig:
    """A ``[spot_checks]`` table (its keys' types already checked). Raises ValueError for a value
    out of range or a backend that is not a string."""
    raw = dict(raw or {})
    backends = raw.pop("backends", [])
    if not all(isinstance(b, str) and b for b in backends):
        raise ValueError("backends is a list of backend specs (e.g. \"builtin\", \"transformers:/models/x\")")
    return SpotCheckConfig(**raw, backends=tuple(backends))


@dataclasses.dataclass(frozen=True)
class CheckedCall:
    """A paid call as its consumer saw it, with the commitment its listing named."""

    provider: str
    model: str
    commitment: protocol.ModelCommitment
    reproducible: bool  # the listing's word
    request: protocol.Request
    text: str
    receipt: protocol.Receipt


class SpotChecker:
    """Samples calls (``offer``), re-runs them in ``run`` and acts on the verdicts."""

    def __init__(self, identity: Identity, config: SpotCheckConfig, *, trust: Any = None,
                 evidence: EvidenceBook | None = None, wall_clock: WallClock = SYSTEM_WALL_CLOCK,
                 on_evidence: Callable[[protocol.Evidence], Awaitable[None]] | None = None,
                 draw: Callable[[int], int] = secrets.randbelow) -> None:
        self.identity, self.config, self.trust, self.evidence = identity, config, trust, evidence
        self.wall_clock, self.on_evidence, self._draw = wall_clock, on_evidence, draw
        self.held: dict[bytes, Backend] = {}
        self.stats = dict.fromkeys(("offered", "sampled", "checked", "passed", "failed", "skipped_budget",
                                    "skipped_queue", "errors", "tokens"), 0)
        self._send, self._receive = trio.open_memory_channel[CheckedCall](config.queue)
        self._bucket = float(config.tokens_per_hour)
        self._bucket_at: float | None = None

    def hold(self, backend: Backend) -> bytes | None:
        """Check calls under ``backend``'s commitment with it (a started backend); returns its id."""
        committed = backend.commitment()
        if committed is None or committed.kind != "weights":
            return None
        cid = protocol.commitment_id(committed)
        self.held[cid] = backend
        return cid

    def holds(self, commitment: protocol.ModelCommitment | None) -> bool:
        return commitment is not None and protocol.commitment_id(commitment) in self.held

    def offer(self, call: CheckedCall) -> bool:
        """A settled call: maybe queue it for a check (never blocks). True when queued."""
        if not (checkable(call.request, call.commitment) and self.holds(call.commitment)):
            return False
        self.stats["offered"] += 1
        if self._draw(1000) >= self.config.rate_permille:
            return False
        self.stats["sampled"] += 1
        try:
            self._send.send_nowait(call)
        except trio.WouldBlock:
            self.stats["skipped_queue"] += 1
            return False
        return True

    def _spend(self, tokens: int) -> bool:
        """Take ``tokens`` from the hourly budget (refilled continuously); False: not enough."""
        now = trio.current_time()
        per_s = self.config.tokens_per_hour / 3600
        if self._bucket_at is not None:
            self._bucket = min(float(self.config.tokens_per_hour), self._bucket + (now - self._bucket_at) * per_s)
        self._bucket_at = now
        if tokens > self._bucket:
            return False
        self._bucket -= tokens
        return True

    async def run(self) -> None:
        """Check queued calls one at a time, until cancelled."""
        async for call in self._receive:
            # what the check will cost, bounded before it runs: the call's own prompt and output
            if not self._spend(call.receipt.tokens_in + call.request.max_tokens):
                self.stats["skipped_budget"] += 1
                continue
            try:
                await self.check(call)
            except BackendError as exc:
                self.stats["errors"] += 1
                _logger.warning("spot check of %s could not run: %s", call.provider, exc)

    async def check(self, call: CheckedCall) -> Verdict:
        """Re-run ``call`` now and act on the verdict (the budget is the caller's business).

        Raises:
            BackendError: the re-run failed; ValueError: no backend holds its commitment.
        """
        backend = self.held.get(protocol.commitment_id(call.commitment))
        if backend is None:
            raise ValueError("no backend held for this commitment")
        exact = call.reproducible and backend.reproducible()
        verdict = await rerun(backend, call.request, call.text, call.receipt, exact=exact, topk=self.config.topk,
                              threshold_permille=self.config.threshold_permille)
        self.stats["checked"] += 1
        self.stats["tokens"] += verdict.tokens
        if verdict.ok:
            self.stats["passed"] += 1
            return verdict
        self.stats["failed"] += 1
        _logger.warning("spot check failed: provider %s served another model than it committed to for %s (%s)",
                        call.provider, call.model, verdict.mode)
        if self.trust is not None:
            self.trust.caught(call.provider)
        try:
            evidence = self.sign_evidence(call, verdict)
            protocol.encode(evidence, max_size=protocol.MAX_EVIDENCE_BYTES)
        except protocol.ProtocolError as exc:  # a call too large to carry in one bundle: caught here only
            _logger.warning("the evidence against %s cannot be bundled: %s", call.provider, exc)
            return verdict
        if self.evidence is not None:
            self.evidence.add(evidence, confirmed=True)
        if self.on_evidence is not None:
            await self.on_evidence(evidence)
        return verdict

    def sign_evidence(self, call: CheckedCall, verdict: Verdict) -> protocol.Evidence:
        """The signed bundle of a failed check."""
        return protocol.sign(protocol.Evidence(
            verifier=self.identity.peer_id, receipt=call.receipt, request=protocol.encode(call.request),
            commitment=call.commitment, provider_text=call.text, verifier_text=verdict.verifier_text,
            mode=verdict.mode, issued_at=int(self.wall_clock()), agreement_permille=verdict.agreement_permille,
            threshold_permille=verdict.threshold_permille, topk=verdict.topk), "sig", self.identity)
