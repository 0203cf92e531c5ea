"""``node market`` and ``node advise`` print the daemon's figures as they are: prices in credits,
shares in percent, the suggestion with its reason; ``--json`` is the document itself."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli import _insight

MARKET = {"model": "tiny", "since": 0, "until": 7200, "observers": 3, "calls": 10, "completed": 9,
          "completion_permille": 900, "served": 12, "turned_away": 2,
          "spread": {"samples": 3, "input": {f"p{p}": 100_000 for p in (10, 25, 50, 75, 90)},
                     "output": {"p10": 300_000, "p25": 300_000, "p50": 600_000, "p75": 900_000, "p90": 900_000}},
          "trend": {"from_hour": 0, "to_hour": 3600, "first": 300_000, "last": 600_000, "change": 300_000,
                    "change_permille": 1000},
          "hours": [{"hour": 0, "observers": 1, "median_input": 100_000, "median_output": 300_000, "calls": 4,
                     "completed": 4, "served": 6, "turned_away": 0},
                    {"hour": 3600, "observers": 2, "median_input": 100_000, "median_output": 600_000, "calls": 6,
                     "completed": 5, "served": 6, "turned_away": 2}]}
ADVICE = {"since": 0, "until": 86400, "most_profitable": ["tiny"], "models": [{
    "model": "tiny", "input_price": 200_000, "output_price": 1_000_000, "market": MARKET["spread"],
    "position_permille": 667, "calls": 8, "earned": 50_000, "utilization_permille": 150, "turned_away": 0,
    "peak_hours": [{"hour": 7, "calls": 5}], "suggested_input": 100_000, "suggested_output": 600_000,
    "reason": "idle (utilization 150‰) and priced above the market's median (0.600000): ask the median"}]}


def _run(monkeypatch, command, doc, *args):
    class FakeClient:
        def __init__(self, home):
            pass

        def request(self, method, path, **kwargs):
            return doc

    monkeypatch.setattr(_insight, "DaemonClient", FakeClient)
    return CliRunner().invoke(command, list(args), env={"COLUMNS": "120"}, catch_exceptions=False)


def test_market_prints_the_spread_trend_and_hours(monkeypatch):
    out = _run(monkeypatch, _insight.market, MARKET, "--model", "tiny").output
    assert "0.60" in out and "0.90" in out  # p50, p75 of output
    assert "median output price 0.30 -> 0.60 (+100.0%)" in out
    assert "median completion 90.0%" in out and "turned away for capacity 2" in out
    assert json.loads(_run(monkeypatch, _insight.market, MARKET, "--model", "tiny", "--json").output) == MARKET


def test_market_without_observations_says_so(monkeypatch):
    result = _run(monkeypatch, _insight.market, {**MARKET, "observers": 0}, "--model", "tiny")
    assert "no market observations of tiny" in result.output


def test_advise_prints_position_utilization_and_the_suggestion_with_its_reason(monkeypatch):
    out = _run(monkeypatch, _insight.advise, ADVICE).output
    assert "yours is above 66.7% of them" in out and "utilization 15.0%" in out
    assert "07:00 UTC (5)" in out and "suggested: 0.10 in / 0.60 out — idle" in out
    assert "most profitable: tiny" in out
    assert "--hours" in CliRunner().invoke(_insight.advise, ["--help"]).output
