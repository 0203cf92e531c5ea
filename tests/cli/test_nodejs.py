"""`node` is also Node.js's name: called the way Node.js is, it hands over to the Node.js on PATH
after itself; our own subcommands stay ours; `inferswarm` is the same command and never hands over."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def path_dirs(tmp_path):
    """PATH as an activated venv has it: our `node` first (a pip-style entry point script), then a
    fake Node.js that prints how it was called."""
    ours, other = tmp_path / "venv-bin", tmp_path / "usr-bin"
    ours.mkdir()
    other.mkdir()
    for name, entry in (("node", "node_main"), ("inferswarm", "main")):
        script = ours / name
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom cli.main import {entry}\n"
                          f"if __name__ == '__main__':\n    sys.exit({entry}())\n")
        script.chmod(0o755)
    fake = other / "node"
    fake.write_text('#!/bin/sh\necho "FAKE-NODEJS $*"\n')
    fake.chmod(0o755)
    return ours, other


def call(path: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
    env["PATH"] = path
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(["node", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
                          stdin=subprocess.DEVNULL) if args[:1] != ("@inferswarm",) else \
        subprocess.run(["inferswarm", *args[1:]], capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
                       stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", [
    ("script.js", "a", "b"),
    ("-e", "console.log(1)"),
    ("--eval", "1"),
    ("-p", "1+1"),
    ("-r", "dotenv/config", "x.js"),
    ("--inspect", "x.js"),
    ("--version",),
    ("-v",),
    ("-",),
])
def test_nodejs_calls_hand_over(path_dirs, tmp_path, args):
    ours, other = path_dirs
    (tmp_path / "script.js").write_text("console.log('hi')\n")
    out = call(f"{ours}{os.pathsep}{other}", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"FAKE-NODEJS {' '.join(args)}".strip()


def test_a_script_path_npm_style_hands_over(path_dirs, tmp_path):
    ours, other = path_dirs
    script = tmp_path / "npm-cli"  # no .js suffix: how npm's `#!/usr/bin/env node` script is run
    script.write_text("#!/usr/bin/env node\n")
    out = call(f"{ours}{os.pathsep}{other}", str(script), "--version")
    assert out.stdout.strip() == f"FAKE-NODEJS {script} --version"


@pytest.mark.parametrize("args,needle", [
    (("--help",), "Inferswarm"),
    (("-h",), "Inferswarm"),
    (("id", "--help"), "peer id"),
    (("-v", "id", "--help"), "peer id"),
])
def test_our_own_calls_stay_ours(path_dirs, args, needle):
    ours, other = path_dirs
    out = call(f"{ours}{os.pathsep}{other}", *args)
    assert out.returncode == 0 and "FAKE-NODEJS" not in out.stdout and needle in out.stdout


def test_inferswarm_never_hands_over(path_dirs):
    ours, other = path_dirs
    out = call(f"{ours}{os.pathsep}{other}", "@inferswarm", "--version")
    assert out.returncode == 0 and out.stdout.startswith("inferswarm, version")


def test_without_nodejs_one_line_and_our_version(path_dirs, tmp_path):
    ours, _ = path_dirs
    out = call(str(ours), "-e", "1")
    assert out.returncode == 127 and "Node.js is not installed" in out.stderr and "Traceback" not in out.stderr
    assert call(str(ours), "--version").stdout.startswith("inferswarm, version")


def test_another_copy_of_ours_is_skipped(path_dirs, tmp_path):
    ours, other = path_dirs
    second = tmp_path / "other-venv"
    second.mkdir()
    shutil.copy(ours / "node", second / "node")  # another venv's entry point, before the real Node.js
    out = call(os.pathsep.join([str(ours), str(second), str(other)]), "-e", "1")
    assert out.stdout.strip() == "FAKE-NODEJS -e 1"


REAL_NODEJS = next((p for p in ("/usr/bin/node", "/usr/local/bin/node", "/usr/bin/nodejs")
                    if os.access(p, os.X_OK) and b"cli.main" not in Path(p).read_bytes()[:1024]), None)


@pytest.mark.skipif(REAL_NODEJS is None, reason="Node.js is not installed")
def test_the_real_nodejs_runs_scripts_and_reports_its_version(path_dirs, tmp_path):
    ours, _ = path_dirs
    path = f"{ours}{os.pathsep}{Path(REAL_NODEJS).parent}"
    script = tmp_path / "hello.js"
    script.write_text("console.log('hello', process.argv.slice(2).join(' '))\n")
    assert call(path, str(script), "a", "b").stdout.strip() == "hello a b"
    assert call(path, "-e", "console.log(6*7)").stdout.strip() == "42"
    version = call(path, "--version").stdout.strip()
    assert version.startswith("v") and version[1].isdigit()


def test_both_names_are_installed_as_the_same_command():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.value.startswith("cli.main")}
    assert scripts == {"inferswarm": "cli.main:main", "node": "cli.main:node_main"}
