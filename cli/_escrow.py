"""``node wallet …`` and ``node escrow …``: talk to escrow agents through the running node;
``node escrow check`` alone works on the agent's ledger file itself, with the node stopped."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import click

import wallet as _wallet
from node import Home, resolve_home
from node.daemon import DaemonNotRunning, read_daemon_info

from ._common import (
    CliError,
    DaemonClient,
    credits,
    credits_option,
    emit_json,
    fail_on,
    home_option,
    json_option,
    local_time,
    print_rows,
    show_id,
    when,
)

_DURATION = re.compile(r"^(\d+)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(_ctx: Any, _param: Any, value: str | None) -> int | None:
    if value is None:
        return None
    m = _DURATION.match(value.strip())
    if not m or int(m.group(1)) == 0:
        raise click.BadParameter(f"{value!r} is not a duration such as 90s, 30m, 2h or 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _read_hex(path: str) -> str:
    """A message file: hex text (as `node` writes them) or the raw encoded bytes."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("ascii").strip()
        bytes.fromhex(text)
        return text
    except (UnicodeDecodeError, ValueError):
        return data.hex()


_CHANNEL_ID = re.compile(r"^[0-9a-f]{32}$")
_CHANNEL_PREFIX = re.compile(r"^[0-9a-f]{4,31}$")


def resolve_channel(client: DaemonClient, escrow: str | None, value: str) -> str:
    """A channel id given whole, or as a unique prefix (4 hex digits or more) of one of this
    node's channels at the agent (as consumer or provider).

    Raises:
        CliError: not hex, or no channel / more than one starts with it.
    """
    wanted = value.strip().lower()
    if _CHANNEL_ID.match(wanted):
        return wanted
    if not _CHANNEL_PREFIX.match(wanted):
        raise CliError(f"{value!r} is not a channel id: 32 hex digits, or a unique prefix of at least 4")
    doc = client.request("GET", "/api/v1/wallet/balance", params={"escrow": escrow} if escrow else {})
    hits = [c["channel_id"] for c in doc["channels"] if c["channel_id"].startswith(wanted)]
    if len(hits) != 1:
        raise CliError(f"{'no channel' if not hits else f'{len(hits)} channels'} of this node at "
                       f"{show_id(doc['escrow'])} start with {wanted}" + (": give more of its id" if hits else
                                                                          " (node escrow ls lists them)"))
    return hits[0]


escrow_option = click.option("--escrow", metavar="PEER", help="the escrow agent (peer id or /p2p/ address; "
                                                               "default: this node's own agent)")


def _show_channels(channels: list[dict[str, Any]]) -> None:
    if not channels:
        click.echo("no channels", err=True)
        return
    print_rows(("channel", "status", "cap", "claimed", "expires", "consumer", "provider"),
               [(show_id(c["channel_id"]), c["status"], credits(c["cap"]), credits(c["claimed"]), when(c["expires_at"]),
                 show_id(c["consumer"]), show_id(c["provider"])) for c in channels])


@click.group()
def wallet() -> None:
    """Balances held at escrow agents."""


@wallet.command("balance")
@home_option
@json_option
@escrow_option
def wallet_balance(home: str | None, as_json: bool, escrow: str | None) -> None:
    """This node's available and locked credits at an escrow agent, and its channels."""
    doc = DaemonClient(home).request("GET", "/api/v1/wallet/balance", params={"escrow": escrow} if escrow else {})
    if as_json:
        emit_json(doc)
        return
    click.echo(f"escrow:    {show_id(doc['escrow'])}")
    click.echo(f"available: {credits(doc['available'])}")
    click.echo(f"locked:    {credits(doc['locked'])}")
    _show_channels(doc["channels"])


@wallet.command("withdraw")
@home_option
@json_option
@escrow_option
@click.option("--amount", required=True, callback=credits_option, metavar="CREDITS")
def wallet_withdraw(home: str | None, as_json: bool, escrow: str | None, amount: int) -> None:
    """Take credits out of the escrow system."""
    doc = DaemonClient(home).request("POST", "/api/v1/wallet/withdraw", json={"escrow": escrow, "amount": amount})
    emit_json(doc) if as_json else click.echo(f"withdrew {credits(doc['withdrawn'])}; "
                                              f"{credits(doc['available'])} left at {show_id(doc['escrow'])}")


@click.group()
def escrow() -> None:
    """Escrow channels and budgets (docs/DESIGN.md, "Escrow")."""


