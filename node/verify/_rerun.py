"""Re-running a paid call on the committed weights, and the verdict.

Two comparisons, chosen by what both machines can promise:

- **exact** (the provider's listing says its greedy decoding is reproducible, and so does the
  checker's backend): the checker decodes the request greedily, as many tokens as the provider
  was asked for (or, for a call that stopped at ``length`` — a cancel, a spent budget — as many
  as its receipt billed), and the texts must agree (``protocol.outputs_agree``).
- **topk** (otherwise): one forward pass over the prompt and the provider's text; at least
  ``threshold_permille`` of its tokens must be among the checker's ``topk`` most likely at
  their place. A greedy provider's token is its own argmax, so on any hardware it is almost
  always within the top few of the same model; another model's is not.

Only greedy plain-chat calls (``call_request`` v1, temperature 0) are checked: a sampled
call has no one right answer to re-run. A provider cannot tell which greedy call is checked —
the check runs on the checker's side after the call is paid — but it can tell a greedy call
from a sampled one; that limit is stated in docs/DESIGN.md ("Honest market").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import protocol

from ..provider.backends import Backend

__all__ = ["Verdict", "Recheck", "checkable", "rerun", "recheck", "DEFAULT_TOPK", "DEFAULT_THRESHOLD_PERMILLE"]

DEFAULT_TOPK = 5
DEFAULT_THRESHOLD_PERMILLE = 900


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A spot check's outcome: ``ok``, how it compared (``mode``), the checker's text (exact mode),
    the top-k agreement (topk mode), and the tokens the re-run cost."""

    ok: bool
    mode: str
    verifier_text: str = ""
    agreement_permille: int = 1000
    topk: int = 0
    threshold_permille: int = 0
    tokens: int = 0


def checkable(request: Any, commitment: protocol.ModelCommitment | None) -> bool:
    """Whether a call can be spot-checked: a greedy plain-chat call under a weights commitment."""
    return (isinstance(request, protocol.Request) and request.temperature_milli == 0
            and commitment is not None and commitment.kind == "weights")


def _messages(request: protocol.Request) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content} for m in request.messages]


async def rerun(backend: Backend, request: protocol.Request, provider_text: str, receipt: protocol.Receipt, *,
                exact: bool, topk: int = DEFAULT_TOPK,
                threshold_permille: int = DEFAULT_THRESHOLD_PERMILLE) -> Verdict:
    """Re-run ``request`` on ``backend`` (which holds the committed weights) and compare with
    what the provider streamed (``provider_text``, billed by ``receipt``).

    Raises:
        BackendError: the backend failed (no verdict: the check is not counted).
    """
    messages = _messages(request)
    prompt = await backend.count_prompt_tokens(messages)
    if exact:
        budget = request.max_tokens if receipt.finish_reason == "stop" else min(request.max_tokens, receipt.tokens_out)
        pieces: list[str] = []

        async def collect(text: str, tokens: int, **_: Any) -> None:
            pieces.append(text)

        generation = await backend.generate(messages, max_tokens=budget, temperature_milli=0, top_p_milli=1000,
                                            stop=request.stop, on_piece=collect)
        text = "".join(pieces)
        return Verdict(protocol.outputs_agree(provider_text, text, receipt.finish_reason), "exact", text,
                       tokens=prompt + generation.tokens_out)
    agree, total = await backend.topk_agreement(messages, provider_text, topk)  # type: ignore[attr-defined]
    share = 1000 if total == 0 else agree * 1000 // total
    return Verdict(share >= threshold_permille, "topk", agreement_permille=share, topk=topk,
                   threshold_permille=threshold_permille, tokens=prompt + total)


@dataclasses.dataclass(frozen=True)
class Recheck:
    """An evidence bundle re-checked: the bundle, its request, and (given the weights) this
    machine's own verdict on the call and whether it confirms the bundle."""

    evidence: protocol.Evidence
    request: protocol.Request
    verdict: Verdict | None = None

    @property
    def confirmed(self) -> bool | None:
        """True: the re-run here fails too; False: it agrees with the provider; None: not re-run."""
        return None if self.verdict is None else not self.verdict.ok


async def recheck(data: bytes, backend: Backend | None = None) -> Recheck:
    """Check a bundle's bytes (``protocol.check_evidence``) and, with ``backend`` (holding the
    committed weights), re-run its call the way the bundle says it was compared.

    Raises:
        protocol.ProtocolError: the bundle is malformed, forged, tampered or proves nothing.
        ValueError: ``backend`` holds another model than the bundle's commitment.
        BackendError: the re-run failed.
    """
    evidence = protocol.decode(data, max_size=protocol.MAX_EVIDENCE_BYTES, expect=(protocol.Evidence,))
    request = protocol.check_evidence(evidence)
    if backend is None:
        return Recheck(evidence, request)
    held = backend.commitment()
    if held is None or protocol.commitment_id(held) != protocol.commitment_id(evidence.commitment):
        raise ValueError("this backend holds another model than the one the provider committed to")
    verdict = await rerun(backend, request, evidence.provider_text, evidence.receipt,
                          exact=evidence.mode == "exact" and backend.reproducible(),
                          topk=evidence.topk or DEFAULT_TOPK,
                          threshold_permille=evidence.threshold_permille or DEFAULT_THRESHOLD_PERMILLE)
    return Recheck(evidence, request, verdict)
