"""Routing: which providers to try for a request, in which order. Pure: no I/O; the market rows,
this node's trust stats and a random source come in as arguments.

Every candidate is priced at the terms its session would pin (``protocol.session_terms``: the
chosen tier, the batch discount, a fixed-rate contract), and ``Candidate.terms`` is what the
session then opens with, so a provider is ranked, budgeted and opened on one price.

Filters: the model, what the call needs (``features``: an offer serves a call only when its
listed features hold every one the call needs, ``CallOptions.needs()``; an embeddings call only an
offer listing ``embeddings``; a chat call never an offer that lists embeddings and nothing else),
the tier (offers without it are left out), ``only``/``ignore``, a maximum
price per 1K tokens (input and/or output, of those terms), an escrow agent this node can pay
through, and the trust floor. A provider under the floor is on probation (``_trust``): never one
with a recent protocol violation; when nobody above the floor is left, every other one comes, as a
probe, best score first; otherwise one whose back-off is over (``ProviderStats.probe_due``) comes
first as a probe (last, without fallbacks), so a recovered provider is found again. ``Candidate.probe``
marks them: the ``Renter`` runs one probe of a provider at a time. Orders:
- ``cheapest``: expected cost of this request (prompt size and max_tokens at those terms);
- ``fastest``: expected duration from this node's EWMA of time-to-first-token and tokens/s;
  unmeasured providers come after measured ones, except that with probability ``explore`` one
  unmeasured provider is tried first, so new providers get measured;
- ``best_trust``: trust score, then cost.
Ties fall back to cost, then peer id, so the order is stable.

When no offer of the model serves what the call needs, ``missing_feature`` names the feature
(``UnsupportedFeature``, the caller's 400: asking another provider will not help while none lists
it). When nothing else is left, ``why_none`` says which filter left nothing, in words a person can act on
(no provider of the model at all, none with that tier, none accepting an agent this node can pay
through, none under the price caps), naming what the market does offer.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Iterable

import protocol
from protocol import Listing, ModelOffer, Price

from .._errors import InvalidRequest
from ._trust import FLOOR, ProviderStats

__all__ = ["SORTS", "KINDS", "Preferences", "Candidate", "UnsupportedFeature", "serves", "rank", "missing_feature",
           "why_none"]

SORTS = ("cheapest", "fastest", "best_trust")
KINDS = ("chat", "embeddings")  # what a call asks of an offer: a completion, or embedding vectors
# the request field that asks for each feature (the HTTP faces' ``param`` of the refusal)
_FIELD = {"tools": "tools", "json": "response_format", "logprobs": "logprobs", "completions": "prompt",
          "embeddings": "model", "streaming": "stream"}


class UnsupportedFeature(InvalidRequest):
    """No offer of the model lists a feature the call needs (``tools``, ``json``, ``logprobs``,
    ``completions``, ``embeddings``): the caller's 400, ``unsupported_feature``, ``field`` the
    request field that asked for it."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message, field, "unsupported_feature")


def serves(offer: ModelOffer, needs: frozenset[str] = frozenset(), kind: str | None = "chat") -> bool:
    """Whether ``offer`` can serve a call of ``kind`` needing ``needs`` (the module's rules);
    ``kind`` None: any call (a listing of every provider of a model, ``node providers``)."""
    features = set(offer.features)
    if kind is None:
        return needs <= features
    if kind == "embeddings":
        return "embeddings" in features
    if features and features <= {"embeddings"}:  # an embeddings model: it writes no text
        return False
    return needs <= features


