"""`node demo --once` completes on a fresh home and prints the receipts and the balances."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.daemons import ROOT, node_env


def test_demo_once_on_a_fresh_home(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--home", str(tmp_path / "demo"), "--once"],
                         capture_output=True, text=True, cwd=ROOT, env={**node_env(), "COLUMNS": "160"}, timeout=240,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for needle in ("escrow agent", "provider 3", "providers of tiny (cheapest first)", "balances before",
                   "receipts (both signatures verified, chained)", "balances after", "the chat cost"):
        assert needle in text, needle
    # the cheapest provider (provider 2) served and was paid; the others were not
    after = text[text.index("balances after"):]
    paid = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in after.splitlines()
            if line.startswith("│ provider")}
    assert paid["provider 2"] != "0.000000" and paid["provider 1"] == paid["provider 3"] == "0.000000"
