"""`node demo --once` runs again and again on the same home (``make run`` keeps ``.demo/``): five
runs in a row, the last a real ``node demo --once`` process, each one's three providers loading
the builtin model at once. A failing step is one ``DemoError`` naming it, not exception groups."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import trio
from rich.console import Console

import protocol
import wallet
from node._demo import DemoError, run_demo
from node.provider.backends import BUILTIN_MODEL
from tests.e2e.daemons import PASSPHRASE, ROOT, node_env


def _paid(text: str) -> dict[str, str]:
    """The providers' available balances in the demo's "balances after" table."""
    after = text[text.index("balances after"):]
    return {line.split("│")[1].strip(): line.split("│")[2].strip() for line in after.splitlines()
            if line.startswith("│ provider")}


@pytest.mark.slow
async def test_demo_once_five_times_in_a_row_on_one_home(tmp_path, monkeypatch):
    home = tmp_path / "demo"
    monkeypatch.setenv(wallet.PASSPHRASE_ENV, PASSPHRASE)
    spent, embedded = [], []
    for run in range(4):  # in-process: no interpreter and torch start-up each time
        out = io.StringIO()
        summary = await run_demo(home, providers=3, once=True, console=Console(file=out, width=160))
        assert len(summary["receipts"]) == 2 and summary["spent"] == summary["receipts"][-1].cumulative > 0, run
        assert "Error" not in out.getvalue() and "Failed" not in out.getvalue(), out.getvalue()
        emb = summary["embeddings"]  # the real MiniLM: a paraphrase ranks above an unrelated sentence
        assert emb.dims == 384 and len(emb.vectors) == 3 and summary["similarity"][0] > summary["similarity"][1] + 0.3
        assert emb.cost == sum(protocol.call_cost(r.price, r.tokens_in, 0) for r in emb.receipts) > 0
        x402 = summary["x402"]  # a caller with only a key paid one chat on the embedded chain
        assert x402["tx_hash"].startswith("0x") and len(x402["tx_hash"]) == 66 and x402["amount"] >= x402["cost"] > 0
        spent.append(summary["spent"])
        embedded.append(summary["embeddings"].cost)
    assert sorted(p.name for p in (home / "models" / "models").iterdir() if p.is_dir()) == [BUILTIN_MODEL]

    def fifth() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", "demo", "--home", str(home), "--once"],
                              capture_output=True, text=True, cwd=ROOT, env={**node_env(), "COLUMNS": "160"},
                              timeout=240, stdin=subprocess.DEVNULL)

    done = await trio.to_thread.run_sync(fifth)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    for needle in ("escrow agent", "provider 3", "providers of tiny (cheapest first)", "balances before",
                   "receipts (both signatures verified, chained)", "balances after", "the chat cost",
                   "paid embeddings", "input tokens ×", "x402", "settled in transaction 0x"):
        assert needle in text, needle
    # no dial of the last run's ports (now another node's, or nobody's): libp2p's handshake errors
    assert "Traceback" not in done.stderr and "Failed to open stream" not in done.stderr, done.stderr[-3000:]
    paid = _paid(text)  # the cheapest provider (provider 2) served every chat and was paid; provider 1 only
    # for the embeddings of the four runs before (this run's is paid after the table), provider 3 never
    assert paid["provider 2"] != "0.000000" and paid["provider 3"] == "0.000000"
    assert paid["provider 1"] == protocol.format_credits(sum(embedded)), (paid, embedded)


async def test_a_failing_step_is_one_demo_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(wallet.PASSPHRASE_ENV, PASSPHRASE)
    models = tmp_path / "demo" / "models"
    models.mkdir(parents=True)
    (models / "models").write_text("not a folder")  # where the builtin model is to be built
    with pytest.raises(DemoError, match="while building the builtin model") as caught:
        await run_demo(tmp_path / "demo", once=True, console=Console(file=io.StringIO()))
    assert isinstance(caught.value.__cause__, OSError)
    assert not isinstance(caught.value, BaseExceptionGroup)
