"""Renting from the market on this node's behalf: rank the providers of a model (``_routing``),
open an escrow channel with an agent the chosen provider accepts, run the session, settle, and
learn (``_trust``, each failure attributed by ``_failures.fault``). A refused, failed or timed-out
call moves on to the next candidate within the same request (``allow_fallbacks``); a failed
attempt is never paid — nothing was counter-signed. Each attempt first takes one of this node's
slots for the provider (``_pacing``: at most what it lists it serves at once, the rest queued,
bounded, with a deadline), then dials it, and only then locks money for it, so an attempt that
will not run opens no channel. A failed attempt's channel is closed at once when the provider
co-signs (after a Reject or a refused call: the session's end offers it); one on which no session
was ever accepted and nothing was offered back (the provider closed the stream or went silent
before its Accept) is kept as a spare and taken by the next attempt to that provider through that
agent, so a flaky provider cannot make each attempt lock a channel; otherwise it returns to this
node when it expires (run channels live ten minutes). When every provider tried was at
capacity (ours or theirs) the request fails with ``AtCapacity`` (HTTP 429, Retry-After); every
attempt's error names its cause and whose fault it was. A call is ranked only among offers that
list what it needs (``_routing.serves``); ``embed`` rents an embeddings offer for a batch of texts,
one session and a receipt per call of ``MAX_EMBED_INPUTS`` inputs, failing over only while
nothing of it is paid."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import random
import secrets
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

import protocol
from protocol import Listing, ModelOffer
from wallet import EscrowAgent

from .._calls import CallOptions
from .._clock import SYSTEM_WALL_CLOCK, WallClock
from .._contracts import Contract, active_contract
from .._errors import InvalidRequest, RemoteError
from .._receipts import ReceiptStore
from ..escrow._client import EscrowUnreachable
from ..escrow._ops import EscrowOps, EscrowRefused
from ..net._dial import describe
from ..net._market import Market
from ._delivery import SettlementUnconfirmed
from ._failures import CAPACITY, PROVIDER, VIOLATION, SessionRejected, fault
from ._pacing import RETRY_AFTER_S, Busy, Pacing
from ._request_check import check_call, embed_batches
from ._results import Attempt, Completion, Delta, Embeddings
from ._routing import Candidate, Preferences, missing_feature, rank, serves, why_none
from ._session_client import CallResult, ConsumerSessionHandle, ProviderFailed, SessionError, open_session, reach
from ._standing import CHANNEL_S as STANDING_CHANNEL_S
from ._standing import StandingSessions
from ._trust import TrustBook

__all__ = ["RentError", "AtCapacity", "Renter", "SessionReport", "estimate_prompt_tokens"]

_logger = logging.getLogger(__name__)
_RUN_CHANNEL_S = 600
_SESSION_CHANNEL_S = 3600
_MAX_ATTEMPTS = 3
_SPARE_MIN_LIFE_S = 180  # a provider admits a channel that lives 120 s more; a spare keeps a margin
_SPARES_PER_PROVIDER, _SPARES_MAX = 4, 256


class RentError(RemoteError):
    """No provider could be rented for this request (the message says why)."""

    def __init__(self, message: str, attempts: tuple[Attempt, ...] = ()) -> None:
        super().__init__(message)
        self.attempts = tuple(attempts)  # the providers tried, each with its error


class AtCapacity(RentError):
    """Every provider tried was at capacity — this node already ran as many sessions with it as it
    serves (``_pacing.Busy``), or it refused for capacity or its rate limit. Nothing was paid;
    trying again after ``retry_after_s`` may work."""

    def __init__(self, message: str, attempts: tuple[Attempt, ...] = (), retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message, attempts)
        self.retry_after_s = retry_after_s


def _named(exc: BaseException) -> str:
    """``exc``'s message, never without its cause (a bare ``…: `` gets the cause's type and text)."""
    text = str(exc).strip()
    if not text or text.endswith(":"):
        cause = exc.__cause__ or exc.__context__
        text = f"{text} {describe(cause) if cause is not None else type(exc).__name__}".strip()
    return text


def _failed(model: str, attempts: list[Attempt], retry_after_s: int, opening: bool = False) -> RentError:
    """The error for a request every attempt of which failed: ``AtCapacity`` when all were at capacity."""
    causes = "; ".join(f"{a.provider}: {a.error}" if opening else str(a.error) for a in attempts)
    if attempts and all(a.fault == CAPACITY for a in attempts):
        return AtCapacity(f"every provider of {model!r} is at capacity: {causes}", tuple(attempts),
                          max(retry_after_s, RETRY_AFTER_S))
    if opening:
        return RentError(f"no provider of {model!r} accepted a session: {causes}", tuple(attempts))
    return RentError(f"every provider of {model!r} failed: {causes}", tuple(attempts))


def estimate_prompt_tokens(messages: list[dict[str, Any]], options: CallOptions = CallOptions()) -> int:
    """The most prompt tokens a call of ``messages`` (and ``options``) can be billed
    (``protocol.request_token_bound`` of the request it sends)."""
    if options == CallOptions() and all(set(m) <= {"role", "content"} for m in messages):
        return protocol.prompt_token_bound((m["role"], m["content"]) for m in messages)
    return protocol.request_token_bound(check_call(messages, 1, 1000, 1000, (), options))


@dataclasses.dataclass
class SessionReport:
    """One finished session as this node's attestation of it sees it: its settled calls (their
    results, the last one's receipt among them) and the provider faults that ended it."""

    listing: Listing
    offer: ModelOffer
    agent: str
    settled_by_close: bool  # the channel was this session's own, settled at its close
    results: list[CallResult] = dataclasses.field(default_factory=list)
    failures: int = 0


