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
        self.extra = extra
        node("init", "--home", str(home))
        self.start()

    def start(self) -> None:
        """Start (or restart) the daemon on its home and wait until it is ready."""
        self.log = open(self.home / "daemon.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "start", "--home", str(self.home), "--listen", "/ip4/127.0.0.1/tcp/0",
             *self.extra],
            cwd=ROOT, env=node_env(), stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.info = poll(self._ready, 60, f"daemon in {self.home} to be ready")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind (daemon.json stays behind, as after a crash)."""
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {(self.home / 'daemon.log').read_text()}")
        try:
            info = json.loads((self.home / "daemon.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return info if info.get("pid") == self.proc.pid else None  # not a crashed predecessor's file

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
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode


def start_market(base: Path, started: list["Daemon"], mint: str = "2",
                 consumer_args: tuple[str, ...] = ()) -> tuple["Daemon", "Daemon", "Daemon", str]:
    """An escrow agent, a provider selling `tiny` on `builtin` (0.50/1.50) that accepts it, and a
    consumer (started with ``consumer_args`` too) holding ``mint`` credits there, with the listing
    already in the consumer's view."""
    agent = Daemon(base / "agent", "--escrow")
    started.append(agent)
    aid = agent.info["peer_id"]
    provider = Daemon(base / "provider", "--bootstrap", agent.addr, "--accept-escrow", aid)
    started.append(provider)
    consumer = Daemon(base / "consumer", "--bootstrap", agent.addr, *consumer_args)
    started.append(consumer)
    agent.cli("escrow", "mint", "--to", consumer.info["peer_id"], "--amount", mint)
    provider.cli("offer", "add", "--model", "tiny", "--backend", "builtin", "--input-price", "0.50",
                 "--output-price", "1.50", "--max-context", "2048")
    poll(lambda: json.loads(consumer.cli("providers", "--model", "tiny", "--json").stdout), 20, "the listing")
    return agent, provider, consumer, aid


class DevnetProcess:
    """One ``node devnet`` process on a free loopback port; ``spec`` is its ``evm:URL#ESCROW``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "devnet", "--rpc", "127.0.0.1:0"], cwd=ROOT,
                                     env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True)
        self.spec = self.url = ""
        for line in self.proc.stdout:  # its banner, then nothing more on stdout
            if " on http://" in line:
                self.url = line.rsplit(" on ", 1)[1].strip()
            if "--chain " in line:
                self.spec = line.rsplit("--chain ", 1)[1].strip()
                break
        if not self.spec:
            raise AssertionError(f"node devnet exited with {self.proc.wait()} before serving")
        self.escrow = self.spec.rsplit("#", 1)[1]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.proc.stdout.close()
