"""The embeddable swarm: ``async with open_swarm(home) as swarm`` runs a full node inside a trio
program — market, sessions, escrow client (and agent, with ``escrow=True``) — without the HTTP API.
Amounts are integer micro-credits, prices µc per 1K tokens, as everywhere in the API. Calls take
OpenAI's shapes (messages with ``tool_calls`` and ``tool`` turns, ``tools``, ``tool_choice``,
``response_format``, …) and answer in them (``choices[0].message.tool_calls``, ``logprobs``);
``embed`` answers OpenAI's embeddings document."""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import trio

import wallet

from ._calls import CallOptions
from ._home import Home, init_home, resolve_home
from ._node import Node, open_node, resolve_config
from .consumer import Preferences, SessionInfo
from .provider._offers import Offer

__all__ = ["open_swarm", "Swarm", "SwarmSession"]


def _messages(prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _options(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
             response_format: dict[str, Any] | None, seed: int | None, logprobs: bool, top_logprobs: int,
             user: str) -> CallOptions:
    return CallOptions(tools=tuple(tools or ()), tool_choice=tool_choice, response_format=response_format, seed=seed,
                       logprobs=logprobs, top_logprobs=top_logprobs, user=user)


class SwarmSession:
    """A multi-call session: one provider, one escrow channel, one receipt per call."""

    def __init__(self, swarm: "Swarm", opened: SessionInfo) -> None:
        self._swarm, self.session_id, self.info = swarm, opened.session_id, opened.to_json()

    async def call(self, prompt: str | list[dict[str, Any]], *, max_tokens: int = 256,
                   temperature: float = 1.0, tools: list[dict[str, Any]] | None = None,
                   tool_choice: str | dict[str, Any] | None = None, response_format: dict[str, Any] | None = None,
                   seed: int | None = None, logprobs: bool = False, top_logprobs: int = 0,
                   user: str = "") -> dict[str, Any]:
        """One call of the session; the same document as a ``node chat`` turn (extras as ``Swarm.run``)."""
        done = await self._swarm.service.sessions.call(
            self.session_id, _messages(prompt), max_tokens=max_tokens, temperature_milli=int(round(temperature * 1000)),
            options=_options(tools, tool_choice, response_format, seed, logprobs, top_logprobs, user))
        return done.to_json()


class Swarm:
    """A running node embedded in a trio program: the market, renting, selling and the wallet, as JSON documents."""

    def __init__(self, service: Node) -> None:
        self.service = service

    @property
    def peer_id(self) -> str:
        return self.service.identity.peer_id

    @property
    def addrs(self) -> list[str]:
        """Where other nodes reach this one (…/p2p/<peer id>): pass as ``bootstrap``."""
        return [str(a) for a in self.service.host.get_addrs()]

    async def providers(self, model: str | None = None, sort: str = "cheapest") -> list[dict[str, Any]]:
        return [row.to_json() for row in await self.service.providers(model, sort)]

    async def wait_for(self, model: str, timeout: float = 30.0, *, dht_retry_s: float = 5.0) -> list[dict[str, Any]]:
        """The providers of ``model`` once at least one is known (gossip or DHT).

        Looks in the market view, then again on each of its changes (``Market.wait_changed``):
        no polling. Beside that it asks the DHT on entry and every ``dht_retry_s``, since gossip
        can be missed (a message dropped, a node not yet in the mesh); what the DHT finds enters
        the view, which is a change.

        Raises:
            TimeoutError: none appeared in time.
        """
        market = self.service.market

        async def ask_dht() -> None:
            while True:
                await market.lookup(model)
                await trio.sleep(dht_retry_s)

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_dht)
                while True:
                    seen = market.view.version
                    if rows := await self.service.providers(model, "cheapest", ask_dht=False):
                        nursery.cancel_scope.cancel()
                        return [row.to_json() for row in rows]
                    await market.wait_changed(seen)
        raise TimeoutError(f"no provider of {model!r} appeared within {timeout:.0f}s")

    async def offer(self, model: str, *, backend: str = "builtin", input_price: int, output_price: int,
                    features: tuple[str, ...] | list[str] = (), **limits: int) -> Offer:
        """Sell ``model``: its model is loaded and benchmarked first, then the offer is persisted in
        the home's config and published at once. Offering it again with another backend swaps the
        model its sessions serve. ``features`` declares what it serves (``protocol.FEATURES``;
        default: what its backend serves; ``("embeddings",)`` makes an ``openai:`` offer an
        embeddings one).

        Raises:
            ValueError, TypeError: a missing or invalid field.
            InvalidRequest: the backend names something that cannot serve (no folder, no key, not a model).
            BackendError: the backend's upstream server cannot be reached or fails.
        """
        return await self.service.add_offer({"model": model, "backend": backend, "input_price": input_price,
                                             "output_price": output_price, "features": tuple(features), **limits})

    async def run(self, model: str, prompt: str | list[dict[str, Any]], *, max_tokens: int = 256,
                  temperature: float = 1.0, sort: str = "cheapest", provider: str | None = None,
                  budget: int | None = None, escrow: str | None = None, tools: list[dict[str, Any]] | None = None,
                  tool_choice: str | dict[str, Any] | None = None, response_format: dict[str, Any] | None = None,
                  seed: int | None = None, logprobs: bool = False, top_logprobs: int = 0,
                  user: str = "") -> dict[str, Any]:
        """One paid completion (with failover); the same document as ``node run --json``.

        ``prompt`` is a string (one user turn) or OpenAI-shaped messages (assistant turns with
        ``tool_calls``, ``tool`` turns with ``tool_call_id``); ``tools``, ``tool_choice``,
        ``response_format``, ``seed``, ``logprobs``/``top_logprobs`` and ``user`` are OpenAI's, and
        route the call only to offers listing what they need. The answer's
        ``choices[0].message`` carries ``tool_calls`` (OpenAI's shape) when the model made any,
        its ``finish_reason`` is then ``tool_calls``.

        Raises:
            UnsupportedFeature: no offer of ``model`` lists a feature the call needs.
            RentError, AtCapacity, EscrowRefused, EscrowUnreachable, InvalidRequest: as ``Renter.run``.
        """
        prefs = Preferences(sort=sort, only=(provider,) if provider else ())
        done = await self.service.renter.run(model, _messages(prompt), max_tokens=max_tokens,
                                             temperature_milli=int(round(temperature * 1000)), prefs=prefs,
                                             budget=budget, escrow=escrow,
                                             options=_options(tools, tool_choice, response_format, seed, logprobs,
                                                              top_logprobs, user))
        return done.to_json()

    async def embed(self, model: str, inputs: str | list[str], *, dimensions: int = 0, sort: str = "cheapest",
                    provider: str | None = None, budget: int | None = None, escrow: str | None = None,
                    encoding_format: str = "float") -> dict[str, Any]:
        """Embed ``inputs`` with ``model`` (an offer listing ``embeddings``): OpenAI's embeddings
        document (``data[i].embedding``, ``usage``) plus ``provider``, ``cost`` (µc),
        ``receipt_id`` and ``receipt_ids`` (one doubly-signed receipt per call of at most
        ``protocol.MAX_EMBED_INPUTS`` inputs).

        Raises:
            UnsupportedFeature: ``model`` is offered only for chat.
            RentError, AtCapacity, EscrowRefused, EscrowUnreachable, InvalidRequest: as ``Renter.embed``.
        """
        prefs = Preferences(sort=sort, only=(provider,) if provider else ())
        done = await self.service.renter.embed(model, [inputs] if isinstance(inputs, str) else list(inputs),
                                               dimensions=dimensions, prefs=prefs, budget=budget, escrow=escrow)
        return done.to_json(encoding_format)

    @asynccontextmanager
    async def session(self, model: str, *, budget: int, sort: str = "cheapest", provider: str | None = None,
                      escrow: str | None = None, tier: str = "", batch_calls: int = 0) -> AsyncIterator[SwarmSession]:
        """A multi-call session whose channel locks ``budget`` µc; settled (the rest refunded) at the end.
        ``tier`` chooses a provider's service tier; ``batch_calls`` declares calls for a batch discount."""
        prefs = Preferences(sort=sort, only=(provider,) if provider else ())
        opened = await self.service.sessions.open(model, budget=budget, prefs=prefs, escrow=escrow, tier=tier,
                                                  batch_calls=batch_calls)
        try:
            yield SwarmSession(self, opened)
        finally:
            with trio.CancelScope(shield=True):
                await self.service.sessions.close(opened.session_id)

    async def balance(self, escrow: str | None = None) -> dict[str, Any]:
        return (await self.service.escrow.balance(escrow)).to_json()

    async def mint(self, to: str, amount: int, escrow: str | None = None) -> dict[str, Any]:
        """Credit ``to`` (only an agent's operator may: a devnet rail)."""
        return (await self.service.escrow.mint(escrow, to, amount)).to_json()


