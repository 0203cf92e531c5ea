"""Availability schedules: boundaries, midnight, timezones, DST, maintenance windows."""

from __future__ import annotations

import datetime as dt

import pytest

from node.provider._schedule import parse_schedule

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def test_no_schedule_means_always():
    assert parse_schedule(None).available(at("2026-11-22T03:00:00+00:00"))


def test_weekly_hours_boundaries_in_a_timezone():
    s = parse_schedule({"timezone": "Europe/Berlin", "hours": {"mon": ["09:00-17:00"]}})
    # Monday 2026-11-23, Berlin is UTC+1 in November
    assert not s.available(at("2026-11-23T07:59:59+00:00"))  # 08:59:59 local
    assert s.available(at("2026-11-23T08:00:00+00:00"))  # 09:00 local: opens
    assert s.available(at("2026-11-23T15:59:59+00:00"))
    assert not s.available(at("2026-11-23T16:00:00+00:00"))  # 17:00 local: closed (end exclusive)
    assert not s.available(at("2026-11-24T10:00:00+00:00"))  # Tuesday is not listed


def test_ranges_past_midnight_and_whole_days():
    s = parse_schedule({"timezone": "UTC", "hours": {"sat": ["22:00-02:00"], "wed": ["00:00-24:00"]}})
    assert not s.available(at("2026-11-28T21:59:00+00:00"))  # Saturday
    assert s.available(at("2026-11-28T22:00:00+00:00"))
    assert s.available(at("2026-11-29T01:59:00+00:00"))  # Sunday, still Saturday's range
    assert not s.available(at("2026-11-29T02:00:00+00:00"))
    assert not s.available(at("2026-11-29T22:30:00+00:00"))  # Sunday evening is not Saturday
    assert s.available(at("2026-11-25T00:00:00+00:00")) and s.available(at("2026-11-25T23:59:59+00:00"))
    assert not s.available(at("2026-11-26T00:00:00+00:00"))


def test_wall_clock_hours_follow_dst():
    s = parse_schedule({"timezone": "America/New_York", "hours": {d: ["09:00-10:00"] for d in ("fri", "mon")}})
    assert s.available(at("2026-10-30T13:30:00+00:00"))  # Friday, EDT (UTC-4): 09:30 local
    assert not s.available(at("2026-11-02T13:30:00+00:00"))  # Monday, EST (UTC-5): 08:30 local
    assert s.available(at("2026-11-02T14:30:00+00:00"))  # 09:30 local


def test_maintenance_wins_over_hours_at_its_exact_bounds():
    s = parse_schedule({"timezone": "Asia/Tokyo", "hours": {d: ["00:00-24:00"] for d in
                                                            ("mon", "tue", "wed", "thu", "fri", "sat", "sun")},
                        "maintenance": [{"start": "2026-11-23T02:00:00+09:00", "end": "2026-11-23T04:00:00+09:00"}]})
    assert s.available(at("2026-11-22T16:59:59+00:00"))  # 01:59:59 Tokyo
    assert not s.available(at("2026-11-22T17:00:00+00:00"))  # 02:00 Tokyo: window starts
    assert not s.available(at("2026-11-22T18:59:59+00:00"))
    assert s.available(at("2026-11-22T19:00:00+00:00"))  # 04:00 Tokyo: window ended


@pytest.mark.parametrize("raw,match", [
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"hours": {"funday": ["09:00-10:00"]}}, "day"),
    ({"hours": {"mon": ["9-5"]}}, "range"),
    ({"hours": {"mon": ["09:00-09:00"]}}, "empty"),
    ({"hours": {"mon": ["25:00-26:00"]}}, "time of day"),
    ({"maintenance": [{"start": "2026-11-23T02:00:00", "end": "2026-11-23T03:00:00"}]}, "offsets"),
    ({"maintenance": [{"start": "2026-11-23T04:00:00+00:00", "end": "2026-11-23T03:00:00+00:00"}]}, "after"),
])
def test_bad_schedules_are_named(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(raw)


async def test_a_node_in_maintenance_publishes_no_listing(tmp_path):
    from node import open_swarm

    now = dt.datetime.now(UTC)
    home = tmp_path / "home"
    async with open_swarm(home, passphrase="pw") as swarm:  # creates the home and its config
        await swarm.offer("m", input_price=1, output_price=1)
        assert swarm.service.status()["available"] and swarm.service.market._own is not None  # to be published
    config = home / "config.toml"
    config.write_text(config.read_text() + f'''
[schedule]
maintenance = [{{ start = "{(now - dt.timedelta(hours=1)).isoformat()}", end = "{(now + dt.timedelta(hours=1)).isoformat()}" }}]
''')
    async with open_swarm(home, passphrase="pw") as swarm:
        assert not swarm.service.status()["available"]
        assert swarm.service.offers() and swarm.service.market._own is None  # withdrawn, not published
