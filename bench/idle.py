"""An idle daemon: ``node start`` on a fresh home with no model loaded (no offers), left alone
for a while; then its resident memory and the CPU it uses over a quiet window, against the
goals of ≤ 80 MB and ≤ 1% of a core. The baseline is the same interpreter doing nothing
(``python -c 'import time; time.sleep(…)'``), measured in the same run, so the figures say what
the daemon adds."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from bench._goals import goal  # noqa: E402
from tests.e2e.daemons import Daemon  # noqa: E402

SETTLE_S, WINDOW_S = 20.0, 30.0


def measure(pid: int) -> tuple[float, float]:
    """(RSS in MB, CPU as a share of one core over ``WINDOW_S``)."""
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    start = time.monotonic()
    time.sleep(WINDOW_S)
    after = proc.cpu_times()
    cpu = (after.user + after.system - before.user - before.system) / (time.monotonic() - start)
    return proc.memory_info().rss / 1e6, cpu


def main() -> None:
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        time.sleep(1)
        bare_rss, bare_cpu = measure(bare.pid)
    finally:
        bare.kill()
        bare.wait()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp) / "idle")
        try:
            time.sleep(SETTLE_S)  # past start-up: imports, the first DHT and address rounds
            rss, cpu = measure(daemon.proc.pid)
        finally:
            daemon.stop()
    print(f"bare interpreter  RSS {bare_rss:6.1f} MB  CPU {bare_cpu * 100:5.2f}% of a core")
    print(f"idle daemon       RSS {rss:6.1f} MB  CPU {cpu * 100:5.2f}% of a core (over {WINDOW_S:g} s, "
          f"{SETTLE_S:g} s after start)")
    goal("idle daemon RSS", rss, 80.0, at_most=True, unit=" MB")
    goal("idle daemon CPU", cpu * 100, 1.0, at_most=True, unit="% of a core")


if __name__ == "__main__":
    main()