def _emit(doc: Any, as_json: bool, line: str) -> None:
    emit_json(doc) if as_json else click.echo(line)


@escrow.command("mint")
@home_option
@json_option
@escrow_option
@click.option("--to", "to", required=True, metavar="PEER")
@click.option("--amount", required=True, callback=credits_option, metavar="CREDITS")
def escrow_mint(home: str | None, as_json: bool, escrow: str | None, to: str, amount: int) -> None:
    """Credit PEER at the agent (the agent's operator only; a devnet rail)."""
    doc = DaemonClient(home).request("POST", "/api/v1/escrow/mint", json={"escrow": escrow, "to": to, "amount": amount})
    _emit(doc, as_json, f"minted {credits(doc['minted'])} to {show_id(to)} at {show_id(doc['escrow'])}")


@escrow.command("open")
@home_option
@json_option
@escrow_option
@click.option("--provider", required=True, metavar="PEER")
@click.option("--amount", required=True, callback=credits_option, metavar="CREDITS", help="the channel's cap")
@click.option("--expires", required=True, callback=_duration, metavar="DURATION", help="e.g. 1h, 7d")
@click.option("--budget", metavar="ID", help="draw on a budget this node is whitelisted for")
@click.option("-q", "--quiet", is_flag=True, help="print only the channel id (CH=$(node escrow open … -q))")
def escrow_open(home: str | None, as_json: bool, escrow: str | None, provider: str, amount: int, expires: int,
                budget: str | None, quiet: bool) -> None:
    """Lock credits in a channel to one provider (then: node run/chat --channel ID)."""
    doc = DaemonClient(home).request("POST", "/api/v1/escrow/open", json={
        "escrow": escrow, "provider": provider, "amount": amount, "expires_s": expires, "budget_id": budget})
    if quiet and not as_json:
        click.echo(doc["channel_id"])
    elif as_json:
        emit_json({"channel_id": doc["channel_id"], "cap": doc["cap"], "expires_at": doc["expires_at"]})
    else:
        click.echo(f"channel {show_id(doc['channel_id'])}: {credits(doc['cap'])} to {show_id(doc['provider'])}, "
                   f"until {when(doc['expires_at'])}")
        click.echo(f"use it: node run --channel {doc['channel_id']} --escrow {doc['escrow']} PROMPT", err=True)


@escrow.command("ls")
@home_option
@json_option
@escrow_option
def escrow_ls(home: str | None, as_json: bool, escrow: str | None) -> None:
    """This node's channels (as consumer or provider)."""
    doc = DaemonClient(home).request("GET", "/api/v1/wallet/balance", params={"escrow": escrow} if escrow else {})
    emit_json(doc["channels"]) if as_json else _show_channels(doc["channels"])


@escrow.command("accept")
@home_option
@json_option
@click.argument("agent", metavar="[PEER]", required=False)
@click.option("--remove", is_flag=True, help="stop accepting PEER (sessions already running keep their channels)")
def escrow_accept(home: str | None, as_json: bool, agent: str | None, remove: bool) -> None:
    """Accept escrow agent PEER for this node's offers, on the running node (kept in the config's
    [node] accept_escrow and republished at once); without PEER, list the accepted agents."""
    client = DaemonClient(home)
    if agent is None:
        if remove:
            raise CliError("name the agent to stop accepting: node escrow accept --remove PEER")
        doc = client.request("GET", "/api/v1/escrow/accepted")
    else:
        doc = client.request("POST", "/api/v1/escrow/accepted", json={"agent": agent, "remove": remove})
    if as_json:
        emit_json(doc)
        return
    if agent is not None:
        click.echo(f"{'no longer accepting' if remove else 'accepting'} escrow agent {show_id(agent)}; listing "
                   "republished", err=True)
    if doc["own_agent"]:
        click.echo(f"{show_id(doc['own_agent'])}  (this node's own agent)")
    for a in doc["accepted"]:
        click.echo(show_id(a))
    if not doc["accepted"] and not doc["own_agent"]:
        click.echo("no escrow agents accepted: consumers cannot pay this node (node escrow accept PEER)", err=True)


@escrow.command("claim")
@home_option
@json_option
@escrow_option
@click.option("--receipt", required=True, type=click.Path(exists=True, dir_okay=False),
              help="file with the doubly-signed receipt (hex)")
