"""What renting gives back, typed. Inside ``node`` these travel as they are; each edge presents
them: ``to_json()`` is the CLI contract's document (the control API, ``node run --json`` and
the library's ``Swarm`` return it), and the OpenAI face builds its own shape from the fields.
Amounts are integer µc, prices µc per 1K tokens.

A cancelled call has no ``Completion``: the trio cancellation goes on up (it is not turned into
an exception of ours), and what the call cost is a ``CancelledCall``, kept on the session handle
(``last_cancelled``) and reported to every ``cancelled_calls()`` block the cancelled task runs in,
so a face that cancelled a call itself (the control API's cancel route) can tell its client.
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import struct
from contextlib import contextmanager
from typing import Any, Iterator

import protocol

from .._calls import openai_logprobs, openai_tool_calls
from ._routing import Candidate

__all__ = ["Attempt", "CancelledCall", "Completion", "Delta", "Embeddings", "ProviderRow", "SessionInfo",
           "SessionSummary", "cancelled_calls", "report_cancelled", "finish_reason"]


def finish_reason(receipt_reason: str, tool_calls: tuple[protocol.ToolCall, ...]) -> str:
    """What OpenAI calls a call's end: ``tool_calls`` when it made calls and stopped of itself,
    else the receipt's own reason (the receipt bills a call that made tool calls as ``stop``)."""
    return "tool_calls" if tool_calls and receipt_reason == "stop" else receipt_reason


