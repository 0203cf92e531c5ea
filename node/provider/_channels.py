"""What this provider is owed on each escrow channel, across all of its sessions on it.

The agent pays a receipt per session (its ``cumulative`` less what that session was paid) but
caps the channel as a whole, refunds whatever is unclaimed once the channel expires, and a
cooperative close settles *one* session's receipt and refunds the rest at once. So a provider
that counted per session could be made to work unpaid (docs/DESIGN.md, "Settlement"):

- **Exposure.** A live session may still spend up to its spend cap; an ended one is owed what
  was counter-signed and not yet paid. A new session is admitted only if what the agent has
  paid, plus everything outstanding on the channel, plus the new session's cap fits the
  channel's cap (``admit``). Concurrent sessions can never spend past what is claimable.
- **Cooperative close.** Completed only when the receipt it settles covers everything owed on
  the channel: no other session live on it, none owed (``others``); else the other sessions'
  receipts are claimed first, or the close is declined and the session's receipt claimed.
  While a close is in flight (``closing_channel``) no new session is admitted on the channel.
- **Claims are due** (``due``) when a session has ended owing something, when its channel is
  within ``margin_s`` of expiry, and every ``interval_s`` while a session runs; at most one claim
  per channel is in flight (so each answer's channel total follows the one before). A failed
  claim is retried with exponential backoff (``retry_s`` doubling up to ``retry_max_s``), but
  never later than the channel's margin before expiry while it can still pay. An entry goes
  only when paid or on the agent's final word (``failed(final=True)``): this side's clock may
  run ahead of the agent's, so a channel past its expiry here is still claimed (backed off).
- **Restart.** ``load`` takes the store's unpaid receipts with their expiry unknown; ``learn``
  sets it once the agent has said (a query or a claim's answer), so margins apply again.
- **Bounded.** An entry exists only for a session this provider accepted on a channel its agent
  confirmed, and goes once paid (or once its channel expired); at most ``max_sessions`` are
  held (the oldest settled first, then the oldest).
Pure bookkeeping: no I/O, no clock (``now`` is wall-clock seconds, a parameter).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable, Iterator

import protocol

__all__ = ["ChannelBook", "SessionDebt"]


@dataclasses.dataclass
class SessionDebt:
    """One session's standing on its channel: what it may still spend, what it is owed."""

    session_id: bytes
    agent: str
    channel_id: bytes
    expires_at: int | None  # None: unknown (loaded from the receipt store after a restart)
    cap: int  # the session's spend cap
    live: bool = True
    last: protocol.Receipt | None = None  # the latest doubly-signed receipt
    claimed: int = 0  # cumulative µc the agent has paid for this session
    next_claim_at: int = 0  # a live session's next periodic claim (wall-clock seconds)
    retry_at: int = 0  # after a failed claim, none before this
    failures: int = 0  # failed claims in a row (the backoff's exponent)
    claiming: bool = False

    @property
    def signed(self) -> int:
        return self.last.cumulative if self.last is not None else 0

    @property
    def exposure(self) -> int:
        """The most this session can come to be owed in all."""
        return self.cap if self.live else self.signed

    @property
    def owed(self) -> int:
        return self.signed - self.claimed


