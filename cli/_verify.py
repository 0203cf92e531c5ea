"""``node evidence`` and ``node verify-evidence``: what spot checks found, and re-checking it."""

from __future__ import annotations

from pathlib import Path

import click
import trio

from node import resolve_home

from ._common import CliError, DaemonClient, emit_json, home_option, json_option, local_time, print_rows, show_id


@click.command()
@home_option
@json_option
@click.option("--provider", metavar="PEER", help="only the bundles against this provider")
@click.option("--save", metavar="DIR", type=click.Path(file_okay=False),
              help="also write each bundle to DIR/<id>.evidence (for `node verify-evidence`)")
def evidence(home: str | None, as_json: bool, provider: str | None, save: str | None) -> None:
    """List the evidence bundles this node holds: failed spot checks, its own and gossiped ones."""
    rows = DaemonClient(home).request("GET", "/api/v1/evidence", params={"provider": provider} if provider else {})
    if save:
        folder = Path(save)
        folder.mkdir(parents=True, exist_ok=True)
        for r in rows:
            (folder / f"{r['id']}.evidence").write_bytes(bytes.fromhex(r["data"]))
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no evidence held" + (f" against {provider}" if provider else ""), err=True)
        return
    print_rows(("id", "provider", "model", "verifier", "mode", "confirmed here", "at"),
               [(r["id"][:12], show_id(r["provider"]), r["model"], show_id(r["verifier"]),
                 r["mode"] if r["mode"] == "exact" else f"top-k {r['agreement_permille'] / 10:.1f}%",
                 "yes" if r["confirmed"] else "no", local_time(r["issued_at"])) for r in rows])
    if save:
        click.echo(f"wrote {len(rows)} bundle(s) to {save}", err=True)


@click.command("verify-evidence")
@home_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--backend", metavar="SPEC",
              help="re-run the call on this model (it must hold the committed weights: builtin, transformers:PATH)")
def verify_evidence(home: str | None, file: str, backend: str | None) -> None:
    """Check an evidence bundle: signatures, that the receipt binds its request, model and text,
    and that the comparison fails; with --backend, re-run the call here and see for yourself."""
    import protocol
    from node.provider.backends import open_backend
    from node.verify import recheck

    data = Path(file).read_bytes()

    async def check() -> object:
        if backend is None:
            return await recheck(data)
        loaded = await open_backend(backend, Path(resolve_home(home)))
        try:
            return await recheck(data, loaded)
        finally:
            await loaded.aclose()

    try:
        result = trio.run(check)
    except protocol.ProtocolError as exc:
        raise CliError(f"refused: {exc}") from exc
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    ev = result.evidence  # type: ignore[attr-defined]
    r = ev.receipt
    click.echo(f"valid: provider {r.provider} signed that it served {r.model!r} under commitment "
               f"{protocol.commitment_id(ev.commitment).hex()[:16]}…, and its text disagrees with "
               f"verifier {ev.verifier}'s re-run ({ev.mode}"
               + (f": {ev.agreement_permille / 10:.1f}% of its tokens in the top {ev.topk}, under "
                  f"{ev.threshold_permille / 10:.1f}%)" if ev.mode == "topk" else ")"))
    if result.confirmed is None:  # type: ignore[attr-defined]
        click.echo("not re-run here: pass --backend with the committed weights to confirm the verifier's output",
                   err=True)
    elif result.confirmed:  # type: ignore[attr-defined]
        click.echo("confirmed: the re-run here disagrees with the provider too")
    else:
        raise CliError("not confirmed: the re-run here agrees with the provider (the verifier's output is wrong)")


COMMANDS = [evidence, verify_evidence]
