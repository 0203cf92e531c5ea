"""The `node` command as a user runs it: a real subprocess per invocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NODE = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[2]


def run(*args, env_extra=None, home_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
    env.update(env_extra or {})
    return subprocess.run([*NODE, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_help_lists_the_commands():
    out = run("--help")
    assert out.returncode == 0
    assert "init" in out.stdout and "id" in out.stdout


def test_init_then_id_json(tmp_path):
    home = tmp_path / "home"
    init = run("init", "--home", str(home), env_extra={"INFERSWARM_PASSPHRASE": "pw"})
    assert init.returncode == 0, init.stderr
    peer_id = init.stdout.strip()
    assert peer_id.startswith("12D3KooW")
    out = run("id", "--home", str(home), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["peer_id"] == peer_id and len(bytes.fromhex(doc["public_key"])) == 32
    assert (home / "config.toml").exists() and oct((home / "keystore.json").stat().st_mode & 0o777) == "0o600"


def test_home_from_the_environment(tmp_path):
    env = {"INFERSWARM_PASSPHRASE": "pw", "INFERSWARM_HOME": str(tmp_path / "envhome")}
    assert run("init", env_extra=env).returncode == 0
    assert json.loads(run("id", "--json", env_extra=env).stdout)["peer_id"].startswith("12D3KooW")


def test_init_twice_fails_clearly_unless_exist_ok(tmp_path):
    env = {"INFERSWARM_PASSPHRASE": "pw"}
    first = run("init", "--home", str(tmp_path), env_extra=env)
    again = run("init", "--home", str(tmp_path), env_extra=env)
    assert again.returncode == 1 and "already initialised" in again.stderr
    ok = run("init", "--home", str(tmp_path), "--exist-ok", env_extra=env)
    assert ok.returncode == 0 and ok.stdout.strip() == first.stdout.strip()


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (("init",), 1, "INFERSWARM_PASSPHRASE"),  # no passphrase and no terminal
        (("id",), 1, "node init"),  # no keystore yet
        (("id", "--bogus"), 2, "No such option"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, args, code, needle):
    out = run(*args, "--home", str(tmp_path / "h"))
    assert out.returncode == code
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
