"""Ctrl-C in ``node run --stream`` cancels the call, not only the display: the CLI asks its daemon
to cancel (``POST /api/v1/calls/{id}/cancel``), reads on to what the cancelled call cost and prints
it; the provider stops, the receipt both signed bills only what was streamed before the cut, and
the escrow pays exactly that. Exit status 130, as for any interrupted command."""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
import time

import httpx

from tests.e2e.daemons import ROOT, Daemon, node_env, poll, start_market

MAX_TOKENS = 1500


def _api(daemon: Daemon, home) -> httpx.Client:
    token = (home / "api.token").read_text().strip()
    return httpx.Client(base_url=daemon.info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _read_until(proc: subprocess.Popen, n: int, timeout: float) -> bytes:
    """Read the process's stdout until ``n`` bytes came (polling with a deadline)."""
    got, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while len(got) < n:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, (got, proc.poll())
            if sel.select(left):
                chunk = proc.stdout.read1(4096)
                assert chunk, got
                got += chunk
    return got


def test_ctrl_c_in_a_streamed_run_cancels_the_call_and_prints_what_it_cost(tmp_path):
    started: list[Daemon] = []
    proc = None
    try:
        agent, provider, consumer, aid = start_market(tmp_path, started, mint="5")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "run", "--home", str(tmp_path / "consumer"), "--model", "tiny",
             "--escrow", aid, "--stream", "--max-tokens", str(MAX_TOKENS), "--temperature", "0",
             "Tell me a long story"], cwd=ROOT, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL)
        shown = _read_until(proc, 40, 60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        shown += out
        err_text = err.decode()
        assert proc.returncode == 130, (proc.returncode, err_text)
        assert "Traceback" not in err_text and "[cancelled · " in err_text, err_text
        with _api(consumer, tmp_path / "consumer") as http:
            receipt = http.get("/api/v1/receipts", params={"limit": 5}).json()["receipts"][0]
        assert receipt["receipt_id"] in err_text, (receipt, err_text)
        assert receipt["consumer_sig"] and receipt["tokens_out"] < MAX_TOKENS // 2, receipt
        # the builtin model writes one printable character per token, and the CLI ends the text with a
        # newline: billed is at least what was read before Ctrl-C, at most what was shown
        assert 40 <= receipt["tokens_out"] <= len(shown) - 1, (len(shown), receipt)
        with _api(provider, tmp_path / "provider") as http:
            def paid():
                balance = http.get("/api/v1/wallet/balance", params={"escrow": aid}).json()
                return balance if balance["available"] == receipt["cost"] else None

            poll(paid, 60, "the escrow paying the cancelled call")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for d in started:
            d.stop()
