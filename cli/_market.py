"""``node start``, ``node status``, ``node offer …``, ``node providers``."""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any

import click
import httpx
import trio

import protocol
import wallet
from node import ConfigError, Home, resolve_home

from ._common import (
    DaemonClient,
    amount,
    credits,
    credits_option,
    duration,
    emit_json,
    fail_on,
    home_option,
    json_option,
    print_rows,
    set_verbose,
    show_id,
    when,
)


@click.command()
@home_option
@click.option("--listen", multiple=True, metavar="MADDR", help="libp2p listen address (repeatable)")
@click.option("--bootstrap", multiple=True, metavar="MADDR", help="peer to join through, …/p2p/<id> (repeatable)")
@click.option("--api", metavar="HOST:PORT", help="local API address (loopback)")
@click.option("--accept-escrow", multiple=True, metavar="PEER", help="escrow agent this node's offers accept")
@click.option("--escrow", is_flag=True, help="also run the escrow agent role (ledger in HOME/escrow.db)")
@click.option("--announce", multiple=True, metavar="MADDR",
              help="address peers can dial this node at, published first (a forwarded port; repeatable)")
@click.option("--relay", is_flag=True, help="also relay connections to peers behind NAT (a public node)")
@click.option("--openai-keyless", is_flag=True, help="serve /v1/* without the bearer token (loopback only)")
@click.option("--mdns", is_flag=True, help="find and join peers on the local network (mDNS)")
@click.option("--chain", metavar="SPEC", help="the chain to take payments on: evm:embedded, or evm:URL#ESCROW")
@click.option("--x402", is_flag=True, help="let callers without the token pay each chat completion with x402 "
                                           "(needs --chain or --devnet)")
@click.option("--devnet", is_flag=True, help="also serve a development chain (JSON-RPC on loopback) and settle on it")
@click.option("-v", "--verbose", is_flag=True, callback=set_verbose,
              help="log progress (libp2p's too) to stderr; a failure prints its traceback")
def start(home: str | None, listen: tuple[str, ...], bootstrap: tuple[str, ...], api: str | None,
          accept_escrow: tuple[str, ...], escrow: bool, announce: tuple[str, ...], relay: bool, openai_keyless: bool,
          mdns: bool, chain: str | None, x402: bool, devnet: bool, verbose: bool) -> None:
    """Run the node in the foreground until SIGINT/SIGTERM (then exit 0)."""
    from node.daemon import run_daemon

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        quiet_libp2p()
    h = Home(resolve_home(home))
    keystore = wallet.Keystore.open(h.keystore, wallet.resolve_passphrase())

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(
                    lambda task_status: run_daemon(h, keystore.identity, listen=listen or None, bootstrap=bootstrap,
                                                   api=api, accept_escrow=accept_escrow, escrow=escrow,
                                                   announce=announce, relay=relay, api_key=keystore.api_key, openai_keyless=openai_keyless, mdns=mdns,
                                                   chain=chain, x402=x402, devnet=devnet, task_status=task_status)
                )
                click.echo(f"node {info['peer_id']} ready; API {info['api_url']} "
                           f"(OpenAI-compatible: {info['api_url']}/v1)", err=True)
                if info.get("chain"):
                    click.echo(f"  settling on {info['chain']}", err=True)
                if info.get("x402"):
                    click.echo(f"  x402: chat completions without the token are paid on {info['x402']}", err=True)
                for addr in info["addrs"]:
                    click.echo(f"  reachable at {addr}", err=True)
                async for _ in signals:
                    click.echo("stopping…", err=True)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)  # a failure, however deep in the node's nurseries, is one line at the CLI's edge (main.py)


