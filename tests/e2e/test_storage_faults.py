"""Storage faults of a real escrow agent (issue 12, finding 7): a damaged ledger page found at
start stops money operations with one clear line to the client and one in the agent's log (no
traceback, no crash); `node escrow check` says so with the node stopped (and refuses while it
runs) and restores the latest backup, keeping the damaged file aside, with every balance back.
A disk that refuses the ledger's writes is one error line in the agent's log per episode and a
refusal that says so to a remote client, not a dropped stream; nothing is half-applied. The
agent's service (in memory, virtual time) survives a damaged page its sweep meets and keeps its
backups on schedule.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import types

import pytest
import trio

import protocol
from node.escrow._service import serve_escrow
from node.net._streams import FramedStream
from protocol import ESCROW_PROTOCOL, EscrowMint, EscrowOpen
from tests.e2e.daemons import ROOT, Daemon, node, node_env, poll
from tests.node.memory_stream import memory_stream_pair
from tests.wallet.escrow_support import AGENT, ok, signed
from tests.wallet.test_ledger_integrity import ALICE, BOB, NOW, damage_table_page
from wallet import EscrowAgent, Ledger, list_ledger_backups


def _log_since(daemon: Daemon, offset: int) -> str:
    return (daemon.home / "daemon.log").read_text()[offset:]


def test_a_damaged_ledger_page_refuses_money_clearly_and_escrow_check_restores_every_balance(daemons):
    tmp_path, started = daemons
    agent = Daemon(tmp_path / "agent", "--escrow")
    started.append(agent)
    consumer = Daemon(tmp_path / "consumer", "--bootstrap", agent.addr)
    started.append(consumer)
    aid, cid = agent.info["peer_id"], consumer.info["peer_id"]
    agent.cli("escrow", "mint", "--to", cid, "--amount", "5")

    busy = agent.cli("escrow", "check", check=False)
    assert busy.returncode == 1 and "stop it first" in busy.stderr
    assert agent.stop() == 0  # a clean shutdown leaves a backup holding the mint
    ledger = agent.home / "escrow.db"
    assert list_ledger_backups(ledger)
    damage_table_page(ledger, "accounts")

    offset = len((agent.home / "daemon.log").read_text())
    agent.start()  # starts: its agent refuses money operations
    refused = consumer.cli("escrow", "open", "--escrow", agent.addr, "--provider", aid, "--amount", "1",
                           "--expires", "1h", check=False)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "ledger_damaged" in refused.stderr and "node escrow check" in refused.stderr
    mint = agent.cli("escrow", "mint", "--to", cid, "--amount", "1", check=False)
    assert mint.returncode == 1 and "ledger_damaged" in mint.stderr
    assert agent.stop() == 0
    log = _log_since(agent, offset)
    assert log.count("escrow ledger damaged") == 1 and "Traceback" not in log, log

    check = agent.cli("escrow", "check", check=False)
    assert check.returncode == 1 and "DAMAGED" in check.stdout and "--restore latest" in check.stderr
    restored = agent.cli("escrow", "check", "--restore", "latest")
    assert "integrity:     ok" in restored.stdout and "kept as" in restored.stderr
    assert [p.name for p in agent.home.glob("escrow.db.damaged-*")]  # never deleted
    doc = json.loads(agent.cli("escrow", "check", "--json").stdout)
    assert doc["ok"] and doc["totals"] == {"minted": 5_000_000, "withdrawn": 0, "available": 5_000_000, "locked": 0}

    agent.start()
    balance = json.loads(consumer.cli("wallet", "balance", "--escrow", agent.addr, "--json").stdout)
    assert (balance["available"], balance["locked"]) == (5_000_000, 0)
    consumer.cli("escrow", "open", "--escrow", agent.addr, "--provider", aid, "--amount", "1", "--expires", "1h")


def test_a_ledger_that_is_not_a_database_stops_the_start_with_one_line(tmp_path):
    home = tmp_path / "agent"
    node("init", "--home", str(home))
    (home / "escrow.db").write_bytes(b"this is not an sqlite database\n" * 256)
    out = node("start", "--home", str(home), "--escrow", "--listen", "/ip4/127.0.0.1/tcp/0", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert "not a usable ledger" in out.stderr and "node escrow check" in out.stderr
    assert (home / "escrow.db").read_bytes().startswith(b"this is not")  # left as it was


class PipedDaemon(Daemon):
    """A daemon whose output goes to a pipe (``lines``), not a file: a file size limit set on it
    (``RLIMIT_FSIZE``) then stops its ledger's writes and never its log."""

    def start(self) -> None:
        self.lines: list[str] = []
        self.log = open(os.devnull, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "start", "--home", str(self.home), "--listen", "/ip4/127.0.0.1/tcp/0",
             *self.extra],
            cwd=ROOT, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True)
        threading.Thread(target=lambda out: self.lines.extend(out), args=(self.proc.stdout,), daemon=True).start()
        self.info = poll(self._ready, 60, f"daemon in {self.home} to be ready")

    def limit_file_size(self, size: int) -> None:
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit(2) (Linux) to limit a running daemon")
def test_a_disk_refusing_the_ledgers_writes_is_logged_once_and_told_to_the_client(daemons):
    """The file size limit makes the write-ahead log's next append fail (``EFBIG``, which SQLite
    reports as an I/O error: ``storage_error``; a full disk's ``ENOSPC`` is ``storage_full``, as
    tests/wallet/test_ledger_integrity.py shows with SQLite's own size limit)."""
    tmp_path, started = daemons
    agent = PipedDaemon(tmp_path / "agent", "--escrow")
    started.append(agent)
    consumer = Daemon(tmp_path / "consumer", "--bootstrap", agent.addr)
    started.append(consumer)
    aid, cid = agent.info["peer_id"], consumer.info["peer_id"]
    agent.cli("escrow", "mint", "--to", cid, "--amount", "5")

    agent.limit_file_size((agent.home / "escrow.db-wal").stat().st_size)  # no file may grow: the disk is "full"
    for _ in range(3):
        refused = consumer.cli("escrow", "open", "--escrow", agent.addr, "--provider", aid, "--amount", "1",
                               "--expires", "1h", check=False)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
        assert "storage_error" in refused.stderr and "nothing was applied" in refused.stderr, refused.stderr
    assert json.loads(consumer.cli("wallet", "balance", "--escrow", agent.addr, "--json").stdout)["available"] == \
        5_000_000  # reads still answer
    agent.limit_file_size(resource.RLIM_INFINITY)
    consumer.cli("escrow", "open", "--escrow", agent.addr, "--provider", aid, "--amount", "1", "--expires", "1h")
    assert agent.stop() == 0

    log = "".join(agent.lines)
    assert log.count("escrow ledger cannot write") == 1 and log.count("writes again") == 1, log
    assert "Traceback" not in log, log
    doc = json.loads(agent.cli("escrow", "check", "--json").stdout)
    assert doc["ok"] and doc["totals"] == {"minted": 5_000_000, "withdrawn": 0, "available": 4_000_000,
                                           "locked": 1_000_000}


