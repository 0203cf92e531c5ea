"""``node market`` and ``node advise``: the market's prices and trend, and a provider's advice."""

from __future__ import annotations

import click

from ._common import DaemonClient, amount, emit_json, home_option, json_option, local_time, print_rows

_HOURS = click.option("--hours", type=click.IntRange(1, 720), default=24, show_default=True,
                      help="the window: this many whole hours back")


def _permille(value: int | None) -> str:
    return "-" if value is None else f"{value / 10:.1f}%"


@click.command()
@home_option
@json_option
@click.option("--model", required=True, metavar="NAME", help="the model to show the market of")
@_HOURS
def market(home: str | None, as_json: bool, model: str, hours: int) -> None:
    """The market for one model: prices paid (distribution and trend), completion and demand."""
    doc = DaemonClient(home).request("GET", "/api/v1/market/prices", params={"model": model, "hours": hours})
    if as_json:
        emit_json(doc)
        return
    if not doc["observers"]:
        click.echo(f"no market observations of {model} in the last {hours} h (nodes observe once an hour is over)",
                   err=True)
        return
    spread = doc["spread"]
    if spread:
        print_rows(("price /1K", "p10", "p25", "p50", "p75", "p90"),
                   [(side, *(amount(spread[side][f"p{p}"]) for p in (10, 25, 50, 75, 90)))
                    for side in ("input", "output")])
        click.echo(f"{spread['samples']} price samples from {doc['observers']} observers", err=True)
    trend = doc["trend"]
    if trend:
        click.echo(f"median output price {amount(trend['first'])} -> {amount(trend['last'])} "
                   f"({trend['change_permille'] / 10:+.1f}%) since {local_time(trend['from_hour'])}")
    click.echo(f"calls {doc['calls']}, median completion {_permille(doc['completion_permille'])}; "
               f"served {doc['served']}, turned away for capacity {doc['turned_away']}")
    print_rows(("hour", "observers", "median in", "median out", "calls", "completed", "turned away"),
               [(local_time(h["hour"]), str(h["observers"]),
                 "-" if h["median_input"] is None else amount(h["median_input"]),
                 "-" if h["median_output"] is None else amount(h["median_output"]), str(h["calls"]),
                 str(h["completed"]), str(h["turned_away"])) for h in doc["hours"]])
    click.echo("prices in credits per 1K tokens", err=True)


@click.command()
@home_option
@json_option
@_HOURS
def advise(home: str | None, as_json: bool, hours: int) -> None:
    """Your offers against the market: price position, utilization, peak hours, earnings and a suggested price."""
    doc = DaemonClient(home).request("GET", "/api/v1/advise", params={"hours": hours})
    if as_json:
        emit_json(doc)
        return
    if not doc["models"]:
        click.echo("this node offers no models (node offer add …)", err=True)
        return
    for m in doc["models"]:
        market = m["market"]
        click.echo(f"{m['model']}: listed at {amount(m['input_price'])} in / {amount(m['output_price'])} out")
        if market:
            click.echo(f"  market output p25/p50/p75: {amount(market['output']['p25'])} / "
                       f"{amount(market['output']['p50'])} / {amount(market['output']['p75'])} "
                       f"({market['samples']} samples); yours is above {_permille(m['position_permille'])} of them")
        peaks = ", ".join(f"{p['hour']:02d}:00 UTC ({p['calls']})" for p in m["peak_hours"]) or "-"
        click.echo(f"  served {m['calls']} calls, earned {amount(m['earned'])}, utilization "
                   f"{_permille(m['utilization_permille'])}, turned away {m['turned_away']}; peak hours {peaks}")
        click.echo(f"  suggested: {amount(m['suggested_input'])} in / {amount(m['suggested_output'])} out — {m['reason']}")
    if doc["most_profitable"]:
        click.echo("most profitable: " + ", ".join(doc["most_profitable"]))
    click.echo("prices in credits per 1K tokens", err=True)


COMMANDS = [market, advise]