def quiet_libp2p() -> None:
    """Keep libp2p's own log lines (its warnings about peers that go away, dials that fail, the
    auto-connector's chatter) out of the daemon's log: what matters of them the node says itself.
    A filter on the log's handlers, so that no later ``setLevel`` (``_libp2p_fixes.apply``) lets
    them back in."""

    def not_libp2p(record: logging.LogRecord) -> bool:
        return not record.name.startswith(("libp2p", "multiaddr", "async_service"))

    for handler in logging.getLogger().handlers:
        handler.addFilter(not_libp2p)


@click.command()
@home_option
@json_option
def status(home: str | None, as_json: bool) -> None:
    """Show the running node: identity, addresses, peers, market, capabilities."""
    doc = DaemonClient(home).request("GET", "/api/v1/status")
    if as_json:
        emit_json(doc)
        return
    caps = doc["capabilities"]
    gpus = ", ".join(f"{g['name']} ({g['memory_total_mb']} MiB)" for g in caps["gpus"]) or "none"
    click.echo(f"peer id:         {doc['peer_id']}")
    click.echo(f"api:             {doc['api_url']}")
    reach = doc.get("reach") or {}
    click.echo(f"reachability:    {_reach_line(reach)}")
    for addr in doc["addrs"]:
        click.echo(f"address:         {addr}")
    click.echo(f"connected peers: {doc['connected_peers']}")
    click.echo(f"listings known:  {doc['listings_known']}")
    click.echo(f"offers:          {doc['offers']}"
               + ("" if doc.get("available", True) else " (not serving now: outside [schedule] hours or maintenance)"))
    for model, why in (doc.get("unhealthy") or {}).items():
        click.echo(f"unhealthy:       {model}: {why}")
    if doc.get("escrow_agent"):
        click.echo("escrow agent:    yes (this node runs one; its id is the peer id above)")
    click.echo(f"uptime:          {duration(doc['uptime_s'])}")
    click.echo(f"hardware:        {caps['cpu_count']} CPUs, {caps['ram_mb']} MiB RAM, GPUs: {gpus}")


def _reach_line(reach: dict) -> str:
    """How peers reach this node, in words (``Node.reach``)."""
    verdict = reach.get("reachability", "unknown")
    how = reach.get("how", "none")
    relays = len(reach.get("relays_held") or [])
    if how == "direct":
        text = "public: peers dial this node directly"
    elif how == "relay":
        text = f"{verdict}: peers reach this node through {relays or 'a'} relay{'s' if relays > 1 else ''}"
    elif verdict == "private":
        text = "private (behind NAT) and no relay reservation yet: only peers it dials can reach it"
    else:
        text = "unknown yet (asking peers to dial back)"
    role = reach.get("relay_role")
    if role is not None:
        text += f"; relaying for others ({role['reservations']} reservations, {role['circuits']} circuits)"
    return text


@click.group()
def offer() -> None:
    """Manage the models this node sells (persisted in the config, republished at once)."""


@offer.command("add")
@home_option
@json_option
@click.option("--model", required=True, help="model name consumers ask for")
@click.option("--backend", required=True, metavar="SPEC",
              help="builtin | transformers:PATH | openai:BASE_URL[#KEYNAME] | llamacpp:PATH | embeddings:builtin | "
                   "embeddings:PATH")
@click.option("--input-price", required=True, callback=credits_option, metavar="CREDITS", help="credits per 1K prompt tokens, e.g. 0.50")
@click.option("--output-price", required=True, callback=credits_option, metavar="CREDITS",
              help="credits per 1K completion tokens (0 for an embeddings model)")
@click.option("--max-context", type=click.IntRange(1), default=4096, show_default=True)
@click.option("--min-charge", callback=credits_option, default="0", metavar="CREDITS", help="least a call costs")
@click.option("--rate-limit", type=click.IntRange(0), default=0, metavar="RPM", help="requests/min per consumer (0: none)")
@click.option("--max-concurrent", type=click.IntRange(1), default=4, show_default=True, help="sessions at once")
@click.option("--tier", "tiers", multiple=True, metavar="NAME:IN:OUT:SESSIONS[:PRIORITY]",
              help="a service tier, prices in credits per 1K, e.g. premium:0.9:2.7:2:3 (repeatable)")
