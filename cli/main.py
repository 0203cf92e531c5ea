"""The ``inferswarm`` command (also installed as ``node``): argument parsing and presentation only.

Exit status: 0 success, 1 a clear error on stderr (one or two lines), 2 a usage error (click's),
70 an internal error (a bug: one line, the traceback with ``-v``). ``--json`` prints one JSON
document on stdout.

The error edge is ``_Edge.invoke``: whatever a command raises that is an expected failure — the
project's errors (``node.NodeError``, ``wallet.WalletError``, ``protocol.ProtocolError``), a
``ValueError`` from parsing what the user typed, an ``OSError`` (a taken port, a missing file), an
unreachable daemon — becomes its one line, however deep inside exception groups it was raised;
anything else is an internal error. No command lists the errors it may raise.

``node`` is also the name of Node.js. Called as ``node`` the way Node.js is called (a script path,
``-e``, ``-p``, ``-r``, ``--inspect``, any option that is not ours, ``-``, or ``--version`` / ``-v``
alone, as npm and version managers ask), the command hands over to the Node.js found on PATH after
itself (``_nodejs``), so an activated venv breaks no ``#!/usr/bin/env node`` script.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn, Sequence

import click

import wallet
from node import Home, init_home, resolve_home

from ._chain import COMMANDS as CHAIN_COMMANDS
from ._common import CliError, emit_json, home_option, json_option, set_verbose
from ._escrow import COMMANDS as ESCROW_COMMANDS
from ._insight import COMMANDS as INSIGHT_COMMANDS
from ._market import COMMANDS
from ._renting import COMMANDS as RENTING_COMMANDS
from ._verify import COMMANDS as VERIFY_COMMANDS

#: exit status of an internal error (BSD's EX_SOFTWARE)
EXIT_INTERNAL = 70
#: exit status when a Node.js invocation finds no Node.js (the shell's "command not found")
EXIT_NO_NODEJS = 127


class InternalError(click.ClickException):
    """A failure nothing expected (a bug): one line, exit 70."""

    exit_code = EXIT_INTERNAL

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True, file=file)


def _expected() -> tuple[type[BaseException], ...]:
    """The failures a user can cause or fix: each is one line, never a traceback."""
    import httpx

    import protocol
    from node import NodeError

    return (NodeError, wallet.WalletError, protocol.ProtocolError, ValueError, OSError, httpx.HTTPError)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions at the bottom of ``exc``'s exception groups (``exc`` itself if not a group),
    without trio's ``Cancelled`` (the siblings cancelled because one of them failed)."""
    import trio

    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [] if isinstance(exc, trio.Cancelled) else [exc]


def _message(exc: BaseException) -> str:
    """What a user reads for an expected failure: its own words, without ``[Errno N]``."""
    import httpx

    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else None
        return f"{where}: {exc.strerror}" if where and str(where) not in exc.strerror else exc.strerror
    if isinstance(exc, httpx.HTTPError):
        return f"no answer from the node: {exc}"
    return str(exc) or type(exc).__name__


def edge(exc: BaseException, verbose: bool) -> click.ClickException | BaseException:
    """What the command's failure ``exc`` becomes at the edge: an expected failure its one-line
    ``CliError`` (exit 1), Ctrl-C click's ``Abort``, anything else an ``InternalError`` (exit 70).
    With ``verbose`` the traceback is printed first (with the innermost cause's own, which
    Python's printing of deep exception groups cuts off)."""
    leaves = _leaves(exc) or [exc]
    if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return click.Abort()
    expected = [leaf for leaf in leaves if isinstance(leaf, _expected())]
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
        if leaves[0] is not exc:
            click.echo("the cause:", err=True)
            traceback.print_exception(expected[0] if expected else leaves[0], file=sys.stderr)
    if expected:
        return CliError(_message(expected[0]))
    leaf = leaves[0]
    hint = "" if verbose else "; run with -v for the traceback"
    return InternalError(f"internal error: {type(leaf).__name__}: {leaf}{hint}")


