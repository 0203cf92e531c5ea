"""Shared pieces of the ``node`` command: options, errors, output, the daemon client."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, TypeVar

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


class CliError(click.ClickException):
    """A clear one-line error, exit status 1."""


def home_option(fn: F) -> F:
    return click.option("--home", "home", type=click.Path(file_okay=False), default=None, help=_HOME_HELP)(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print one JSON document")(fn)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


def fail_on(*errors: type[BaseException]) -> Callable[[F], F]:
    """Turn the listed exceptions into one-line CLI errors (exit 1)."""

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
            raise CliError(f"the node answered {response.status_code} with something that is not JSON") from exc
        if response.status_code >= 400:
            message = doc.get("error", {}).get("message") if isinstance(doc, dict) else None
            raise CliError(message or f"the node answered {response.status_code}")
        return doc
