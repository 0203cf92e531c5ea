"""``node devnet``: a development chain with our contracts on a loopback JSON-RPC port, for several
daemons (``node start --chain evm:URL#ESCROW``) and wallets to share."""

from __future__ import annotations

import logging
import signal
import sys

import click
import trio

from ._common import set_verbose

__all__ = ["COMMANDS"]


@click.command()
@click.option("--rpc", metavar="HOST:PORT", default="127.0.0.1:8545", show_default=True,
              help="where to serve JSON-RPC (loopback)")
@click.option("-v", "--verbose", is_flag=True, callback=set_verbose, help="log each step to stderr")
def devnet(rpc: str, verbose: bool) -> None:
    """Run a development chain (an in-process EVM) with the escrow and test-stablecoin contracts until Ctrl-C.

    Its state lives as long as the process. Give daemons the printed --chain; fund keys with the
    JSON-RPC method inferswarm_faucet [ADDRESS, AMOUNT_µc].
    """
    from node.chain import Devnet, serve_devnet
    from wallet import Identity

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        chain = await trio.to_thread.run_sync(Devnet, Identity.generate())
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(serve_devnet, chain, rpc)
                d = chain.chain.deployment
                click.echo(f"devnet chain {d.chain_id} on {url}")
                click.echo(f"  escrow {d.escrow}, token {d.token} (6 decimals: 1 unit = 1 µc)")
                click.echo(f"  settle on it: node start --chain {chain.spec}")
                click.echo("  test tokens and gas for a key: JSON-RPC inferswarm_faucet [ADDRESS, AMOUNT_µc]")
                click.echo("serving until Ctrl-C…", err=True)
                async for _ in signals:
                    click.echo("stopping…", err=True)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


COMMANDS = [devnet]