class _Edge(click.Group):
    """The group whose ``invoke`` is the CLI's one error edge (see the module docstring)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except click.ClickException as exc:
            cause = exc.__cause__
            if ctx.meta.get("verbose") and cause is not None:
                traceback.print_exception(cause, file=sys.stderr)
            raise
        except BaseException as exc:  # noqa: B902 - the edge: every failure leaves as one line
            raise edge(exc, bool(ctx.meta.get("verbose"))) from exc


@click.group(cls=_Edge, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inferswarm", prog_name="inferswarm")
@click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=set_verbose,
              help="print the traceback of a failure")
def cli() -> None:
    """Inferswarm: a peer-to-peer market for LLM inference.

    Sell inference from your GPUs (or an upstream API key you own), or rent it from the
    network and pay per token through an escrow agent.

    The command is installed twice, as `inferswarm` and as `node`. Called the way Node.js is
    (`node script.js`, `node -e CODE`, `node --version` …), `node` runs Node.js instead, when
    it is installed: `node --version` then prints Node.js's version, `inferswarm --version`
    this one's.
    """


@cli.command()
@home_option
@json_option
@click.option("--exist-ok", is_flag=True, help="succeed (and print the identity) if the home is already initialised")
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
def id_(home: str | None, as_json: bool) -> None:
    """Print this node's peer id (no passphrase needed)."""
    peer_id, public_key = wallet.read_public_identity(Home(resolve_home(home)).keystore)
    if as_json:
        emit_json({"peer_id": peer_id, "public_key": public_key.hex()})
    else:
        click.echo(peer_id)


for _command in COMMANDS + ESCROW_COMMANDS + RENTING_COMMANDS + VERIFY_COMMANDS + INSIGHT_COMMANDS + CHAIN_COMMANDS:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """The ``inferswarm`` entry point (and ``python -m cli.main``)."""
    cli.main(args=argv, prog_name="inferswarm")


def node_main(argv: list[str] | None = None) -> None:
    """The ``node`` entry point: Inferswarm, unless called the way Node.js is (then Node.js)."""
    args = sys.argv[1:] if argv is None else argv
    if _is_nodejs_call(args):
        nodejs = _nodejs()
        if nodejs is not None:
            _hand_over(nodejs, args)
        if args not in (["--version"], ["-v"]):  # without Node.js, `node --version` is ours
            click.echo("this is Inferswarm's `node` command, and Node.js is not installed (see `inferswarm --help`)",
                       err=True)
            sys.exit(EXIT_NO_NODEJS)
        args = ["--version"]
    cli.main(args=args, prog_name="node")


def _is_nodejs_call(args: Sequence[str]) -> bool:
    """Whether ``node ARGS`` is meant for Node.js: ``--version``/``-v`` alone, ``-`` (a script on
    stdin), an option that is not one of ours (``-e``, ``-p``, ``-r``, ``--inspect``, ``--require``
    …), or a first argument that is not our subcommand but a script (a ``.js``-like name or an
    existing file)."""
    if not args:
        return False
    first = args[0]
    if list(args) in (["--version"], ["-v"]) or first == "-":
        return True
    if first.startswith("-"):
        return first not in ("-h", "--help", "-v", "--verbose", "--version")
    if first in cli.commands:
        return False
    return first.endswith((".js", ".mjs", ".cjs", ".ts", ".mts", ".cts")) or os.sep in first or Path(first).is_file()


def _nodejs(path: str | None = None) -> str | None:
    """The first ``node`` on ``path`` (default ``$PATH``) that is not this command: not the script
    running now, nor any script that starts Inferswarm's CLI (another venv's)."""
    ours = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else None
    for folder in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep):
        candidate = os.path.join(folder or ".", "node")
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        if os.path.realpath(candidate) == ours or _is_ours(candidate):
            continue
        return candidate
    return None


def _is_ours(script: str) -> bool:
    """Whether ``script`` is an entry point of this CLI (pip writes a small Python file naming it)."""
    try:
        with open(script, "rb") as f:
            head = f.read(1024)
    except OSError:
        return False
    return head.startswith(b"#!") and b"cli.main" in head


def _hand_over(nodejs: str, args: Sequence[str]) -> NoReturn:
    """Replace this process with Node.js, same arguments and environment."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(nodejs, [nodejs, *args])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
