"""The CLI's output helpers: whole ids, credits not µc, local dates with "in 9 min", tables that
turn into lists when the terminal is narrow."""

from __future__ import annotations

import time

from cli._common import ago_or_in, amount, credits, duration, in_credits, local_time, print_rows, show_id, when

PEER = "12D3KooWQd7dGbLk1hYcu5W8dU5MJRxdrPRFLHxu6kn7b3yZzmnP"


def test_amounts_are_exact_credits():
    assert amount(1_500_000) == "1.50"
    assert amount(1234) == "0.001234"
    assert amount(0) == "0.00"
    assert amount(-2_000_000) == "-2.00"
    assert credits(500_000) == "0.50 credits"


def test_daemon_messages_speak_credits():
    assert in_credits("12 µc left in this session") == "0.000012 credits left in this session"
    assert in_credits("now 500000/1500000 µc per 1K tokens") == "now 0.50/1.50 credits per 1K tokens"
    assert in_credits("no money here") == "no money here"


def test_times_are_relative_and_local():
    now = 1_800_000_000.0
    assert ago_or_in(now + 296, now) == "in 5 min"
    assert ago_or_in(now + 540, now) == "in 9 min"
    assert ago_or_in(now - 7500, now) == "2 h 5 min ago"
    assert ago_or_in(now, now) == "now"
    assert duration(45) == "45 s"
    assert when(now + 540, now) == f"{local_time(now + 540)} (in 9 min)"
    assert time.strftime("%Y-%m-%d %H:%M", time.localtime(now)) == local_time(now)


def test_ids_are_whole():
    assert show_id(PEER) == PEER


def test_a_table_that_fits_is_a_table(capsys):
    print_rows(["provider", "model"], [[PEER, "tiny"]], width=100)
    out = capsys.readouterr().out
    assert PEER in out and "┃" in out and max(len(line) for line in out.splitlines()) <= 100


def test_a_narrow_terminal_gets_a_list_with_whole_ids(capsys):
    print_rows(["provider", "model", "in/1K"], [[PEER, "tiny", "0.50"], [PEER, "big", "1.00"]], width=40)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [PEER, "  model: tiny", "  in/1K: 0.50"]
    assert lines[3] == "" and lines[4] == PEER
