"""protocol/ and wallet/ stay pure: they import neither trio, libp2p nor node — not directly,
not through anything they import — and protocol/ reads no clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["protocol", "wallet"])
def test_pure_packages_do_not_pull_in_io_layers(package):
    code = (
        f"import sys, {package}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p', 'node', 'cli'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"{package} imports {out.stdout.strip()}"


def test_protocol_imports_no_clock_and_no_io_modules():
    banned = {"time", "datetime", "socket", "sqlite3", "os", "trio", "libp2p", "node", "wallet", "asyncio"}
    for path in (ROOT / "protocol").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
