"""node/ reads time through one clock: ``trio.current_time()`` for durations, an injected wall
clock for expiries and timestamps. Only ``node/_clock.py`` names the system's clocks."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

THE_ONE_PLACE = "node/_clock.py"
CLOCK_READS = {"time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns"}
DATETIME_NOW = {"now", "utcnow", "today"}
# Debt: these read the system clock directly, to be moved onto the node's wall clock. The list
# may only shrink; the test fails when an entry is stale, so whoever fixes one deletes it here.
ALLOWED = {
    ("node/api/_reports.py", "time.time"),
    ("node/api/_openai.py", "time.time"),
}


def _clock_reads(path: Path) -> list[str]:
    """Every place ``path`` names a system clock: ``time.time`` (called or passed along),
    ``from time import monotonic``, ``datetime.now()``, ``date.today()``."""
    tree = ast.parse(path.read_text())
    time_aliases = {"time"} - {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                              for a in n.names}  # `from x import time` shadows the module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            time_aliases |= {a.asname or a.name for a in node.names if a.name == "time"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            found += [f"from time import {a.name}" for a in node.names if a.name in CLOCK_READS]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in time_aliases and node.attr in CLOCK_READS:
                found.append(f"time.{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr in DATETIME_NOW:
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name in ("datetime", "date"):
                found.append(f"{name}.{node.attr}")
    return found


def test_only_the_clock_module_reads_the_system_clock():
    found = {(path.relative_to(ROOT).as_posix(), read)
             for path in sorted((ROOT / "node").rglob("*.py"))
             if path.relative_to(ROOT).as_posix() != THE_ONE_PLACE
             for read in _clock_reads(path)}
    new = sorted(found - ALLOWED)
    assert not new, (f"{new}: read durations with trio.current_time() and wall time through the injected "
                     f"WallClock (node/_clock.py), never the system clock directly")
    stale = sorted(ALLOWED - found)
    assert not stale, f"{stale} no longer read the system clock: delete them from ALLOWED"


def test_the_checker_sees_every_spelling(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import time\nimport time as t\nimport datetime as dt\nfrom time import monotonic\n"
        "from datetime import date, datetime\n"
        "a = time.time()\nb = t.monotonic()\nc = time.perf_counter\nd = dt.datetime.now(dt.timezone.utc)\n"
        "e = datetime.utcnow()\nf = date.today()\ng = time.strftime('%Y')\nh = dt.datetime.fromtimestamp(0)\n"
    )
    assert sorted(_clock_reads(sample)) == sorted([
        "from time import monotonic", "time.time", "time.monotonic", "time.perf_counter", "datetime.now",
        "datetime.utcnow", "date.today",
    ])
