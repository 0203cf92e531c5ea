"""The ``node`` command: argument parsing and presentation only.

Exit status: 0 success, 1 a clear one-line error on stderr, 2 a usage error (click's).
``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import sys

import click

import wallet
from node import ConfigError, Home, init_home, resolve_home

from ._common import CliError, emit_json, home_option, json_option
from ._common import fail_on as _fail_on
from ._escrow import COMMANDS as ESCROW_COMMANDS
from ._market import COMMANDS
from ._renting import COMMANDS as RENTING_COMMANDS


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


for _command in COMMANDS + ESCROW_COMMANDS + RENTING_COMMANDS:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="node")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