def escrow_claim(home: str | None, as_json: bool, escrow: str | None, receipt: str) -> None:
    """Be paid what a doubly-signed receipt proves (as the channel's provider)."""
    doc = DaemonClient(home).request("POST", "/api/v1/escrow/claim", json={"escrow": escrow, "receipt": _read_hex(receipt)})
    ch = doc["channel"]
    total = f"{credits(ch['claimed'])} of {credits(ch['cap'])} claimed on channel {show_id(ch['channel_id'])}"
    if doc.get("already_paid"):
        _emit(doc, as_json, f"nothing more to pay: this receipt's session was paid already (this node claims on "
                            f"its own); {total}")
    else:
        _emit(doc, as_json, f"paid {credits(doc['paid'])}; {total}")


@escrow.command("close")
@home_option
@json_option
@escrow_option
@click.option("--channel", required=True, metavar="ID", help="the channel (its id, or a unique prefix of it)")
@click.option("--receipt", type=click.Path(exists=True, dir_okay=False), help="final doubly-signed receipt (hex)")
@click.option("--sign-only", is_flag=True, help="print this party's signed half for the other party (valid 5 min)")
@click.option("--with", "partial", type=click.Path(exists=True, dir_okay=False),
              help="the other party's signed half: add ours and submit")
def escrow_close(home: str | None, as_json: bool, escrow: str | None, channel: str, receipt: str | None,
                 sign_only: bool, partial: str | None) -> None:
    """Cooperative close: settle the final receipt and refund the rest at once (both parties sign)."""
    client = DaemonClient(home)
    channel = resolve_channel(client, escrow, channel)
    doc = client.request("POST", "/api/v1/escrow/close", json={
        "escrow": escrow, "channel_id": channel, "receipt": _read_hex(receipt) if receipt else None,
        "partial": _read_hex(partial) if partial else None, "sign_only": sign_only})
    if sign_only:
        emit_json(doc) if as_json else click.echo(doc["partial"])
        if not as_json:
            click.echo(f"the other party completes it with --with FILE before {local_time(doc['valid_until'])}",
                       err=True)
    else:
        ch = doc["channel"]
        _emit(doc, as_json, f"closed channel {show_id(ch['channel_id'])}; paid {credits(doc['paid'])} "
                            f"({credits(ch['claimed'])} in all), refunded {credits(ch['cap'] - ch['claimed'])}")


@escrow.command("refund")
@home_option
@json_option
@escrow_option
@click.option("--channel", required=True, metavar="ID")
def escrow_refund(home: str | None, as_json: bool, escrow: str | None, channel: str) -> None:
    """Reclaim what an expired channel never paid out (as its consumer)."""
    client = DaemonClient(home)
    channel = resolve_channel(client, escrow, channel)
    doc = client.request("POST", "/api/v1/escrow/refund", json={"escrow": escrow, "channel_id": channel})
    _emit(doc, as_json, f"channel {show_id(channel)} {doc['channel']['status']}")


def _check_doc(report: _wallet.FileCheck, backups: list[_wallet.Backup]) -> dict[str, Any]:
    return {"ledger": str(report.path), "ok": report.ok, "integrity": list(report.integrity) or ["ok"],
            "invariant": report.invariant or ("ok" if report.totals is not None else None), "totals": report.totals,
            "backups": [{"path": str(b.path), "taken_at": b.taken_at} for b in backups]}


def _print_check(report: _wallet.FileCheck, backups: list[_wallet.Backup]) -> None:
    click.echo(f"ledger:        {report.path}")
    click.echo(f"integrity:     {'ok' if not report.integrity else 'DAMAGED: ' + '; '.join(report.integrity)}")
    if report.totals is not None:
        t = report.totals
        click.echo(f"invariant:     ok (minted {credits(t['minted'])}, withdrawn {credits(t['withdrawn'])}, "
                   f"available {credits(t['available'])}, locked {credits(t['locked'])})")
    elif report.invariant is not None:
        click.echo(f"invariant:     VIOLATED: {report.invariant}")
    if backups:
        click.echo(f"latest backup: {backups[-1].path} ({when(backups[-1].taken_at)}; {len(backups)} kept)")
    else:
        click.echo("latest backup: none")


@escrow.command("check")
@home_option
@json_option
@click.option("--restore", "backup", metavar="BACKUP",
              help="replace the ledger with this backup file (or `latest`); the old file is kept aside")
