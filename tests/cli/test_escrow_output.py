"""What the escrow and renting commands print is made for people: whole ids (they are pasted back
into --channel, --export, --escrow), local dates with how far off they are instead of Unix
seconds, credits instead of µc, and nothing wider than an 80-column terminal but the ids themselves."""

from __future__ import annotations

import re
import time

import pytest
from click.testing import CliRunner

from cli import _escrow
from cli._common import CliError, credits

AGENT = "12D3KooWLN2ie86tE4aZhrcAaLnEKokhNywHnofZCCicnMvLCvGa"
CONSUMER = "12D3KooWHiYHHh73AZtcDzmYcVBvczgt77CYCxr6mdnJzuNxB1Vd"
PROVIDER = "12D3KooWQrRiZe6PYQEHqvPXACCYH9h9MwTN1j8nvGNvmPAfKK7h"
CHANNEL = "4625f29a4de0ff0c78b1b6e7c008fc65"


def _channel(expires_in: int) -> dict:
    return {"channel_id": CHANNEL, "agent": AGENT, "consumer": CONSUMER, "provider": PROVIDER, "cap": 4_000_000,
            "claimed": 77_000, "remaining": 3_923_000, "expires_at": int(time.time()) + expires_in,
            "budget_id": None, "status": "open"}


def test_channels_show_whole_ids_local_expiry_and_credits_within_80_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    _escrow._show_channels([_channel(10 * 60 + 20), _channel(2 * 86400)])
    out = capsys.readouterr().out
    for whole in (CHANNEL, CONSUMER, PROVIDER):
        assert re.search(rf"(?<![0-9A-Za-z]){whole}(?![0-9A-Za-z])", out), out
    assert "…" not in out and "in 10 min" in out and "in 2 days" in out, out
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", out) and not re.search(r"\b1[6-9]\d{8}\b", out), out
    assert credits(4_000_000) in out and "µc" not in out, out
    assert max(len(line) for line in out.splitlines()) <= 80, out


def test_escrow_open_quiet_prints_the_channel_id_alone(monkeypatch):
    class Client:
        def __init__(self, home):
            pass

        def request(self, method, path, json=None, params=None):
            assert (method, path) == ("POST", "/api/v1/escrow/open")
            return {"channel_id": CHANNEL, "cap": json["amount"], "expires_at": int(time.time()) + 3600,
                    "escrow": AGENT, "provider": json["provider"], "budget_id": None}

    monkeypatch.setattr(_escrow, "DaemonClient", Client)
    args = ["open", "--provider", PROVIDER, "--amount", "4", "--expires", "1h"]
    quiet = CliRunner().invoke(_escrow.escrow, args + ["-q"])
    assert quiet.exit_code == 0 and quiet.output == CHANNEL + "\n", quiet.output
    loud = CliRunner().invoke(_escrow.escrow, args)
    assert f"channel {CHANNEL}: 4.00 credits to {PROVIDER}, until " in loud.output and "(in 60 min)" in loud.output
    assert f"node run --channel {CHANNEL} --escrow {AGENT}" in loud.output


def test_a_channel_is_named_by_a_unique_prefix_too():
    other = "4625ffffffffffffffffffffffffffff"

    class Client:
        def request(self, method, path, json=None, params=None):
            assert (method, path) == ("GET", "/api/v1/wallet/balance")
            return {"escrow": AGENT, "channels": [_channel(3600), _channel(3600) | {"channel_id": other}]}

    assert _escrow.resolve_channel(Client(), AGENT, CHANNEL.upper()) == CHANNEL  # whole: asks nobody
    assert _escrow.resolve_channel(Client(), AGENT, CHANNEL[:6]) == CHANNEL
    for bad, said in (("4625", "2 channels of this node at"), ("abcd", "no channel of this node"),
                      ("xyz", "is not a channel id")):
        with pytest.raises(CliError, match=said):
            _escrow.resolve_channel(Client(), AGENT, bad)
