"""``node run``, ``node chat``, ``node receipts``, ``node key``: renting and its records."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click

import wallet
from node import Home, resolve_home

from ._common import (
    CliError,
    DaemonClient,
    amount,
    credits,
    credits_option,
    emit_json,
    fail_on,
    home_option,
    in_credits,
    json_option,
    local_time,
    print_rows,
    show_id,
)
from ._escrow import resolve_channel

_CHANNEL_HELP = ("pay from this open channel of yours (`node escrow open`; its id or a unique prefix; name its agent "
                 "with --escrow): the call goes to its provider and the channel stays open")


def _temperature(_ctx: Any, _param: Any, value: str | None) -> int:
    """Temperature as integer thousandths (the wire carries no floats), parsed exactly."""
    try:
        whole, _, frac = (value or "1").strip().partition(".")
        milli = int(whole or "0") * 1000 + int((frac + "000")[:3] or "0")
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a temperature such as 0.7") from exc
    if not 0 <= milli <= 2000 or len(frac) > 3:
        raise click.BadParameter("temperature is 0 to 2 with at most 3 decimals")
    return milli


class _Cancelled(Exception):
    """The call was cancelled (Ctrl-C); ``doc`` is what it cost (None: no provider was called)."""

    def __init__(self, doc: dict[str, Any] | None) -> None:
        super().__init__("cancelled")
        self.doc = doc


def _stream_call(client: DaemonClient, path: str, payload: dict[str, Any], echo_text: bool = True) -> dict[str, Any]:
    """POST a streaming call; print text as it arrives; return the final result document.

    Ctrl-C cancels the call at the node (``POST /api/v1/calls/{id}/cancel``: the provider stops and
    is paid for what was delivered) and reads on to the stream's last line, what the cancelled call
    cost; a second Ctrl-C quits at once. A handler, not ``KeyboardInterrupt`` caught around the
    read: an exception raised through httpx's line iterator leaves the stream unreadable.

    Raises:
        _Cancelled: the call was cancelled (with its cost document).
    """
    result, call_id, asked = None, None, False
    cancelled: list[Any] = []

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal asked
        if call_id is None or asked:
            raise KeyboardInterrupt  # no call to cancel yet, or a second Ctrl-C: quit now
        asked = True
        try:
            client.request("POST", f"/api/v1/calls/{call_id}/cancel")
        except CliError:
            pass  # it ended meanwhile: its result line comes

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with client.stream("POST", path, json=payload) as response:
            if response.status_code >= 400:
                response.read()
                raise CliError(in_credits(response.json().get("error", {}).get("message",
                                                                             f"HTTP {response.status_code}")))
            for line in response.iter_lines():
                if not line:
                    continue
                doc = json.loads(line)
                if "call" in doc:
                    call_id = doc["call"]["id"]
                elif "delta" in doc:
                    if echo_text:
                        sys.stdout.write(doc["delta"])
                        sys.stdout.flush()
                elif "error" in doc:
                    raise CliError(in_credits(doc["error"]["message"]))
                elif "result" in doc:
                    result = doc["result"]
                elif "cancelled" in doc:
                    cancelled.append(doc["cancelled"])
    except (OSError, ValueError) as exc:
        raise CliError(f"the node's answer broke off: {exc}") from exc
    finally:
        signal.signal(signal.SIGINT, previous)
    if cancelled:
        raise _Cancelled(cancelled[0])
    if result is None:
        raise CliError("the node ended the stream without a result")
    return result


def _cancelled_line(doc: dict[str, Any] | None) -> str:
    """What a cancelled call cost, for people: "[cancelled · 12+40 tokens · 0.000090 credits · receipt 0f85…]"."""
    if doc is None:
        return "[cancelled before any provider was called: nothing was paid]"
    if doc["cost"]["receipt_id"] is None:
        return f"[cancelled: nothing was paid ({doc['outcome']})]"
    usage = doc["usage"]
    return (f"[cancelled · {usage['prompt_tokens']}+{usage['completion_tokens']} tokens · "
            f"{credits(doc['cost']['amount'])} · receipt {doc['cost']['receipt_id']}]")


@click.command()
@home_option
@json_option
@click.option("--model", required=True)
@click.option("--strategy", type=click.Choice(["cheapest", "fastest", "best_trust"]), default="cheapest",
              show_default=True, help="how to rank providers (failover follows the same order)")
@click.option("--provider", metavar="PEER", help="rent from this provider only")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temperature", callback=_temperature, default="1.0", show_default=True)
@click.option("--budget", callback=credits_option, metavar="CREDITS", help="most this call may cost (default: its worst case)")
@click.option("--escrow", metavar="PEER", help="escrow agent to pay through")
@click.option("--stream", is_flag=True, help="print the completion as it arrives")
@click.option("--tier", type=click.Choice(["basic", "premium", "enterprise"]), help="a provider service tier")
@click.option("--channel", metavar="ID", help=_CHANNEL_HELP)
@click.argument("prompt")
def run(home: str | None, as_json: bool, model: str, strategy: str, provider: str | None, max_tokens: int,
        temperature: int, budget: int | None, escrow: str | None, stream: bool, tier: str | None,
        channel: str | None, prompt: str) -> None:
    """One paid completion: open a channel (or use --channel), run one call, settle, print the result."""
    client = DaemonClient(home)
    channel = resolve_channel(client, escrow, channel) if channel else None
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature_milli": temperature,
               "provider": provider, "budget": budget, "escrow": escrow, "stream": stream, "sort": strategy,
               "tier": tier or "", "channel": channel}
    payload["stream"] = True  # streamed either way, so that Ctrl-C can cancel the call, not only the display
    try:
        doc = _stream_call(client, "/api/v1/run", payload, echo_text=stream and not as_json)
    except _Cancelled as cancelled:
        if as_json:
            emit_json({"cancelled": cancelled.doc})
        else:
            if stream:
                click.echo()
            click.echo(_cancelled_line(cancelled.doc), err=True)
        raise SystemExit(130) from None  # interrupted, as a shell expects
    if stream and not as_json:
        click.echo()
    if as_json:
        emit_json(doc)
        return
    if not stream:
        click.echo(doc["choices"][0]["message"]["content"])
    usage, cost = doc["usage"], doc["cost"]
    click.echo(f"[{usage['prompt_tokens']}+{usage['completion_tokens']} tokens · {credits(cost['amount'])} · "
               f"{doc['latency_ms']} ms]", err=True)
    click.echo(f"[provider {show_id(doc['provider'])}]", err=True)
    click.echo(f"[receipt {show_id(cost['receipt_id'])}]", err=True)


@click.command()
@home_option
@json_option
@click.argument("session", required=False)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="receipts per page")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="skip this many newest first")
@click.option("--export", "export", metavar="RECEIPT",
              help="print one receipt (its id, a unique prefix of it, or `latest`) as the hex that "
                   "`node escrow claim --receipt` and `node escrow close --receipt` read")
def receipts(home: str | None, as_json: bool, session: str | None, limit: int, offset: int,
             export: str | None) -> None:
    """The receipts this node keeps, newest first, with both signatures and chain links (one page).

    With --export RECEIPT, that one receipt as hex on stdout: node receipts --export latest > receipt.hex
    """
    client = DaemonClient(home)
    if export is not None:
        one = client.request("GET", f"/api/v1/receipts/{export}")
        if as_json:
            emit_json(one)
            return
        click.echo(one["encoded"])
        click.echo(f"receipt {show_id(one['receipt_id'])}: call #{one['call_seq']} of session "
                   f"{show_id(one['session_id'])}, {credits(one['cumulative'])} in all, channel "
                   f"{show_id(one['channel_id'])}", err=True)
        return
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if session:
        params["session"] = session
    doc = client.request("GET", "/api/v1/receipts", params=params)
    if as_json:
        emit_json(doc)
        return
    rows = doc["receipts"]
    if not rows:
        click.echo(f"no receipts{' at this offset' if doc['total'] else ''} ({doc['total']} in all)", err=True)
        return
    # whole ids (to paste into --export, --session, --channel); the chain links and signatures: --json
    print_rows(("receipt", "call", "role", "model", "tokens", "cost", "session total", "settled", "issued",
                "session", "channel"),
               [(show_id(r["receipt_id"]), f"#{r['call_seq']}", r["role"], r["model"],
                 f"{r['tokens_in']}+{r['tokens_out']}", amount(r["cost"]), amount(r["cumulative"]),
                 "paid" if r["claimed"] else "forfeited" if r.get("forfeited") else "pending",
                 local_time(r["issued_at"]), show_id(r["session_id"]), show_id(r["channel_id"])) for r in rows])
    shown = f"{offset + 1}–{offset + len(rows)} of {doc['total']}"
    click.echo(f"receipts {shown}; more with --offset {offset + len(rows)}" if doc["has_more"] else f"receipts {shown}",
               err=True)


@click.group()
def key() -> None:
    """Upstream API keys kept encrypted in the keystore (for openai: backends)."""


@key.command("add")
@home_option
@click.argument("name")
@fail_on(wallet.WalletError, ValueError)
def key_add(home: str | None, name: str) -> None:
    """Store an API key under NAME (value from $INFERSWARM_API_KEY, else a hidden prompt)."""
    value = os.environ.get("INFERSWARM_API_KEY") or (click.prompt("API key", hide_input=True) if sys.stdin.isatty()
                                                     else None)
    if not value:
        raise CliError("set INFERSWARM_API_KEY or run on a terminal to enter the key")
    ks = wallet.Keystore.open(Home(resolve_home(home)).keystore, wallet.resolve_passphrase())
    ks.set_api_key(name, value)
    click.echo(f"stored API key {name!r} (restart the node to use it)")


@key.command("ls")
@home_option
@fail_on(wallet.WalletError)
def key_ls(home: str | None) -> None:
    """Names of the stored API keys (never their values)."""
    ks = wallet.Keystore.open(Home(resolve_home(home)).keystore, wallet.resolve_passphrase())
    for name in ks.api_key_names():
        click.echo(name)


COMMANDS = [run, receipts, key]


@click.command()
@home_option
@click.option("--model", required=True)
@click.option("--provider", metavar="PEER", help="rent from this provider only")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True, help="per turn")
@click.option("--temperature", callback=_temperature, default="1.0", show_default=True)
@click.option("--budget", callback=credits_option, default="1", show_default=True, metavar="CREDITS",
              help="what the session's channel locks (the unspent rest comes back at the end)")
@click.option("--escrow", metavar="PEER", help="escrow agent to pay through")
@click.option("--tier", type=click.Choice(["basic", "premium", "enterprise"]), help="a provider service tier")
@click.option("--batch-calls", type=click.IntRange(0), default=0, help="calls you will make (batch discounts)")
@click.option("--channel", metavar="ID", help=_CHANNEL_HELP.replace("the call goes", "the session goes")
              + " (--budget caps what this session spends of it)")
def chat(home: str | None, model: str, provider: str | None, max_tokens: int, temperature: int, budget: int,
         escrow: str | None, tier: str | None, batch_calls: int, channel: str | None) -> None:
    """Interactive chat: one escrow channel for the session (or --channel), one receipt per turn, streamed replies.

    Type a message and Enter; an empty line, "exit" or end of input ends the session."""
    client = DaemonClient(home)
    channel = resolve_channel(client, escrow, channel) if channel else None
    opened = client.request("POST", "/api/v1/sessions", json={"model": model, "provider": provider, "escrow": escrow,
                                                               "budget": budget, "tier": tier or "",
                                                               "batch_calls": batch_calls, "channel": channel})
    sid = opened["session_id"]
    interactive = sys.stdin.isatty()
    paying = (f"from channel {show_id(opened['channel_id'])} (up to {credits(budget)} of it)" if channel
              else f"budget {credits(opened['cap'])}")
    click.echo(f"session {show_id(sid)} with {show_id(opened['provider'])} ({model}); {paying}", err=True)
    history: list[dict[str, str]] = []
    try:
        while True:
            if interactive:
                click.echo("you> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("", "exit", "quit"):
                break
            history.append({"role": "user", "content": line.rstrip("\n")})
            payload = {"messages": history, "max_tokens": max_tokens, "temperature_milli": temperature, "stream": True}
            try:
                doc = _stream_call(client, f"/api/v1/sessions/{sid}/calls", payload)
            except _Cancelled as cancelled:  # Ctrl-C stops this reply, not the chat
                click.echo()
                click.echo(_cancelled_line(cancelled.doc), err=True)
                history.pop()  # the unanswered turn
                continue
            click.echo()
            history.append({"role": "assistant", "content": doc["choices"][0]["message"]["content"]})
            click.echo(f"[{doc['usage']['prompt_tokens']}+{doc['usage']['completion_tokens']} tokens · "
                       f"{credits(doc['cost']['amount'])} · session {credits(doc['cost']['cumulative'])}]", err=True)
    finally:
        closed = client.request("DELETE", f"/api/v1/sessions/{sid}")
        click.echo(f"session closed: {closed['calls']} turn{'' if closed['calls'] == 1 else 's'}, {credits(closed['cumulative'])}"
                   + (f"; channel {show_id(opened['channel_id'])} stays open" if channel else ""), err=True)


COMMANDS.append(chat)