class Renter:
    """Rents on this node's behalf: ranks providers, opens a channel, runs the session with failover."""

    def __init__(self, market: Market, escrow: EscrowOps, local_agent: EscrowAgent | None,
                 receipts: ReceiptStore, trust: TrustBook, clock: WallClock = SYSTEM_WALL_CLOCK,
                 rng: random.Random | None = None, contracts: tuple[Contract, ...] = (),
                 pacing: Pacing | None = None) -> None:
        self.market = market
        self.escrow = escrow
        self.local_agent = local_agent
        self.receipts = receipts
        self.trust = trust
        self.clock = clock
        self.rng = rng or random.Random()
        self.contracts = contracts  # fixed-rate contracts this node holds as a client
        self.pacing = pacing or Pacing()  # this node's own bound on sessions at once per provider
        self._spares: dict[tuple[str, str], list[protocol.ChannelGrant]] = {}  # (agent, provider): unused channels
        # one-shot calls' sessions, kept open between calls once ``standing.serve`` runs (``_standing``)
        self.standing = StandingSessions(self._standing_session, clock, waiting=self.pacing.waiting)
        # each settled call with the offer it was rented on, at once (the node's spot checks); must not block
        self.on_settled: Callable[[Listing, ModelOffer, CallResult], None] | None = None
        # each session that settled a call or failed by the provider's fault, once it is over (the node's
        # attestations and market observations); must not block
        self.on_session_end: Callable[[SessionReport], None] | None = None

    async def rows(self, model: str) -> list[tuple[Listing, ModelOffer]]:
        rows = self.market.view.rows(self.market.now(), model)
        if not rows:
            await self.market.lookup(model)
            rows = self.market.view.rows(self.market.now(), model)
        me = self.market.identity.peer_id
        return [(r.listing, r.offer) for r in rows if r.listing.provider != me]

    def _agent_picker(self, escrow: str | None) -> Callable[[Listing], str | None]:
        wanted = self.escrow.agent_id(escrow) if escrow is not None else None
        own = self.local_agent.identity.peer_id if self.local_agent is not None else None

        def pick(listing: Listing) -> str | None:
            if wanted is not None:
                return wanted if wanted in listing.escrow_agents else None
            if own is not None and own in listing.escrow_agents:
                return own
            return listing.escrow_agents[0] if listing.escrow_agents else None

        return pick

    def _contract_for(self) -> Callable[[str, str], protocol.Price | None]:
        """The rate of a fixed-rate contract in force now with a provider for a model, if any."""
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)

        def price(provider: str, model: str) -> protocol.Price | None:
            contract = active_contract(self.contracts, provider, model, now)
            return contract.price if contract is not None else None

        return price

    async def candidates(self, model: str, prefs: Preferences, *, prompt_tokens: int, max_tokens: int,
                         escrow: str | None = None, tier: str = "", batch_calls: int = 0,
                         needs: frozenset[str] = frozenset(), kind: str = "chat") -> list[Candidate]:
        """Ranked candidates for a request, each priced at the terms its session would pin (with
        ``tier``: only providers offering that tier; only offers that serve a call of ``kind``
        needing ``needs``, ``_routing.serves``).

        Raises:
            UnsupportedFeature: no offer of the model lists a feature the call needs.
            RentError: nobody offers the model (and tier) within the preferences.
        """
        rows = await self.rows(model)
        ranked = rank(rows, prefs, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                      stats=self.trust.get, agent_for=self._agent_picker(escrow), rng=self.rng, tier=tier,
                      batch_calls=batch_calls, contract_for=self._contract_for(), needs=needs, kind=kind)
        if not ranked:
            refusal = missing_feature(model, rows, needs, kind)
            if refusal is not None:
                raise refusal
            raise RentError(await self._why_none(model, prefs, escrow, tier, needs, kind))
        return ranked

    async def _why_none(self, model: str, prefs: Preferences, escrow: str | None, tier: str,
                        needs: frozenset[str] = frozenset(), kind: str = "chat") -> str:
        """Why nobody can be rented for ``model``, saying what to do next (``_routing.why_none``)."""
        if escrow is not None:
            wanted: tuple[str, ...] = (self.escrow.agent_id(escrow),)
        else:
            wanted = (self.local_agent.identity.peer_id,) if self.local_agent is not None else ()
        me = self.market.identity.peer_id
        known = {r.offer.name for r in self.market.view.rows(self.market.now(), None) if r.listing.provider != me}
        rows = [(lst, o) for lst, o in await self.rows(model) if serves(o, needs, kind)]
        return why_none(model, rows, prefs, known_models=known,
                        agent_for=self._agent_picker(escrow), wanted_agents=wanted, tier=tier)

    async def channel(self, channel_id: str, agent: str | None) -> tuple[protocol.ChannelGrant, int]:
        """An open channel of this node's (``node escrow open``) to rent on, and what it can still pay.

        What it can pay is its cap less the larger of what its agent has paid out of it and what
        this node has counter-signed on it (each session's latest receipt): what a provider owed on
        it, but not yet paid, is never spent twice.

        Args:
            agent: the channel's escrow agent; None: the one this node's receipts name for the
                channel, else this node's own agent.

        Raises:
            InvalidRequest: no agent to ask; the channel is not this node's, not open, or too close to its expiry.
            protocol.SpendLimitReached: it cannot pay for any more calls.
            EscrowRefused, EscrowUnreachable: the agent does not know it, or cannot be asked.
        """
        cid = bytes.fromhex(channel_id)
        if agent is None:
            named = self.receipts.query("SELECT agent FROM receipts WHERE channel_id = ? LIMIT 1", (cid,))
            if named:
                agent = named[0][0]
            elif self.local_agent is None:
                raise InvalidRequest(f"name channel {channel_id}'s escrow agent (--escrow PEER): this node runs none "
                                     "and has no receipt on that channel", "escrow")
        info = await self.escrow.channel(agent, channel_id)
        grant = info.grant
        me = self.market.identity.peer_id
        if grant.consumer != me:
            raise InvalidRequest(f"channel {channel_id} is not this node's to spend: its consumer is {grant.consumer}",
                                 "channel")
        if info.state.status != "open":
            raise InvalidRequest(f"channel {channel_id} is {info.state.status}: open a new one (node escrow open)",
                                 "channel")
        left_s = grant.expires_at - int(self.clock())
        if left_s < _SPARE_MIN_LIFE_S:
            raise InvalidRequest(f"channel {channel_id} expires in {max(0, left_s)} s; providers need at least "
                                 f"{_SPARE_MIN_LIFE_S // 60} min to serve and claim: open a new one", "channel")
        (signed,), = self.receipts.query(
            "SELECT COALESCE(SUM(top), 0) FROM (SELECT MAX(cumulative) AS top FROM receipts "
            "WHERE role = 'consumer' AND channel_id = ? GROUP BY session_id)", (cid,))
        remaining = grant.cap - max(info.state.claimed, int(signed))
        if remaining <= 0:
            raise protocol.SpendLimitReached(f"channel {channel_id} is spent ({protocol.format_credits(grant.cap)} "
                                             "credits): open a new one (node escrow open)")
        return grant, remaining

    @staticmethod
    def _on_channel(prefs: Preferences, grant: protocol.ChannelGrant) -> Preferences:
        """``prefs`` narrowed to the one provider ``grant`` pays."""
        if prefs.only and grant.provider not in prefs.only:
            raise InvalidRequest(f"the channel pays provider {grant.provider}, not {', '.join(prefs.only)}",
                                 "provider")
        return dataclasses.replace(prefs, only=(grant.provider,))

    @asynccontextmanager
    async def _session(self, c: Candidate, model: str, budget: int, ttl_s: int,
                       given: protocol.ChannelGrant | None = None, opened: protocol.ChannelGrant | None = None
                       ) -> AsyncIterator[tuple[ConsumerSessionHandle, protocol.ChannelGrant]]:
        """Open a session with ``c`` on the terms it was ranked on (``c.terms``, ``c.tier``,
        ``c.batch_calls``), over a new channel of ``budget`` µc — or over ``given``, the caller's
        own channel (``node escrow open``), spending at most ``budget`` of it: that one is never
        closed here (the session ends without settling it: the provider claims what it is owed and
        the rest stays in the channel for the next session), never offered back, never kept as a spare.
        ``opened``: a channel just opened for this session (``_standing_session``), settled like a new one."""
        # dial first: a provider that cannot be reached never gets a channel (and locks no money)
        await reach(self.market.host, c.provider, c.listing.addrs, trust=self.trust)
        spend = max(1, budget)
        if given is not None:
            channel = given
        else:
            channel = opened or self._spare(c, spend, ttl_s) or await self._open_channel(c, spend, ttl_s)
        opened = False
        report = SessionReport(c.listing, c.offer, channel.agent, settled_by_close=given is None)
        try:
            async with open_session(self.market.host, self.market.identity, provider=c.provider,
                                    addrs=c.listing.addrs, model=model, price=c.terms, listing_seq=c.listing.seq,
                                    channel=channel, spend_limit=min(spend, channel.cap),
                                    max_context=c.offer.max_context, receipts=self.receipts, clock=self.clock,
                                    tier=c.tier, batch_calls=c.batch_calls, trust=self.trust,
                                    commitment=protocol.commitment_id(protocol.offer_commitment(c.offer)),
                                    on_settled=self._settled_hook(c, report),
                                    withdraw_on_reject=given is None) as handle:
                opened = True
                try:
                    yield handle, channel
                except SessionError as exc:
                    if fault(exc) in (PROVIDER, VIOLATION):
                        report.failures += 1
                    raise
                finally:
                    if given is not None:  # end it before open_session would settle (close) the channel
                        with trio.CancelScope(shield=True):
                            await handle.close(settle_escrow=False, wait_s=10.0)
        except SessionRejected:
            raise  # a channel of its own was offered back to the provider (a close of the unused channel)
        except SessionError:
            if not opened and given is None:  # no Accept, nothing offered back: the next attempt takes it
                self._keep_spare(c, channel)
            raise
        finally:
            if (report.results or report.failures) and self.on_session_end is not None:
                self.on_session_end(report)

    @asynccontextmanager
    async def _standing_session(self, c: Candidate, model: str, lock: int
                                ) -> AsyncIterator[tuple[ConsumerSessionHandle, protocol.ChannelGrant]]:
        """A session for ``StandingSessions``: its pacing slot held for its life, over a channel of
        ``lock`` µc — or of one call's expected cost when the credits do not cover ``lock``."""
        async with self.pacing.slot(c):
            await reach(self.market.host, c.provider, c.listing.addrs, trust=self.trust)  # before money is locked
            try:  # a standing channel never takes more than a quarter of what this node holds there
                lock = max(c.expected_cost, min(lock, (await self.escrow.balance(c.agent)).available // 4))
            except (EscrowRefused, EscrowUnreachable):
                lock = c.expected_cost
            try:
                channel = await self._open_channel(c, lock, STANDING_CHANNEL_S)
            except EscrowRefused as exc:
                if exc.code != "insufficient_funds" or lock <= c.expected_cost:
                    raise
                channel = await self._open_channel(c, c.expected_cost, STANDING_CHANNEL_S)
            async with self._session(c, model, channel.cap, STANDING_CHANNEL_S, opened=channel) as pair:
                yield pair

    def _settled_hook(self, c: Candidate, report: SessionReport) -> Callable[[CallResult], None]:
        hook = self.on_settled

        def settled(result: CallResult) -> None:
            report.results.append(result)
            if hook is not None:
                hook(c.listing, c.offer, result)

        return settled

    async def _open_channel(self, c: Candidate, spend: int, ttl_s: int) -> protocol.ChannelGrant:
        """A new channel of ``spend`` µc to ``c``'s provider through ``c``'s agent.

        Raises:
            EscrowRefused: the agent said no; without the credits, with this node's balance there
                and what to do about it in the message.
            EscrowUnreachable: the agent could not be asked (saying what else may work).
        """
        try:
            return await self.escrow.open_grant(c.agent, c.provider, spend, ttl_s)
        except EscrowRefused as exc:
            if exc.code != "insufficient_funds":
                raise
            raise EscrowRefused(exc.code, exc.detail, await self._no_funds(c.agent, spend)) from exc
        except EscrowUnreachable as exc:
            others = [a for a in c.listing.escrow_agents if a != c.agent]
            raise EscrowUnreachable(f"{exc}; nothing was paid. Try again once the agent is back"
                                    + (f", or pay through another agent this provider accepts (--escrow {others[0]})"
                                       if others else "")) from exc

    async def _no_funds(self, agent: str, needed: int) -> str:
        """What to tell a consumer whose credits at ``agent`` do not cover ``needed`` µc."""
        me = self.market.identity.peer_id
        try:
            held = f"{protocol.format_credits((await self.escrow.balance(agent)).available)} credits"
        except (EscrowRefused, EscrowUnreachable):
            held = "less than that"
        return (f"your balance at escrow agent {agent} is {held}, and the channel for this needs "
                f"{protocol.format_credits(needed)} credits: mint or deposit first (on the agent: "
                f"node escrow mint --to {me} --amount CREDITS)")

    def _spare(self, c: Candidate, spend: int, ttl_s: int) -> protocol.ChannelGrant | None:
        """An unused channel to ``c``'s provider through its agent that pays for ``spend`` and lives
        long enough, taken out of the spares; None: open a new one."""
        now = int(self.clock())
        kept = self._spares.get((c.agent, c.provider), [])
        kept[:] = [g for g in kept if g.expires_at - now >= _SPARE_MIN_LIFE_S]
        for i, grant in enumerate(kept):
            if spend <= grant.cap <= 2 * spend and grant.expires_at - now >= ttl_s // 2:
                return kept.pop(i)
        return None

    def _keep_spare(self, c: Candidate, channel: protocol.ChannelGrant) -> None:
        """Keep ``channel`` (no session was ever accepted on it) for the next attempt to its provider,
        instead of leaving it locked until it expires for nothing (bounded)."""
        kept = self._spares.setdefault((c.agent, c.provider), [])
        if len(kept) < _SPARES_PER_PROVIDER and sum(map(len, self._spares.values())) < _SPARES_MAX:
            kept.append(channel)

    async def quote(self, model: str, messages: list[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                    prefs: Preferences = Preferences(), top_p_milli: int = 1000, stop: tuple[str, ...] = (),
                    options: CallOptions = CallOptions()) -> int:
        """The most one call of this request may cost (µc) at any provider ``run`` would try for it: its
        whole prompt (as the wire bounds it) and a full ``max_tokens`` answer at each one's terms. What
        a caller who pays before the call (x402) is asked for; ``run(..., budget=quote)`` never spends more.

        Raises:
            UnsupportedFeature, RentError: no provider could serve it; InvalidRequest: it cannot go on the wire.
        """
        request = check_call(messages, max_tokens, temperature_milli, top_p_milli, stop, options)
        ranked = await self.candidates(model, prefs, prompt_tokens=protocol.request_token_bound(request),
                                       max_tokens=max_tokens, needs=options.needs())
        return max(c.expected_cost for c in ranked[:_MAX_ATTEMPTS])

    async def run(self, model: str, messages: list[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                  prefs: Preferences = Preferences(), budget: int | None = None, escrow: str | None = None,
                  top_p_milli: int = 1000, stop: tuple[str, ...] = (), tier: str = "",
                  on_text: Callable[[str], Awaitable[None]] | None = None, channel: str | None = None,
                  options: CallOptions = CallOptions(),
                  on_delta: Callable[[Delta], Awaitable[None]] | None = None) -> Completion:
        """One paid call with failover, start to settlement. Trust learns from every attempt (the
        session handle records each outcome). With ``channel`` (an open channel of this node's,
        ``escrow`` its agent) the call goes to that channel's provider and is paid from it, which
        stays open (``channel()``); without, a channel is opened for the call and settled after it.
        ``options`` (tools, response format, logprobs, a legacy prompt, …) route the call only to
        offers listing the features it needs; ``on_delta`` gets each streamed piece whole (text,
        tool-call pieces, logprobs) beside ``on_text``'s text.

        Raises:
            AtCapacity: every provider tried was at capacity (ours or theirs); retry later.
            UnsupportedFeature: no offer of the model lists a feature the call needs (the caller's 400).
            RentError: nobody could serve it (with every attempt's error).
            EscrowRefused / EscrowUnreachable: no channel could be opened (e.g. not enough credits).
            protocol.SpendLimitReached: ``budget`` is below what one call may cost.
            InvalidRequest, protocol.MessageTooLarge: the call cannot go on the wire (nothing was locked).
        """
        request = check_call(messages, max_tokens, temperature_milli, top_p_milli, stop, options)  # before money
        started = trio.current_time()
        prompt = protocol.request_token_bound(request)
        given, left = await self.channel(channel, escrow) if channel is not None else (None, None)
        if given is not None:
            prefs, escrow = self._on_channel(prefs, given), given.agent
        ranked = await self.candidates(model, prefs, prompt_tokens=prompt, max_tokens=max_tokens, escrow=escrow,
                                       tier=tier, needs=options.needs())
        if budget is not None and all(budget < protocol.call_cost(c.terms, 1, 1) for c in ranked[:_MAX_ATTEMPTS]):
            raise protocol.SpendLimitReached(f"a budget of {protocol.format_credits(budget)} credits pays for no call "
                                             "at these providers' prices")
        attempts: list[Attempt] = []
        retry_after = 0
        for c in ranked[:_MAX_ATTEMPTS]:
            streamed = False

            async def relay(text: str) -> None:
                nonlocal streamed
                streamed = True
                if on_text is not None:
                    await on_text(text)

            async def relay_delta(delta: Delta) -> None:
                nonlocal streamed
                streamed = True
                if on_delta is not None:
                    await on_delta(delta)

            # a standing session (``_standing``), unless the caller named a channel or a budget (which
            # bounds what may be locked for it, not only what it may spend)
            standing = self.standing.active and given is None and budget is None
            try:
                for fresh in (False, True):
                    reused = False
                    try:
                        if standing:
                            async with self.standing.session(c, model) as (session, paid_from, reused):
                                result = await session.call(
                                    messages, max_tokens, temperature_milli=temperature_milli, top_p_milli=top_p_milli,
                                    stop=stop, on_text=relay, options=options, on_delta=relay_delta)
                        else:
                            # ranked on this very request: its expected cost is one full call at the session's terms
                            budget_here = budget if budget is not None else c.expected_cost
                            if left is not None:
                                budget_here = min(budget_here, left)
                            async with self.pacing.slot(c), \
                                    self._session(c, model, budget_here, _RUN_CHANNEL_S, given) as (session, paid_from):
                                result = await session.call(
                                    messages, max_tokens, temperature_milli=temperature_milli, top_p_milli=top_p_milli,
                                    stop=stop, on_text=relay, options=options, on_delta=relay_delta)
                        break
                    except ProviderFailed:
                        # a standing session the provider dropped while it idled (a restart): once more, on a new one
                        if not reused or streamed or fresh:
                            raise
                        _logger.info("the standing session with %s was gone; opening a new one", c.provider)
            except Busy as exc:  # nothing was dialled or locked for it
                attempts.append(Attempt(c.provider, str(exc), CAPACITY))
                retry_after = max(retry_after, exc.retry_after_s)
                _logger.info("not calling %s: %s", c.provider, exc)
                continue
            except SettlementUnconfirmed:
                raise  # the call was served and paid for: never run it again elsewhere
            except SessionError as exc:
                attempts.append(Attempt(c.provider, _named(exc), fault(exc)))
                if isinstance(exc, SessionRejected):
                    retry_after = max(retry_after, exc.retry_after_s)
                _logger.info("call to %s failed (%s); %s", c.provider, exc,
                             "trying the next provider" if not streamed else "not retried: text was already streamed")
                if streamed:  # the caller has seen part of an answer: starting over elsewhere would mix two
                    raise RentError(f"the provider failed mid-answer: {exc}", tuple(attempts)) from exc
                continue
            return Completion(id=secrets.token_hex(12), provider=c.provider, model=model, text=result.text,
                              finish_reason=result.finish_reason, receipt=result.receipt,
                              latency_ms=int((trio.current_time() - started) * 1000), channel=paid_from,
                              attempts=(*attempts, Attempt(c.provider)), tool_calls=result.tool_calls,
                              logprobs=result.logprobs)
        raise _failed(model, attempts, retry_after)

    async def embed(self, model: str, inputs: list[str] | tuple[str, ...], *, dimensions: int = 0,
                    prefs: Preferences = Preferences(), budget: int | None = None,
                    escrow: str | None = None) -> Embeddings:
        """Embed ``inputs`` with ``model`` (an offer listing ``embeddings``): one session with one
        provider, a call per batch of at most ``MAX_EMBED_INPUTS`` inputs (and one frame), a
        doubly-signed receipt per call, billed per input token. Fails over to the next provider
        only while nothing is paid (before the first batch's receipt).

        Args:
            dimensions: the vectors' length (0: the model's own); a provider whose model cannot
                shorten its vectors refuses.
            budget: the most the whole request may cost (µc); default: the worst case of every batch.

        Raises:
            InvalidRequest: no inputs, an input too long, ``dimensions`` out of range (nothing locked).
            UnsupportedFeature: the model is offered only as a chat model.
            AtCapacity, RentError, EscrowRefused, EscrowUnreachable, protocol.SpendLimitReached: as ``run``.
        """
        batches = embed_batches(tuple(inputs), dimensions)  # before any money moves
        requests = [protocol.EmbedRequest(session_id=bytes(16), call_seq=0, inputs=b, dimensions=dimensions)
                    for b in batches]
        bounds = [protocol.request_token_bound(r) for r in requests]
        started = trio.current_time()
        ranked = await self.candidates(model, prefs, prompt_tokens=sum(bounds), max_tokens=0, escrow=escrow,
                                       kind="embeddings")
        attempts: list[Attempt] = []
        retry_after = 0
        for c in ranked[:_MAX_ATTEMPTS]:
            worst = sum(protocol.call_cost(c.terms, n, 0) for n in bounds)
            budget_here = max(1, worst if budget is None else min(budget, worst))
            results: list[Any] = []
            try:
                async with self.pacing.slot(c), \
                        self._session(c, model, budget_here, _RUN_CHANNEL_S) as (session, paid_from):
                    for batch in batches:  # a later batch must match the first's size, or it is refused unpaid
                        results.append(await session.embed(batch, dimensions, results[0].dims if results else 0))
            except Busy as exc:
                attempts.append(Attempt(c.provider, str(exc), CAPACITY))
                retry_after = max(retry_after, exc.retry_after_s)
                continue
            except SettlementUnconfirmed:
                raise
            except SessionError as exc:
                attempts.append(Attempt(c.provider, _named(exc), fault(exc)))
                if isinstance(exc, SessionRejected):
                    retry_after = max(retry_after, exc.retry_after_s)
                if results:  # part of it is paid: running it again elsewhere would pay twice
                    raise RentError(f"the provider failed after {len(results)} of {len(batches)} embeddings calls: "
                                    f"{exc}", tuple(attempts)) from exc
                continue
            dims = {r.dims for r in results}
            if len(dims) != 1:
                raise RentError(f"provider {c.provider} answered vectors of different sizes ({sorted(dims)})",
                                (*attempts, Attempt(c.provider, "mixed dims", "provider")))
            (d,) = dims
            size = d * 4
            vectors = tuple(r.vectors[i * size:(i + 1) * size] for r in results for i in range(len(r.vectors) // size))
            return Embeddings(id=secrets.token_hex(12), provider=c.provider, model=model, dims=d, vectors=vectors,
                              receipts=tuple(r.receipt for r in results),
                              latency_ms=int((trio.current_time() - started) * 1000), channel=paid_from,
                              attempts=(*attempts, Attempt(c.provider)))
        raise _failed(model, attempts, retry_after)

    @asynccontextmanager
    async def session(self, model: str, *, budget: int, prefs: Preferences = Preferences(), escrow: str | None = None,
                      ttl_s: int = _SESSION_CHANNEL_S, tier: str = "", batch_calls: int = 0,
                      channel: str | None = None
                      ) -> AsyncIterator[tuple[ConsumerSessionHandle, Listing, protocol.ChannelGrant]]:
        """A multi-call session with the best candidate that accepts it (one channel of ``budget`` µc);
        settled when the block ends. ``tier`` picks a provider's service tier (only providers offering
        it are tried); ``batch_calls`` declares the calls to come, for a batch discount. With
        ``channel`` (an open channel of this node's; ``escrow`` its agent) the session is with that
        channel's provider and spends at most ``budget`` of what the channel has left, and the
        channel stays open when it ends (``channel()``, ``_session``)."""
        given, left = await self.channel(channel, escrow) if channel is not None else (None, None)
        if given is not None:
            prefs, escrow, budget = self._on_channel(prefs, given), given.agent, min(budget, left)
        # a session's calls are unknown yet: rank by a nominal call of 1K tokens in and 1K out
        ranked = await self.candidates(model, prefs, prompt_tokens=1000, max_tokens=1000, escrow=escrow, tier=tier,
                                       batch_calls=batch_calls)
        attempts: list[Attempt] = []
        retry_after = 0
        for c in ranked[:_MAX_ATTEMPTS]:
            async with AsyncExitStack() as stack:
                try:  # fail over only while opening: errors inside the caller's block are the caller's
                    await stack.enter_async_context(self.pacing.slot(c))  # held for the session's life
                    handle, paid_from = await stack.enter_async_context(
                        self._session(c, model, budget, ttl_s, given))
                except Busy as exc:
                    attempts.append(Attempt(c.provider, str(exc), CAPACITY))
                    retry_after = max(retry_after, exc.retry_after_s)
                    continue
                except SessionError as exc:
                    attempts.append(Attempt(c.provider, _named(exc), fault(exc)))
                    if isinstance(exc, SessionRejected):
                        retry_after = max(retry_after, exc.retry_after_s)
                    continue
                yield handle, c.listing, paid_from
                return
        raise _failed(model, attempts, retry_after, opening=True)