@asynccontextmanager
async def open_swarm(
    home: str | Path | None = None,
    *,
    passphrase: str | None = None,
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",),
    bootstrap: tuple[str, ...] | list[str] = (),
    escrow: bool = False,
    accept_escrow: tuple[str, ...] = (),
    mdns: bool = False,
) -> AsyncIterator[Swarm]:
    """Run a node from its home (created if new) for the duration of the block.

    Args:
        home: the node home (default: $INFERSWARM_HOME, else the user data dir).
        passphrase: the keystore's (default: $INFERSWARM_PASSPHRASE, else a terminal prompt).
        listen, bootstrap: libp2p addresses. escrow: also run the escrow agent role.
        accept_escrow: escrow agents this node's offers accept (besides itself when ``escrow``).
        mdns: find and join peers on the local network without bootstrap addresses.
    """
    h = Home(resolve_home(home))
    secret = passphrase or wallet.resolve_passphrase()
    keystore = (wallet.Keystore.open(h.keystore, secret) if h.is_initialised() else init_home(h.path, secret))
    config = resolve_config(h, tuple(listen), tuple(bootstrap), None, tuple(accept_escrow))
    try:
        async with open_node(h, keystore.identity, dataclasses.replace(config), escrow=escrow,
                             api_key=keystore.api_key, mdns=mdns) as service:
            yield Swarm(service)
    except BaseExceptionGroup as group:  # the node's nurseries wrap what the block raised, ten deep
        leaf = _sole_leaf(group)
        if leaf is None:
            raise
        raise leaf from None  # the caller's own error (a RentError, a ValueError), as itself


def _sole_leaf(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception inside nested single-member groups, or None when there are several."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        if len(leaf.exceptions) != 1:
            return None
        leaf = leaf.exceptions[0]
    return leaf