@click.option("--batch", metavar="CALLS:PERCENT", help="batch discount, e.g. 100:20 (20% off for 100+ calls)")
@click.option("--features", metavar="NAMES",
              help=f"what the model serves, comma-separated ({', '.join(protocol.FEATURES)}); default: what its "
                   "backend serves (an openai: upstream: all but embeddings; declare embeddings for an embedding model)")
def offer_add(home: str | None, as_json: bool, model: str, backend: str, input_price: int, output_price: int,
              max_context: int, min_charge: int, rate_limit: int, max_concurrent: int, tiers: tuple[str, ...],
              batch: str | None, features: str | None) -> None:
    """Sell a model (replaces an existing offer for the same model)."""
    try:
        parsed_tiers = [_tier(t) for t in tiers]
        batch_calls, percent = (int(x) for x in batch.split(":")) if batch else (0, 0)
        declared = _features(features or "")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    click.echo(f"loading and benchmarking {model} ({backend})…", err=True)
    body: dict[str, Any] = {
        "model": model, "backend": backend, "input_price": input_price, "output_price": output_price,
        "max_context": max_context, "min_charge": min_charge, "rate_limit": rate_limit, "max_concurrent": max_concurrent,
        "tiers": parsed_tiers, "batch_min_calls": batch_calls, "batch_discount_permille": percent * 10,
    }
    if declared:
        body["features"] = declared
    doc = DaemonClient(home).request("POST", "/api/v1/offers", timeout=httpx.Timeout(60, read=900), json=body)
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"offering {doc['model']} (loaded and benchmarked) at {amount(doc['input_price'])} / "
                   f"{amount(doc['output_price'])} credits per 1K tokens (in/out)")


def _features(text: str) -> list[str]:
    """``tools,json`` as feature names (the daemon's offer checks how they combine)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in protocol.FEATURES:
            raise ValueError(f"feature {name!r} is not one of: {', '.join(protocol.FEATURES)}")
    return names


def _tier(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (4, 5):
        raise ValueError(f"tier {text!r} is not NAME:IN:OUT:SESSIONS[:PRIORITY]")
    return {"name": parts[0], "input_price": protocol.parse_credits(parts[1]),
            "output_price": protocol.parse_credits(parts[2]), "max_concurrent": int(parts[3]),
            "priority": int(parts[4]) if len(parts) == 5 else 1}


@offer.command("ls")
@home_option
@json_option
def offer_ls(home: str | None, as_json: bool) -> None:
    """List this node's offers."""
    doc = DaemonClient(home).request("GET", "/api/v1/offers")
    if as_json:
        emit_json(doc)
        return
    if not doc:
        click.echo("no offers (add one with `node offer add`)", err=True)
        return
    print_rows(("model", "backend", "in/1K", "out/1K", "context", "min charge", "rpm", "sessions"),
               [(o["model"], o["backend"], amount(o["input_price"]), amount(o["output_price"]), str(o["max_context"]),
                 amount(o["min_charge"]), str(o["rate_limit"] or "-"), str(o["max_concurrent"])) for o in doc])
    click.echo("prices in credits per 1K tokens", err=True)


@offer.command("rm")
@home_option
@click.option("--model", required=True)
def offer_rm(home: str | None, model: str) -> None:
    """Stop selling a model."""
    DaemonClient(home).request("DELETE", f"/api/v1/offers/{model}")
    click.echo(f"removed {model}")


