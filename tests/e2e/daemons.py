"""Real ``node`` processes on 127.0.0.1 for end-to-end tests; every one is stopped by the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "e2e-passphrase"


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
    env["INFERSWARM_PASSPHRASE"] = PASSPHRASE
    return env


def node(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                         env=node_env(), timeout=timeout, stdin=subprocess.DEVNULL)
    if check and out.returncode != 0:
        raise AssertionError(f"node {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    """One ``node start`` process with its own home."""

    def __init__(self, home: Path, *extra: str) -> None:
        self.home = home
        node("init", "--home", str(home))
        self.log = open(home / "daemon.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0", *extra],
            cwd=ROOT, env=node_env(), stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.info = poll(self._ready, 60, f"daemon in {home} to be ready")

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {(self.home / 'daemon.log').read_text()}")
        try:
            return json.loads((self.home / "daemon.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    @property
    def addr(self) -> str:
        return self.info["addrs"][0]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return node(*args, "--home", str(self.home), check=check)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait, return the exit status (killed if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