class ChannelBook:
    """Every session this provider serves or is owed for, grouped by channel."""

    def __init__(self, *, interval_s: int = 30, margin_s: int = 30, retry_s: int = 5, retry_max_s: int = 300,
                 max_sessions: int = 100_000) -> None:
        """
        Args:
            interval_s: how often a live session's new receipts are claimed.
            margin_s: claim everything this long before a channel's expiry (and admit no call
                after that point: ``closing``).
            retry_s, retry_max_s: after a failed claim wait ``retry_s``, doubled after each
                further failure up to ``retry_max_s``.
        """
        self.interval_s, self.margin_s, self.retry_s, self.retry_max_s = interval_s, margin_s, retry_s, retry_max_s
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[bytes, SessionDebt] = OrderedDict()
        self._by_channel: dict[bytes, set[bytes]] = {}
        self._closing: set[bytes] = set()  # channels with a cooperative close in flight

    def __len__(self) -> int:
        return len(self._sessions)

    def session(self, session_id: bytes) -> SessionDebt | None:
        return self._sessions.get(session_id)

    def on_channel(self, channel_id: bytes) -> list[SessionDebt]:
        return [self._sessions[s] for s in self._by_channel.get(channel_id, ())]

    def outstanding(self, channel_id: bytes) -> int:
        """µc this channel may still have to pay for sessions this provider knows of."""
        return sum(d.exposure - d.claimed for d in self.on_channel(channel_id))

    def admit(self, session_id: bytes, channel: protocol.ChannelGrant, spend_cap: int, *, agent_cap: int,
              agent_claimed: int, now: int) -> str | None:
        """Hold ``spend_cap`` of ``channel`` for a new live session if the channel can pay it.

        Args:
            agent_cap, agent_claimed: the channel's cap and what it has paid, as its agent reports.

        Returns:
            None when admitted (the session is now held), else why not.
        """
        if channel.channel_id in self._closing:
            return "the channel is being closed"
        outstanding = self.outstanding(channel.channel_id)
        free = agent_cap - agent_claimed - outstanding
        if spend_cap > free:
            return (f"the channel's {agent_cap - agent_claimed} µc left are committed to this provider's other "
                    f"sessions on it ({outstanding} µc); {max(0, free)} µc free, the session asks {spend_cap}")
        self._add(SessionDebt(session_id, channel.agent, channel.channel_id, channel.expires_at, spend_cap,
                              next_claim_at=now + self.interval_s))
        return None

    def _add(self, debt: SessionDebt) -> None:
        self._sessions[debt.session_id] = debt
        self._by_channel.setdefault(debt.channel_id, set()).add(debt.session_id)
        while len(self._sessions) > self.max_sessions:
            victim = next((d for d in self._sessions.values() if not d.live and d.owed <= 0),
                          next(iter(self._sessions.values())))
            self._drop(victim.session_id)

    def _drop(self, session_id: bytes) -> None:
        debt = self._sessions.pop(session_id, None)
        if debt is None:
            return
        peers = self._by_channel.get(debt.channel_id)
        if peers is not None:
            peers.discard(session_id)
            if not peers:
                del self._by_channel[debt.channel_id]

    def load(self, receipts: Iterable[protocol.Receipt]) -> None:
        """Take in doubly-signed receipts not yet paid (the store's, after a restart) as ended sessions."""
        for r in receipts:
            held = self._sessions.get(r.session_id)
            if held is None:
                self._add(SessionDebt(r.session_id, r.agent, r.channel_id, None, r.cumulative, live=False, last=r))
            elif r.cumulative > held.signed:
                held.last = r

    def learn(self, channel_id: bytes, expires_at: int) -> None:
        """The agent says ``channel_id`` expires at ``expires_at`` (it only ever moves later)."""
        for debt in self.on_channel(channel_id):
            debt.expires_at = expires_at if debt.expires_at is None else max(debt.expires_at, expires_at)

    def channels_unknown(self) -> list[tuple[str, bytes]]:
        """``(agent, channel id)`` of every channel whose expiry is not known yet (after ``load``)."""
        return list(dict.fromkeys((d.agent, d.channel_id) for d in self._sessions.values() if d.expires_at is None))

    def countersigned(self, receipt: protocol.Receipt) -> None:
        debt = self._sessions.get(receipt.session_id)
        if debt is not None and receipt.cumulative > debt.signed:
            debt.last = receipt

    def end(self, session_id: bytes) -> None:
        """The session is over: it now owes only what was counter-signed."""
        debt = self._sessions.get(session_id)
        if debt is None:
            return
        debt.live = False
        if debt.owed <= 0:
            self._drop(session_id)

    def paid(self, receipt: protocol.Receipt) -> None:
        """The agent has paid ``receipt`` (or had already)."""
        debt = self._sessions.get(receipt.session_id)
        if debt is None:
            return
        debt.claimed = max(debt.claimed, receipt.cumulative)
        debt.claiming = False
        debt.failures = 0
        debt.retry_at = 0
        if not debt.live and debt.owed <= 0:
            self._drop(receipt.session_id)

    def failed(self, receipt: protocol.Receipt, now: int, final: bool = False) -> int:
        """A claim of ``receipt`` did not go through: retry later (backed off), or (``final``: the
        agent will never pay it) give it up.

        Returns:
            The wall-clock second of the next try (0 when given up or not held).
        """
        debt = self._sessions.get(receipt.session_id)
        if debt is None:
            return 0
        debt.claiming = False
        if final:
            self._drop(receipt.session_id)
            return 0
        delay = min(self.retry_max_s, self.retry_s * 2 ** min(debt.failures, 30))
        debt.failures += 1
        retry_at = now + delay
        if debt.expires_at is not None and now < debt.expires_at:  # never sleep through a payable channel's margin
            retry_at = min(retry_at, max(now + self.retry_s, debt.expires_at - self.margin_s))
        debt.retry_at = retry_at
        return retry_at

    @contextmanager
    def closing_channel(self, channel_id: bytes) -> Iterator[bool]:
        """Hold ``channel_id`` as being closed for the block (no session is admitted on it
        meanwhile); yields False if a close of it is already in flight."""
        if channel_id in self._closing:
            yield False
            return
        self._closing.add(channel_id)
        try:
            yield True
        finally:
            self._closing.discard(channel_id)

    def channel_settled(self, channel_id: bytes) -> None:
        """The channel was closed cooperatively: it pays nothing more to anyone."""
        for debt in self.on_channel(channel_id):
            self._drop(debt.session_id)

    def others(self, session_id: bytes, channel_id: bytes) -> list[SessionDebt]:
        """The other sessions on ``channel_id`` still live or owed something."""
        return [d for d in self.on_channel(channel_id) if d.session_id != session_id and (d.live or d.owed > 0)]

    def closing(self, channel: protocol.ChannelGrant, now: int) -> bool:
        """True once ``channel`` is too near its expiry to serve another call and still be paid."""
        return now >= channel.expires_at - self.margin_s

    def due(self, now: int) -> list[SessionDebt]:
        """Sessions whose latest receipt should be claimed now (each marked as being claimed:
        ``paid`` or ``failed`` ends that)."""
        out = []
        busy = {d.channel_id for d in self._sessions.values() if d.claiming} | self._closing
        for debt in list(self._sessions.values()):
            if debt.channel_id in busy:
                continue  # one claim per channel at a time; a close in flight pays it, or the claim follows
            if debt.owed <= 0 or now < debt.retry_at:
                continue
            near_expiry = debt.expires_at is not None and now >= debt.expires_at - self.margin_s
            if debt.live and not near_expiry and now < debt.next_claim_at:
                continue
            busy.add(debt.channel_id)
            out.append(self.start_claim(debt, now))
        return out

    def start_claim(self, debt: SessionDebt, now: int) -> SessionDebt:
        """Mark ``debt`` as being claimed now (so nothing else claims it meanwhile)."""
        debt.claiming = True
        debt.next_claim_at = now + self.interval_s
        return debt
