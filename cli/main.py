"""The ``node`` command: argument parsing and presentation only.

Exit status: 0 success, 1 a clear one-line error on stderr, 2 a usage error (click's).
``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import click

import wallet
from node import ConfigError, Home, init_home, resolve_home

F = TypeVar("F", bound=Callable[..., Any])

_HOME_HELP = "node home directory (default: $INFERSWARM_HOME, else the user data dir)"


def home_option(fn: F) -> F:
    return click.option("--home", "home", type=click.Path(file_okay=False), default=None, help=_HOME_HELP)(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print one JSON document")(fn)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


class CliError(click.ClickException):
    """A clear one-line error, exit status 1."""


def _fail_on(*errors: type[BaseException]) -> Callable[[F], F]:
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inferswarm", prog_name="node")
def cli() -> None:
    """Inferswarm: a peer-to-peer market for LLM inference.

    Sell inference from your GPUs (or an upstream API key you own), or rent it from the
    network and pay per token through an escrow agent.
    """


@cli.command()
@home_option
@json_option
@click.option("--exist-ok", is_flag=True, help="succeed (and print the identity) if the home is already initialised")
@_fail_on(wallet.WalletError, OSError)
def init(home: str | None, as_json: bool, exist_ok: bool) -> None:
    """Create the node home: encrypted keystore, config and identity; print the peer id."""
    path = resolve_home(home)
    h = Home(path)
    if h.is_initialised():
        if not exist_ok:
            raise CliError(f"{path} is already initialised (peer id {wallet.read_public_identity(h.keystore)[0]})")
        peer_id, public_key = wallet.read_public_identity(h.keystore)
    else:
        ks = init_home(path, wallet.resolve_passphrase(confirm=True))
        peer_id, public_key = ks.identity.peer_id, ks.identity.public_key
    if as_json:
        emit_json({"peer_id": peer_id, "public_key": public_key.hex(), "home": str(path)})
    else:
        click.echo(f"home:    {path}", err=True)
        click.echo(peer_id)


@cli.command("id")
@home_option
@json_option
@_fail_on(wallet.WalletError, ConfigError, OSError)
def id_(home: str | None, as_json: bool) -> None:
    """Print this node's peer id (no passphrase needed)."""
    peer_id, public_key = wallet.read_public_identity(Home(resolve_home(home)).keystore)
    if as_json:
        emit_json({"peer_id": peer_id, "public_key": public_key.hex()})
    else:
        click.echo(peer_id)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="node")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