@click.command()
@home_option
@json_option
@click.option("--model", help="only this model (also asks the DHT)")
@click.option("--sort", type=click.Choice(["cheapest", "fastest", "best_trust"]), default="cheapest", show_default=True)
def providers(home: str | None, as_json: bool, model: str | None, sort: str) -> None:
    """List the providers this node knows of on the market."""
    params = {"sort": sort, **({"model": model} if model else {})}
    rows = DaemonClient(home).request("GET", "/api/v1/providers", params=params)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no providers known" + (f" for {model}" if model else ""), err=True)
        return
    now = time.time()
    print_rows(("provider", "model", "in/1K", "out/1K", "context", "trust", "network", "latency", "GPUs",
                "listing expires"),
               [(show_id(r["peer_id"]), r["model"], amount(r["input_price"]), amount(r["output_price"]),
                 str(r["max_context"]), _trust(r.get("local_trust", r["trust"])), _trust(r.get("network_trust")),
                 "-" if r["latency_ms"] is None else f"{r['latency_ms']} ms",
                 ", ".join(g["name"] for g in r["gpus"]) or "-", when(r["expires_at"], now)) for r in rows])
    click.echo("prices in credits per 1K tokens", err=True)


def _trust(score: float | None) -> str:
    return "-" if score is None else str(score)


COMMANDS = [start, status, offer, providers]


@click.command()
@click.option("--home", "home", type=click.Path(file_okay=False), default=".demo", show_default=True,
              help="folder for the demo nodes' homes (kept between runs)")
@click.option("--providers", type=click.IntRange(1, 5), default=3, show_default=True)
@click.option("--once", is_flag=True, help="exit after the summary instead of serving the OpenAI API")
@fail_on(wallet.WalletError, ConfigError, OSError)
def demo(home: str, providers: int, once: bool) -> None:
    """A local market on loopback: escrow agent, providers, consumer, a paid chat, receipts, balances."""
    from pathlib import Path

    from node.daemon import run_demo

    logging.basicConfig(level=logging.ERROR)
    quiet_libp2p()

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def body() -> None:
                    await run_demo(Path(home), providers=providers, once=once)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(body)
                async for _ in signals:
                    click.echo("stopping…", err=True)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


COMMANDS.append(demo)


@click.command()
@home_option
@json_option
@click.option("--period", default="30d", show_default=True, help="how far back: 90m, 12h, 30d…")
@click.option("--by", type=click.Choice(["model", "client", "hour"]), default="model", show_default=True)
def earnings(home: str | None, as_json: bool, period: str, by: str) -> None:
    """What this node earned serving; what escrow agents confirmed paying; what is still pending."""
    doc = DaemonClient(home).request("GET", "/api/v1/earnings", params={"period": period, "by": by})
    if as_json:
        emit_json(doc)
        return
    click.echo(f"last {doc['period']}: earned {credits(doc['total'])}; "
               f"paid by escrow {credits(doc['claimed'])}"
               + (f", forfeited {credits(doc['forfeited'])}" if doc.get("forfeited") else "")
               + f"; pending now {credits(doc['pending'])}")
    if doc["by"]:
        print_rows((by, "earned (credits)"), [(show_id(key) if by == "client" else key, amount(micro))
                                              for key, micro in doc["by"].items()])


@click.command()
@home_option
@json_option
def stats(home: str | None, as_json: bool) -> None:
    """This node's totals as a provider, and the network it sees."""
    doc = DaemonClient(home).request("GET", "/api/v1/stats")
    if as_json:
        emit_json(doc)
        return
    n = doc["node"]
    click.echo(f"requests {n['requests']} · tokens served {n['tokens_served']} · earned "
               f"{credits(n['earnings'])} · avg latency {n['avg_latency_ms']} ms · "
               f"listed {n['uptime_score'] * 100:.1f}% of the time")
    models = doc["network"]["models"]
    if models:
        print_rows(("model", "providers", "input /1K", "output /1K"),
                   [(name, str(m["providers"]), f"{amount(m['min_input_price'])}–{amount(m['max_input_price'])}",
                     f"{amount(m['min_output_price'])}–{amount(m['max_output_price'])}") for name, m in models.items()])
        click.echo("prices in credits per 1K tokens", err=True)


COMMANDS += [earnings, stats]