@dataclasses.dataclass(frozen=True)
class Delta:
    """One streamed piece of a call's answer, as the provider sent it: text, pieces of tool calls
    (OpenAI's delta shape: the first piece of an index names its id and function, later ones add
    to its arguments) and the logprobs of its tokens."""

    text: str
    tool_calls: tuple[protocol.ToolCallDelta, ...] = ()
    logprobs: tuple[protocol.TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One provider tried for a call: ``error`` is None for the one that served it; ``fault`` says
    whose fault a failure was (``_failures.fault``: provider, violation, listing, capacity, ours,
    third_party, stale)."""

    provider: str
    error: str | None = None
    fault: str | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """One paid call: the answer, its doubly-signed receipt, who served it and through which channel."""

    id: str  # this node's id for the call (hex)
    provider: str
    model: str
    text: str
    finish_reason: str
    receipt: protocol.Receipt
    latency_ms: int
    channel: protocol.ChannelGrant | None = None  # the run's own channel (a held session's is in its SessionInfo)
    attempts: tuple[Attempt, ...] = ()
    session_id: str | None = None  # the held session it belongs to
    tool_calls: tuple[protocol.ToolCall, ...] = ()  # the calls the model made (the receipt's output hash covers them)
    logprobs: tuple[protocol.TokenLogprob, ...] | None = None  # when asked: each token's, in order

    @property
    def receipt_id(self) -> str:
        return protocol.receipt_hash(self.receipt).hex()

    @property
    def cost(self) -> int:
        return self.receipt.cost

    def message(self) -> dict[str, Any]:
        """The assistant's turn in OpenAI's shape: ``content`` (None when it only made tool calls)
        and ``tool_calls`` when it made any."""
        if not self.tool_calls:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": self.text or None, "tool_calls": openai_tool_calls(self.tool_calls)}

    def choice(self) -> dict[str, Any]:
        """The call's one choice in OpenAI's shape (with ``logprobs`` when they were asked for)."""
        doc: dict[str, Any] = {"index": 0, "message": self.message(), "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            doc["logprobs"] = openai_logprobs(self.logprobs)
        return doc

    def to_json(self) -> dict[str, Any]:
        """The CLI contract's document for ``node run`` (and a held session's call)."""
        r = self.receipt
        doc: dict[str, Any] = {
            "id": "isw-" + self.id,
            "provider": self.provider,
            "model": self.model,
            "choices": [self.choice()],
            "usage": {"prompt_tokens": r.tokens_in, "completion_tokens": r.tokens_out,
                      "total_tokens": r.tokens_in + r.tokens_out},
            "cost": {"amount": r.cost, "receipt_id": self.receipt_id, "cumulative": r.cumulative},
            "latency_ms": self.latency_ms,
        }
        if self.channel is not None:
            doc["escrow"] = {"agent": self.channel.agent, "channel_id": self.channel.channel_id.hex(),
                             "cap": self.channel.cap}
        if self.attempts:
            doc["attempts"] = [{"provider": a.provider, "error": a.error, "fault": a.fault} for a in self.attempts]
        if self.session_id is not None:
            doc["session_id"] = self.session_id
        return doc


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """One paid embeddings request: a vector per input (float32 little-endian, ``dims`` each), from
    one provider over one session, one doubly-signed receipt per call it took (inputs go
    ``MAX_EMBED_INPUTS`` to a call)."""

    id: str
    provider: str
    model: str
    dims: int
    vectors: tuple[bytes, ...]  # one per input, in order: dims float32 LE values
    receipts: tuple[protocol.Receipt, ...]
    latency_ms: int
    channel: protocol.ChannelGrant | None = None
    attempts: tuple[Attempt, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(r.tokens_in for r in self.receipts)

    @property
    def cost(self) -> int:
        return sum(r.cost for r in self.receipts)

    @property
    def receipt_ids(self) -> list[str]:
        return [protocol.receipt_hash(r).hex() for r in self.receipts]

    def floats(self) -> list[list[float]]:
        """The vectors as lists of floats."""
        fmt = f"<{self.dims}f"
        return [list(struct.unpack(fmt, v)) for v in self.vectors]

    def to_json(self, encoding_format: str = "float") -> dict[str, Any]:
        """OpenAI's embeddings response (``float``: lists of numbers; ``base64``: each vector's
        float32 LE bytes in base64), plus ``provider``, ``cost`` (µc), ``receipt_id`` (the last
        call's) and ``receipt_ids`` (every call's, in order)."""
        if encoding_format == "base64":
            data = [base64.b64encode(v).decode() for v in self.vectors]
        else:
            data = self.floats()
        ids = self.receipt_ids
        return {"object": "list", "model": self.model,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": {"prompt_tokens": self.tokens, "total_tokens": self.tokens},
                "provider": self.provider, "cost": self.cost, "receipt_id": ids[-1] if ids else None,
                "receipt_ids": ids}


@dataclasses.dataclass(frozen=True)
class CancelledCall:
    """What a cancelled call cost: the doubly-signed receipt of the prefix this node received
    (``text``), or None when nothing was paid (``outcome`` says why). ``confirmed``: the provider
    acknowledged the receipt (else it waits in the redelivery queue, paid all the same)."""

    provider: str
    model: str
    text: str
    receipt: protocol.Receipt | None
    outcome: str  # "settled", or why nothing was paid
    confirmed: bool = False

    @property
    def cost(self) -> int:
        return self.receipt.cost if self.receipt is not None else 0

    def to_json(self) -> dict[str, Any]:
        """The document of a cancelled call: delivered text, usage, cost and receipt (µc)."""
        r = self.receipt
        doc: dict[str, Any] = {"provider": self.provider, "model": self.model, "text": self.text,
                               "outcome": self.outcome, "confirmed": self.confirmed,
                               "usage": {"prompt_tokens": r.tokens_in if r else 0,
                                         "completion_tokens": r.tokens_out if r else 0,
                                         "total_tokens": (r.tokens_in + r.tokens_out) if r else 0},
                               "cost": {"amount": self.cost,
                                        "receipt_id": protocol.receipt_hash(r).hex() if r else None,
                                        "cumulative": r.cumulative if r else None}}
        return doc


_CANCELLED: contextvars.ContextVar[list[CancelledCall] | None] = contextvars.ContextVar("inferswarm_cancelled",
                                                                                        default=None)


@contextmanager
def cancelled_calls() -> Iterator[list[CancelledCall]]:
    """Collect, in the list it gives, what each call cancelled inside the block cost (in this
    task and the tasks it starts): the caller that cancels a call learns its price here."""
    box: list[CancelledCall] = []
    token = _CANCELLED.set(box)
    try:
        yield box
    finally:
        _CANCELLED.reset(token)


def report_cancelled(call: CancelledCall) -> None:
    """Tell the innermost ``cancelled_calls()`` block (if any) what a cancelled call cost."""
    box = _CANCELLED.get()
    if box is not None:
        box.append(call)


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """A session held open by this node: with whom, on which channel, at which pinned price."""

    session_id: str
    provider: str
    model: str
    channel: protocol.ChannelGrant
    tier: str
    price: protocol.Price

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "provider": self.provider, "model": self.model,
                "channel_id": self.channel.channel_id.hex(), "cap": self.channel.cap, "agent": self.channel.agent,
                "tier": self.tier, "price": {"input": self.price.input_per_1k, "output": self.price.output_per_1k}}


@dataclasses.dataclass(frozen=True)
class SessionSummary:
    """A held session once closed: what its receipts add up to."""

    session_id: str
    cumulative: int
    calls: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _commitment_json(offer: Any) -> dict[str, Any] | None:
    committed = protocol.offer_commitment(offer)
    if committed is None:
        return None
    return {"id": protocol.commitment_id(committed).hex(), "kind": committed.kind, "upstream": committed.upstream,
            "reproducible": bool(getattr(offer, "reproducible", False))}


@dataclasses.dataclass(frozen=True)
class ProviderRow:
    """One provider of one model as this node sees it: the listing's terms and this node's figures."""

    candidate: Candidate

    def to_json(self) -> dict[str, Any]:
        """A row of ``node providers --json``."""
        lst, offer, s = self.candidate.listing, self.candidate.offer, self.candidate.stats
        return {
            "peer_id": lst.provider,
            "model": offer.name,
            "input_price": offer.price.input_per_1k,
            "output_price": offer.price.output_per_1k,
            "max_context": offer.max_context,
            "min_charge": offer.price.min_charge,
            "rate_limit": offer.rate_limit_rpm,
            "max_concurrent": offer.max_concurrent,
            "trust": round(s.score, 1),  # what routing uses: local trust moved by the network's view
            "local_trust": round(s.score if s.local_score is None else s.local_score, 1),
            "network_trust": None if s.network_score is None else round(s.network_score, 1),
            "network_weight": s.network_weight,  # µc of settled value behind it
            "caught": s.caught,
            "commitment": _commitment_json(offer),
            "latency_ms": None if s.ttft_s is None else int(s.ttft_s * 1000),
            "tokens_per_s": None if s.tps is None else round(s.tps, 1),
            "benchmark_tokens_per_s": offer.tokens_per_s or None,
            "escrows": list(lst.escrow_agents),
            "gpus": [{"name": g.name, "memory_total_mb": g.memory_total_mb} for g in lst.hardware.gpus],
            "addrs": list(lst.addrs),
            "expires_at": lst.expires_at,
        }
