"""The CLI's one error edge, as a user meets it: every expected failure of `node start` (a bad
flag, each kind of config error, a port in use, a second start on one home) and of the other
commands is an exit status, one clear line and no traceback; `-v` shows the traceback; a failure
nothing expected is one "internal error" line and exit 70."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli._common import CliError
from cli.main import EXIT_INTERNAL, InternalError, edge

NODE = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}, "INFERSWARM_PASSPHRASE": "pw"}


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NODE, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_clear_line(out: subprocess.CompletedProcess[str], needle: str, code: int = 1) -> None:
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, out.stderr
    assert needle in out.stderr, out.stderr


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("errors") / "home"
    assert run("init", "--home", str(path)).returncode == 0
    return path


@pytest.fixture
def fresh_config(home):
    """The home's config as `node init` wrote it, restored after the test."""
    original = (home / "config.toml").read_text()
    yield home / "config.toml"
    (home / "config.toml").write_text(original)


@pytest.mark.parametrize("flags,needle", [
    (("--listen", "garbage"), "not a listen address"),
    (("--listen", "/ip4/127.0.0.1/udp/4001"), "not a listen address"),
    (("--bootstrap", "garbage"), "not a peer address"),
    (("--api", "garbage"), "HOST:PORT"),
    (("--api", "127.0.0.1:99999"), "HOST:PORT"),
    (("--api", "10.1.2.3:8080"), "loopback only"),
    (("--accept-escrow", "garbage"), "peer id"),
])
def test_each_bad_flag_of_start_is_one_line(home, flags, needle):
    one_clear_line(run("start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0", *flags), needle)


@pytest.mark.parametrize("text,needle,at", [  # at: the line of ``text`` the error names (None: the parser's own)
    ('[node\n', "config.toml: ", None),  # TOML syntax: the parser's own line and column
    ('[health]\ninterval_s = "x"\n', "[health] interval_s must be a number, not 'x'", 2),
    ('[health]\nbogus = 1\n', "[health] has no key 'bogus'", 2),
    ('[sla]\nwindow = "x"\n', "[sla] window must be a whole number", 2),
    ('[helth]\ninterval_s = 1\n', "no table or key 'helth'", 1),
    ('[schedule]\nhours = 5\n', "[schedule] hours must be a table", 2),
    ('[schedule]\ntimezone = "Mars/Base"\n', "unknown timezone 'Mars/Base'", 1),
    ('[pricing.dynamic]\nmax_multiplier = true\n', "[pricing.dynamic] max_multiplier must be a number", 2),
    ('[[offers]]\nmodel = "m"\n', "[[offers]] #1 needs backend, input_price, output_price", 1),
    ('[[offers]]\nmodel = "m"\nbackend = "builtin"\ninput_price = 0.5\noutput_price = 1\n',
     "[[offers]] #1 input_price must be a whole number", 4),
    ('[[offers]]\nmodel = "m"\nbackend = "nope"\ninput_price = 1\noutput_price = 1\n', "backend 'nope'", 1),
    # the README's own example, pasted as it stands
    ('[[contracts]]\nclient = "12D3KooW…"\nmodel = "tiny"\ninput_price = 100000\noutput_price = 300000\n'
     'until = "2027-01-01T00:00:00+00:00"\nreserved_slots = 2\n', "not an Ed25519 peer id", 1),
])
def test_each_config_error_names_file_line_and_key(home, fresh_config, text, needle, at):
    original = fresh_config.read_text()
    fresh_config.write_text(original + "\n" + text)
    out = run("start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0")
    one_clear_line(out, needle)
    assert f"{fresh_config}:" in out.stderr
    if at is not None:
        assert f"{fresh_config}:{original.count(chr(10)) + 1 + at}: " in out.stderr


def test_a_wrong_key_in_node_names_its_line(home, fresh_config):
    text = fresh_config.read_text()
    fresh_config.write_text(text.replace("bootstrap = []", "boostrap = []"))
    line = text.splitlines().index("bootstrap = []") + 1
    one_clear_line(run("start", "--home", str(home)), f"config.toml:{line}: [node] has no key 'boostrap'")


def test_a_port_in_use_is_one_line(home):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out = run("start", "--home", str(home), "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    one_clear_line(out, f"cannot listen on /ip4/127.0.0.1/tcp/{port}")


def _wait_ready(home: Path, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}"
        try:
            info = json.loads((home / "daemon.json").read_text())
            if info.get("pid") == proc.pid:
                return info
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the daemon did not become ready")


def test_a_second_start_on_a_home_names_the_first_and_leaves_it_alone(home, tmp_path):
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([*NODE, "start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0"], cwd=ROOT,
                             env=ENV, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        info = _wait_ready(home, first)
        # another port, so only the home's lock can refuse it
        second = run("start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0")
        one_clear_line(second, f"another node runs on {home} (pid {first.pid})")
        assert json.loads((home / "daemon.json").read_text()) == info  # the first's file, untouched
        assert (home / "node.lock").exists()
        status = run("status", "--home", str(home), "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["peer_id"] == info["peer_id"]
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 0
        log.close()
    assert not (home / "daemon.json").exists()  # removed by the daemon that wrote it
    assert (home / "node.lock").exists()  # never deleted: a removed lock file would lock nothing
    # the log of a normal run has the node's lines only: no libp2p noise
    noisy = [line for line in (tmp_path / "first.log").read_text().splitlines()
             if "libp2p" in line and "listening on" not in line]
    assert not noisy, noisy


def test_no_daemon_and_an_unreachable_daemon_are_one_line(home, tmp_path):
    one_clear_line(run("status", "--home", str(home)), "no running node")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    (home / "daemon.json").write_text(json.dumps({"pid": os.getpid(), "api_url": f"http://127.0.0.1:{dead}",
                                                  "peer_id": "x", "addrs": []}))
    try:
        one_clear_line(run("providers", "--home", str(home)), "did not answer")
    finally:
        (home / "daemon.json").unlink()


def test_verbose_shows_the_traceback(tmp_path):
    quiet = run("id", "--home", str(tmp_path / "none"))
    one_clear_line(quiet, "node init")
    loud = run("-v", "id", "--home", str(tmp_path / "none"))
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "node init" in loud.stderr.splitlines()[-1]


def test_the_edge_finds_the_cause_inside_exception_groups():
    deep: BaseException = OSError(98, "cannot listen on /ip4/0.0.0.0/tcp/4001")
    for _ in range(12):  # deeper than Python prints (max_group_depth is 10)
        deep = BaseExceptionGroup("nursery", [deep])
    result = edge(deep, verbose=False)
    assert isinstance(result, CliError) and result.message == "cannot listen on /ip4/0.0.0.0/tcp/4001"


def test_an_unexpected_failure_is_an_internal_error_line():
    result = edge(ExceptionGroup("nursery", [RuntimeError("boom")]), verbose=False)
    assert isinstance(result, InternalError) and result.exit_code == EXIT_INTERNAL == 70
    assert result.message == "internal error: RuntimeError: boom; run with -v for the traceback"
