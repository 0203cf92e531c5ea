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


def _node_imports() -> dict[str, set[str]]:
    """Every ``node`` module (dotted) -> the ``node`` modules it imports, anywhere in its body."""
    out: dict[str, set[str]] = {}
    for path in (ROOT / "node").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        name = ".".join(parts)
        package = parts if is_pkg else parts[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "node")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "node":
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)  # `from . import _x`
        out[name] = found
    return out


def _role(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROLES else ""


ROLES = ("net", "provider", "consumer", "escrow", "verify", "reputation", "insight", "api", "chain")
# role -> the roles it may import (a role may always import itself and node's shared top-level modules)
ALLOWED = {
    "net": set(),
    "chain": set(),  # the chain link and the devnet: wallet.chain over web3, nothing of the swarm
    "escrow": {"net"},
    "provider": {"net", "escrow"},
    "consumer": {"net", "escrow"},
    "verify": {"net", "provider"},  # it re-runs calls on the provider's backends
    "reputation": {"net", "escrow", "consumer"},  # it attests the renter's sessions with the agent's proof
    "insight": {"net"},  # it reads the receipts and is handed the provider's counters and the offers
    "api": {"net", "escrow", "provider", "consumer", "verify", "reputation", "insight", "chain"},
}


def test_node_roles_import_only_what_they_may():
    imports = _node_imports()
    bad = []
    for module, targets in imports.items():
        role = _role(module)
        if not role:
            continue
        for target in targets:
            other = _role(target)
            if other and other != role and other not in ALLOWED[role]:
                bad.append(f"{module} imports {target}")
            # net may use node's error root and its clock (node/_errors.py and node/_clock.py import
            # nothing) and no other shared module
            if role == "net" and not other and target.startswith("node.") \
                    and target.split(".")[1] not in ("_errors", "_clock"):
                bad.append(f"{module} (net) imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_api_is_imported_only_by_the_daemon():
    importers = {m for m, targets in _node_imports().items() if _role(m) != "api"
                 and any(_role(t) == "api" for t in targets)}
    assert importers == {"node._daemon"}, importers


def test_the_cli_entry_points_stay_light():
    """Every CLI command imports ``node`` and ``node.daemon``; the networking stack, the HTTP server
    and torch load only when a daemon or a model starts."""
    code = (
        "import sys, node, node.daemon\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'libp2p', 'hypercorn', 'starlette', 'torch'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"importing node.daemon loads {out.stdout.strip()}"


def test_cli_imports_only_public_node_modules():
    for path in (ROOT / "cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("node"):
                assert not any(p.startswith("_") for p in node.module.split(".")), f"{path.name} imports {node.module}"
