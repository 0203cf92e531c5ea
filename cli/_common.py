"""Shared pieces of the ``node`` command: options, errors, output for people, the daemon client.

Output rules (every command follows them; the helpers below are how):
- ids are shown whole, never cut (``12D3K…`` cannot be pasted back): ``show_id``;
- money is credits, never µc: ``credits`` (``"1.50 credits"``), ``amount`` (a table cell), and
  ``in_credits`` rewrites a daemon message's ``N µc`` as credits;
- times are local dates and a relative phrase: ``when`` (``"2026-12-02 03:14 (in 9 min)"``),
  ``ago_or_in``, ``duration``;
- tables stay readable at 80 columns: ``print_rows`` prints a table where it fits the terminal
  and a list of records where it does not.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

import click
import httpx

import protocol
from node import Home, resolve_home
from node.daemon import DaemonNotRunning, api_token, read_daemon_info

F = TypeVar("F", bound=Callable[..., Any])

_HOME_HELP = "node home directory (default: $INFERSWARM_HOME, else the user data dir)"


def credits_option(_ctx: Any, _param: Any, value: str | None) -> int | None:
    """A click callback: a decimal amount of credits on the command line, as exact micro-credits."""
    if value is None:
        return None
    try:
        return protocol.parse_credits(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def show_id(peer_id: str) -> str:
    """A peer id (or channel, receipt id) as people see it: whole, so it can be pasted back."""
    return peer_id


def amount(micro: int) -> str:
    """Exact µc as a decimal credit amount for a table cell: ``1500000`` -> ``"1.50"``,
    ``1234`` -> ``"0.001234"`` (trailing zeros dropped down to two decimals; never rounded)."""
    text = protocol.format_credits(micro)
    whole, frac = text.split(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"


def credits(micro: int) -> str:
    """Exact µc in words: ``1500000`` -> ``"1.50 credits"``."""
    return f"{amount(micro)} credits"


_MICRO = re.compile(r"(-?\d+)(?:/(-?\d+))? ?µc\b")


def in_credits(message: str) -> str:
    """A daemon's message with every ``N µc`` (and ``N/M µc``) rewritten as credits, so an error
    speaks the unit commands take: ``"12 µc left"`` -> ``"0.000012 credits left"``."""

    def one(m: re.Match[str]) -> str:
        if m.group(2) is None:
            return credits(int(m.group(1)))
        return f"{amount(int(m.group(1)))}/{amount(int(m.group(2)))} credits"

    return _MICRO.sub(one, message)


def duration(seconds: float) -> str:
    """A span in words: ``45`` -> ``"45 s"``, ``296`` -> ``"5 min"``, ``7500`` -> ``"2 h 5 min"``,
    ``200000`` -> ``"2 days 8 h"``."""
    s = int(abs(seconds))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    if s < 86400:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h" + (f" {m} min" if m else "")
    d, h = divmod(round(s / 3600), 24)
    return f"{d} day{'' if d == 1 else 's'}" + (f" {h} h" if h else "")


def ago_or_in(ts: float, now: float | None = None) -> str:
    """A Unix time relative to now: ``"in 9 min"``, ``"3 h ago"``, ``"now"``."""
    delta = ts - (time.time() if now is None else now)
    if abs(delta) < 1:
        return "now"
    return f"in {duration(delta)}" if delta > 0 else f"{duration(delta)} ago"


def local_time(ts: float) -> str:
    """A Unix time as a local date and time to the minute: ``"2026-12-02 03:14"``."""
    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M")


def when(ts: float, now: float | None = None) -> str:
    """A Unix time for people: ``"2026-12-02 03:14 (in 9 min)"``."""
    return f"{local_time(ts)} ({ago_or_in(ts, now)})"


def terminal_width() -> int:
    """The terminal's width in columns (rich's detection: the tty, else ``$COLUMNS``, else 80)."""
    from rich.console import Console

    return Console().width


def print_rows(headers: Sequence[str], rows: Iterable[Sequence[str]], *, width: int | None = None,
               err: bool = False) -> None:
    """Print ``rows`` as a table if it fits ``width`` (default: the terminal's), else as a list of
    records: the first column alone on a line, then ``header: value`` lines, a blank line between
    records. Nothing is cut either way, so a long id can always be copied whole.
    """
    rows = [[str(cell) for cell in row] for row in rows]
    width = terminal_width() if width is None else width
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if sum(widths) + 3 * len(headers) + 1 <= width:  # rich's box: a bar and a space either side of each cell
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        Console(width=width, stderr=err, highlight=False).print(table)
        return
    label = max(len(h) for h in headers[1:]) if len(headers) > 1 else 0
    for n, row in enumerate(rows):
        if n:
            click.echo("", err=err)
        click.echo(row[0], err=err)
        for header, cell in zip(headers[1:], row[1:]):
            click.echo(f"  {header + ':':<{label + 1}} {cell}", err=err)


def set_verbose(ctx: click.Context, _param: Any, value: bool) -> bool:
    """A click callback: ``-v`` asks for tracebacks (and, on ``node start``, the daemon's log);
    the CLI's error edge (``main._Edge``) reads it from the root context."""
    if value:
        ctx.find_root().meta["verbose"] = True
    return value


class CliError(click.ClickException):
    """A clear one-line error, exit status 1."""


def home_option(fn: F) -> F:
    return click.option("--home", "home", type=click.Path(file_okay=False), default=None, help=_HOME_HELP)(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print one JSON document")(fn)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


def fail_on(*errors: type[BaseException]) -> Callable[[F], F]:
    """Turn the listed exceptions into one-line CLI errors (exit 1). Not needed any more: the
    CLI's error edge (``main._Edge``) does this for every expected failure of every command;
    kept so the commands that still name their errors keep working."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except errors as exc:
                raise CliError(str(exc)) from exc

        return wrapper  # type: ignore[return-value]

    return deco


class DaemonClient:
    """Talks to the running daemon of a home over its local API."""

    def __init__(self, home: str | None) -> None:
        self.home = Home(resolve_home(home))
        try:
            info = read_daemon_info(self.home)
            token = api_token(self.home)
        except DaemonNotRunning as exc:
            raise CliError(str(exc)) from exc
        self.info = info
        self._http = httpx.Client(base_url=info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def stream(self, method: str, path: str, **kwargs: Any) -> Any:
        """A streaming request (a context manager yielding the response)."""
        return self._http.stream(method, path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CliError(f"the node at {self.info['api_url']} did not answer: {exc}") from exc
        try:
            doc = response.json()
        except ValueError as exc:
            if response.status_code >= 500:
                raise CliError(f"the node failed on this request (HTTP {response.status_code}): a bug, its log "
                               "has the traceback") from exc
            raise CliError(f"the node answered {response.status_code} with something that is not JSON") from exc
        if response.status_code >= 400:
            message = doc.get("error", {}).get("message") if isinstance(doc, dict) else None
            raise CliError(in_credits(message) if message else f"the node answered {response.status_code}")
        return doc