@dataclasses.dataclass(frozen=True)
class Preferences:
    """How a consumer wants providers chosen: strategy, price caps, only/ignore, fallbacks, trust floor."""

    sort: str = "cheapest"
    max_input_price: int | None = None  # µc per 1K tokens
    max_output_price: int | None = None
    only: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    allow_fallbacks: bool = True
    trust_floor: float = FLOOR
    explore: float = 0.1

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A provider to try, with the open terms it was ranked on: a session with it opens with
    ``tier`` and ``batch_calls`` at exactly ``terms``."""

    listing: Listing
    offer: ModelOffer
    agent: str
    terms: Price  # protocol.session_terms of the listed offer, tier, batch and contract
    expected_cost: int  # protocol.expected_call_cost of this request at ``terms``
    stats: ProviderStats
    tier: str = ""
    batch_calls: int = 0
    probe: bool = False  # under the trust floor: tried as a probation probe

    @property
    def provider(self) -> str:
        return self.listing.provider

    def expected_seconds(self, max_tokens: int) -> float | None:
        if self.stats.ttft_s is None:
            return None
        return self.stats.ttft_s + (max_tokens / self.stats.tps if self.stats.tps else 0.0)


def rank(
    rows: Iterable[tuple[Listing, ModelOffer]],
    prefs: Preferences,
    *,
    prompt_tokens: int,
    max_tokens: int,
    stats: Callable[[str], ProviderStats],
    agent_for: Callable[[Listing], str | None],
    rng: random.Random | None = None,
    tier: str = "",
    batch_calls: int = 0,
    contract_for: Callable[[str, str], Price | None] = lambda provider, model: None,
    needs: frozenset[str] = frozenset(),
    kind: str | None = None,
) -> list[Candidate]:
    """The providers to try, best first (only the first when fallbacks are off).

    Args:
        rows: market rows, each a listing and one of its model offers (as listed).
        prefs: filters and order.
        prompt_tokens, max_tokens: the request, for its expected cost.
        stats: this node's trust stats of a provider.
        agent_for: the escrow agent to pay a listing's provider through; None: none usable.
        rng: the random source for exploration.
        tier: the tier the session will name; offers without it are left out.
        batch_calls: the calls the session will declare (for a batch discount).
        contract_for: the rate of a fixed-rate contract in force with ``(provider, model)``, if any.
        needs, kind: what the call asks of an offer (``serves``); offers that cannot serve it are left
            out. ``kind`` None (the default): chat and embeddings offers alike (a listing of providers).

    Returns:
        Candidates carrying the terms their session would pin.
    """
    out: list[Candidate] = []
    probation: list[Candidate] = []
    for listing, offer in rows:
        if not serves(offer, needs, kind):
            continue
        if prefs.only and listing.provider not in prefs.only:
            continue
        if listing.provider in prefs.ignore:
            continue
        if tier and not any(t.name == tier for t in offer.tiers):
            continue
        terms = protocol.session_terms(offer, tier=tier, batch_calls=batch_calls,
                                       contract_price=contract_for(listing.provider, offer.name))
        if prefs.max_input_price is not None and terms.input_per_1k > prefs.max_input_price:
            continue
        if prefs.max_output_price is not None and terms.output_per_1k > prefs.max_output_price:
            continue
        agent = agent_for(listing)
        if agent is None:
            continue
        s = stats(listing.provider)
        cost = protocol.expected_call_cost(terms, prompt_tokens, max_tokens, offer.max_context)
        if s.score < prefs.trust_floor:
            if not s.violator:
                probation.append(Candidate(listing, offer, agent, terms, cost, s, tier, batch_calls, probe=True))
            continue
        out.append(Candidate(listing, offer, agent, terms, cost, s, tier, batch_calls))

    def by_cost(c: Candidate) -> tuple[int, str]:
        return c.expected_cost, c.provider

    if prefs.sort == "cheapest":
        out.sort(key=lambda c: (c.expected_cost, -c.stats.score, c.provider))
    elif prefs.sort == "best_trust":
        out.sort(key=lambda c: (-c.stats.score, by_cost(c)))
    else:
        measured = sorted((c for c in out if c.stats.measured),
                          key=lambda c: (c.expected_seconds(max_tokens), by_cost(c)))
        unmeasured = sorted((c for c in out if not c.stats.measured), key=by_cost)
        if unmeasured and (not measured or (rng or random.Random()).random() < prefs.explore):
            pick = (rng or random.Random()).randrange(len(unmeasured))
            unmeasured.insert(0, unmeasured.pop(pick))
            out = unmeasured[:1] + measured + unmeasured[1:]
        else:
            out = measured + unmeasured
    probation.sort(key=lambda c: (-c.stats.score, by_cost(c)))
    if not out:  # nobody above the floor: the floor never excludes the only providers for good
        out = probation
    else:
        due = [c for c in probation if c.stats.probe_due]
        if due and prefs.allow_fallbacks:
            out = due[:1] + out + due[1:]
        else:
            out = out + due
    return out if prefs.allow_fallbacks else out[:1]


def missing_feature(model: str, rows: Iterable[tuple[Listing, ModelOffer]], needs: frozenset[str] = frozenset(),
                    kind: str = "chat") -> UnsupportedFeature | None:
    """The refusal of a call no offer of ``model`` can serve (``serves``), naming what is missing;
    None when some offer can (or there is none at all: ``why_none`` says so)."""
    offers = [o for _, o in rows]
    if not offers or any(serves(o, needs, kind) for o in offers):
        return None
    if kind == "embeddings":
        return UnsupportedFeature(f"no provider of {model!r} serves embeddings (it is a chat model)", "model")
    chat = [o for o in offers if serves(o, frozenset(), "chat")]
    if not chat:
        return UnsupportedFeature(f"{model!r} is an embeddings model: it serves /v1/embeddings, not chat", "model")
    missing = sorted(needs - set().union(*(set(o.features) for o in chat)))
    if not missing:  # each feature is listed by someone, but no one offer lists them all
        return UnsupportedFeature(f"no provider of {model!r} supports {' and '.join(sorted(needs))} together",
                                  _FIELD.get(sorted(needs)[0]))
    return UnsupportedFeature(f"no provider of {model!r} supports {' or '.join(missing)}", _FIELD.get(missing[0]))


def _agents(rows: list[tuple[Listing, ModelOffer]]) -> str:
    agents = sorted({a for listing, _ in rows for a in listing.escrow_agents})
    return ", ".join(agents) if agents else "none"


def why_none(model: str, rows: list[tuple[Listing, ModelOffer]], prefs: Preferences, *, known_models: Iterable[str],
             agent_for: Callable[[Listing], str | None], wanted_agents: tuple[str, ...], tier: str = "") -> str:
    """Why ``rank`` left no candidate for ``model``: the first filter that left nothing, in words
    that say what to do next.

    Args:
        rows: the market's rows for ``model`` (as ``rank`` was given them).
        known_models: every model the market view knows of (named when nobody offers ``model``).
        agent_for: ``rank``'s picker of an escrow agent for a listing.
        wanted_agents: the agents this node would pay through (``--escrow``, or its own), for the message.
    """
    if not rows:
        known = sorted(set(known_models) - {model})
        return (f"no provider offers {model!r} (known models: {', '.join(known)})" if known else
                f"no provider offers {model!r}, and this node knows of no offers at all yet (is it connected? "
                "`node status` counts its peers and the listings it knows)")
    left = [(lst, o) for lst, o in rows if (not prefs.only or lst.provider in prefs.only)
            and lst.provider not in prefs.ignore]
    if not left:
        chosen = ", ".join(prefs.only) if prefs.only else "the providers you allow"
        return (f"{chosen} does not offer {model!r}; {len(rows)} provider(s) do: "
                + ", ".join(sorted({lst.provider for lst, _ in rows})))
    if tier:
        with_tier = [(lst, o) for lst, o in left if any(t.name == tier for t in o.tiers)]
        if not with_tier:
            return f"no provider of {model!r} offers the {tier} tier ({len(left)} offer it without tiers or with others)"
        left = with_tier
    payable = [(lst, o) for lst, o in left if agent_for(lst) is not None]
    if not payable:
        n = len(left)
        if wanted_agents:
            return (f"no provider of {model!r} accepts your escrow agent {', '.join(wanted_agents)}; {n} offer(s) it "
                    f"with agents {_agents(left)}: pay through one of those (--escrow PEER), or have the provider "
                    f"accept yours (on the provider: node escrow accept {wanted_agents[0]})")
        return f"{n} provider(s) offer {model!r} but accept no escrow agent this node can pay through"
    if prefs.max_input_price is not None or prefs.max_output_price is not None:
        return f"no provider of {model!r} is within your price limits ({len(payable)} offer it above them)"
    return f"no provider of {model!r} passes the routing preferences (trust floor, only/ignore)"