@fail_on(_wallet.WalletError, OSError)
def escrow_check(home: str | None, as_json: bool, backup: str | None) -> None:
    """Check the escrow agent's ledger file (HOME/escrow.db) with the node stopped; restore a backup.

    Exit status 1 when the ledger is damaged or its invariant does not hold.
    """
    h = Home(resolve_home(home))
    path = h.path / "escrow.db"
    try:
        info = read_daemon_info(h)
    except DaemonNotRunning:
        pass
    else:
        raise CliError(f"a node (pid {info['pid']}) is running on {h.path}: stop it first, then run this again")
    if backup is not None:
        kept = _wallet.list_ledger_backups(path)
        if backup == "latest":
            if not kept:
                raise CliError(f"no backups in {_wallet.ledger_backup_folder(path)}")
            chosen = kept[-1].path
        else:
            chosen = Path(backup)
        aside = _wallet.restore_ledger(path, chosen, int(time.time()))
        taken = next((b.taken_at for b in kept if b.path.resolve() == chosen.resolve()), None)
        click.echo(f"restored {path} from {chosen}" + (f" (taken {when(taken)})" if taken else ""), err=True)
        if aside != path:
            click.echo(f"the previous ledger is kept as {aside}", err=True)
        click.echo("operations the agent applied after that backup are not in it", err=True)
    if not path.is_file():
        raise CliError(f"no escrow ledger at {path} (a node runs one with `node start --escrow`)")
    with _wallet.hold_exclusive(path):
        report = _wallet.check_ledger_file(path, full=True)
    backups = _wallet.list_ledger_backups(path)
    if as_json:
        emit_json(_check_doc(report, backups))
    else:
        _print_check(report, backups)
    if not report.ok:
        hint = ("restore the latest backup: node escrow check --restore latest" if backups
                else "no backup to restore from")
        raise CliError(f"the escrow ledger is damaged; {hint} (the damaged file is kept aside)")


@escrow.group("budget")
def budget() -> None:
    """Funded budgets that whitelisted consumers open channels from."""


@budget.command("create")
@home_option
@json_option
@escrow_option
@click.option("--amount", required=True, callback=credits_option, metavar="CREDITS")
@click.option("--whitelist", required=True, multiple=True, metavar="PEER", help="consumer allowed to draw (repeatable)")
@click.option("--per-session", required=True, callback=credits_option, metavar="CREDITS", help="most one channel may hold")
@click.option("--expires", required=True, callback=_duration, metavar="DURATION")
def budget_create(home: str | None, as_json: bool, escrow: str | None, amount: int, whitelist: tuple[str, ...],
                  per_session: int, expires: int) -> None:
    """Fund a budget."""
    doc = DaemonClient(home).request("POST", "/api/v1/escrow/budgets", json={
        "escrow": escrow, "amount": amount, "whitelist": list(whitelist), "per_session_limit": per_session,
        "expires_s": expires})
    _emit(doc, as_json, f"budget {show_id(doc['budget_id'])}: {credits(doc['amount'])} until {when(doc['expires_at'])}")


@budget.command("ls")
@home_option
@json_option
@escrow_option
def budget_ls(home: str | None, as_json: bool, escrow: str | None) -> None:
    """Budgets this node funds or may draw on."""
    doc = DaemonClient(home).request("GET", "/api/v1/escrow/budgets", params={"escrow": escrow} if escrow else {})
    if as_json:
        emit_json(doc)
        return
    if not doc:
        click.echo("no budgets", err=True)
        return
    print_rows(("budget", "status", "amount", "remaining", "per session", "expires", "funder", "whitelist"),
               [(show_id(b["budget_id"]), b["status"], credits(b["amount"]), credits(b["remaining"]),
                 credits(b["per_session_limit"]), when(b["expires_at"]), show_id(b["funder"]),
                 ", ".join(map(show_id, b["whitelist"]))) for b in doc])


@budget.command("refund")
@home_option
@json_option
@escrow_option
@click.option("--budget", "budget_id", required=True, metavar="ID")
def budget_refund(home: str | None, as_json: bool, escrow: str | None, budget_id: str) -> None:
    """Return a budget's undrawn credits to its funder now."""
    doc = DaemonClient(home).request("POST", "/api/v1/escrow/budgets/refund",
                                     json={"escrow": escrow, "budget_id": budget_id})
    _emit(doc, as_json, f"budget {show_id(budget_id)} {doc['status']}; {credits(doc['remaining'])} left in it")


COMMANDS = [wallet, escrow]