class FakeHost:
    def __init__(self) -> None:
        self.handlers: dict[str, object] = {}

    def set_stream_handler(self, proto, handler) -> None:
        self.handlers[proto] = handler


@pytest.fixture
def inline_threads(monkeypatch):
    """Ledger work inline, so that the autojumping clock does not jump during an fsync."""

    async def run_sync(fn, *args, **_options):
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


async def _ask(handler, nursery, request) -> protocol.EscrowResponse:
    client, server = memory_stream_pair()
    server.muxed_conn = types.SimpleNamespace(peer_id=ALICE.peer_id)
    nursery.start_soon(handler, server)
    framed = FramedStream(client)
    await framed.send(request)
    return await framed.receive(expect=(protocol.EscrowResponse,))


async def test_the_service_survives_a_damaged_row_its_sweep_meets_and_backs_up_on_schedule(
        tmp_path, inline_threads, autojump_clock, caplog):
    agent = EscrowAgent(Ledger(tmp_path / "escrow.db"), AGENT)
    ok(agent.handle(signed(EscrowMint, AGENT, NOW, to=ALICE.peer_id, amount=1_000), NOW))
    ok(agent.handle(signed(EscrowOpen, ALICE, NOW, provider=BOB.peer_id, cap=100, expires_at=NOW + 60), NOW))
    host = FakeHost()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_escrow(
                host, agent, lambda: NOW + trio.current_time(), sweep_interval_s=60, backup_interval_s=3600,
                backup_keep=3, task_status=task_status))
            await trio.sleep(4 * 3600 + 1)  # at start, then hourly: 5 backups taken, the newest 3 kept
            assert [b.taken_at - NOW for b in list_ledger_backups(agent.ledger.path)] == [7200, 10800, 14400]
            assert not agent.damaged  # the channel expired and was swept
            ok(agent.handle(signed(EscrowOpen, ALICE, NOW + 14401, provider=BOB.peer_id, cap=100,
                                   expires_at=NOW + 14500), NOW + 14401))
            agent.ledger.db.execute("UPDATE channels SET grant_ = x'00ff00' WHERE status = 'open'")  # bit rot
            await trio.sleep(200)  # the sweep meets it past its expiry: one line, the service goes on
            assert agent.damaged
            answer = await _ask(host.handlers[ESCROW_PROTOCOL], nursery,
                                signed(EscrowMint, AGENT, NOW + 14601, to=ALICE.peer_id, amount=1))
            assert answer.error == "ledger_damaged"
            await trio.sleep(2 * 3600)  # no backup of a damaged ledger, on schedule or at shutdown
            nursery.cancel_scope.cancel()
        assert [b.taken_at - NOW for b in list_ledger_backups(agent.ledger.path)] == [7200, 10800, 14400]
        damaged = [r for r in caplog.records if r.levelname == "ERROR" and "damaged" in r.getMessage()]
        assert len(damaged) == 1 and "Traceback" not in caplog.text
    finally:
        agent.ledger.close()
